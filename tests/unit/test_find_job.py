"""Finding a job by id on any configured provider (issue 17, item 2): pure search logic
with stand-in providers; the real thing is tests/cluster/test_slurm_programs.py and
tests/cluster/test_ssh_provider.py."""

from __future__ import annotations

import pytest

from hpc_serverless.core.errors import JobNotFoundError
from hpc_serverless.core.jobs import Job, new_job_id, provider_of_job_id
from hpc_serverless.programs import find_job
from hpc_serverless.providers.local import LocalProvider


class Stand(LocalProvider):
    """A provider that has the jobs it is given and records every search."""

    def __init__(self, name: str, has: tuple[str, ...] = (), blocker: str | None = None) -> None:
        super().__init__(name)
        self.has, self.blocker, self.searched, self.asked = has, blocker, 0, 0

    def search_blocker(self) -> str | None:
        self.asked += 1
        return self.blocker

    def get_job_by_id(self, job_id: str) -> Job:
        self.searched += 1
        if job_id in self.has:
            return Job(job_id, None, self.name)  # type: ignore[arg-type]
        raise JobNotFoundError("no", job_id=job_id, where=f"/{self.name}/jobs")


def test_job_ids_carry_their_provider():
    assert provider_of_job_id(new_job_id("cluster")) == "cluster"
    assert provider_of_job_id(new_job_id("my-site.v2")) == "my-site.v2"
    assert provider_of_job_id(new_job_id()) is None
    assert provider_of_job_id("20261124-120000-abcdef") is None       # ids from before
    odd = new_job_id("a name with spaces/and slash")                  # not a plain word: no prefix
    assert provider_of_job_id(odd) is None and "/" not in odd and " " not in odd


def test_current_first_then_the_others():
    local, a, b = Stand("local"), Stand("a"), Stand("b", has=("20261124-120000-abcdef",))
    job = find_job("20261124-120000-abcdef", [local, a, b], current=a)
    assert job.provider == "b" and (a.searched, local.searched, b.searched) == (1, 1, 1)
    assert a.asked == 0  # the current provider is searched whatever it takes to log in


def test_the_provider_named_in_the_id_goes_first():
    local, cluster = Stand("local"), Stand("cluster")
    job_id = new_job_id("cluster")
    cluster.has = (job_id,)
    assert find_job(job_id, [local, cluster], current=local).provider == "cluster"
    assert local.searched == 0


def test_nowhere_says_where_it_looked_and_what_it_did_not_search():
    local = Stand("local")
    cluster = Stand("cluster")
    remote = Stand("remote", blocker="not connected, and logging in to u@h:22 asks for Verification code")
    with pytest.raises(JobNotFoundError) as e:
        find_job("20261124-120000-abcdef", [local, cluster, remote], current=local)
    msg = str(e.value)
    assert msg.startswith("no job '20261124-120000-abcdef' on any configured provider; looked on: "
                          "local (/local/jobs); cluster (/cluster/jobs); not searched: remote (not connected")
    assert "Verification code" in msg and "--provider NAME" in msg and "\n" not in msg
    assert remote.searched == 0 and isinstance(e.value, LookupError)
