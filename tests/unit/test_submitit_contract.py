"""The submitit internals we rely on (all in hpc_serverless/adapters/submitit_executors.py)
still exist with the signatures we use, and our executors submit through our transport.

When this fails after a submitit upgrade, read the module's docstring for what each hook
is for, mend the executors, and move the `submitit<1.6` bound in pyproject.toml.
"""

from __future__ import annotations

import inspect
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest

submitit = pytest.importorskip("submitit")

from submitit.core import core  # noqa: E402
from submitit.slurm.slurm import SlurmExecutor  # noqa: E402

from hpc_serverless.adapters.schedulers.pbs_runner import PBSScheduler  # noqa: E402
from hpc_serverless.adapters.schedulers.slurm_runner import SlurmScheduler  # noqa: E402
from hpc_serverless.adapters.transport import MockTransport  # noqa: E402
from hpc_serverless.config.site import site_from_mapping  # noqa: E402
from hpc_serverless.core.target import Target  # noqa: E402

#: private name -> the parameters we call or override it with (after self)
HOOKS = {
    "_submit_command": ["command"],
    "_internal_process_submissions": ["delayed_submissions"],
    "_make_submission_file_text": ["command", "uid"],
    "_num_tasks": [],
    "_make_submission_command": ["submission_file_path"],
    "_get_job_id_from_submission_command": ["string"],
    "_internal_update_parameters": ["kwargs"],
}


@pytest.mark.parametrize("name", sorted(HOOKS))
def test_pickling_executor_hooks_exist(name):
    fn = getattr(core.PicklingExecutor, name)
    params = [p for p in inspect.signature(fn).parameters if p != "self"]
    assert params == HOOKS[name], f"submitit changed {name}{inspect.signature(fn)}"


def test_the_other_names_we_lean_on():
    assert isinstance(inspect.getattr_static(core.PicklingExecutor, "_submitit_command_str"), property)
    assert isinstance(inspect.getattr_static(core.Executor, "_valid_parameters"), classmethod)
    # the public pieces the hooks are built from
    assert {"folder", "job_id", "tasks"} <= set(inspect.signature(core.Job.__init__).parameters)
    assert {"additional_parameters", "setup", "use_srun", "stderr_to_stdout"} <= SlurmExecutor._valid_parameters()
    assert callable(submitit.core.utils.JobPaths.get_first_id_independent_folder)
    # a fresh executor never waits in its throttle: we make one per submission
    assert core.PicklingExecutor.__init__.__code__.co_names.count("_last_job_submitted") == 1


def test_the_pbs_plugin_is_registered():
    found = {e.name: e.value for e in metadata.entry_points(group="submitit")}
    assert found.get("executor") == "hpc_serverless.adapters.submitit_executors:PBSExecutor"
    assert found.get("job_environment") == "hpc_serverless.adapters.submitit_executors:PBSJobEnvironment"


def _tasks(n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(name="f", ref=SimpleNamespace(task_id=f"t{i}")) for i in range(n)]


def test_slurm_submits_through_the_transport(tmp_path: Path):
    calls: list[list[str]] = []

    def sbatch(argv, inp):
        calls.append(argv)
        return 0, f"{40 + len(calls)}\n", ""

    site = site_from_mapping({"scheduler": "slurm", "storage": str(tmp_path / "a b"), "python": "/opt/py"}, name="s")
    sched = SlurmScheduler(site, MockTransport(sbatch), str(tmp_path / "store"))
    assert sched.submit(_tasks(1), Target(), []) == ["41"]
    assert sched.submit(_tasks(3), Target(), ["41"]) == ["42_0", "42_1", "42_2"]
    assert [list(c[:2]) for c in calls] == [["sbatch", "--parsable"]] * 2
    jobs = tmp_path / "a b" / "jobs"
    single, array = (Path(c[-1]).read_text() for c in calls)
    # the log straight in jobs/, which exists before sbatch returns (see log_file)
    assert f"#SBATCH --output='{jobs}/%j_0_log.out'" in single
    assert f"#SBATCH --output='{jobs}/%A_%a_0_log.out'" in array and "--array=0-2" in array
    assert sorted(p.name for p in (jobs / "42_1").iterdir()) == ["42_1_submitted.pkl"]


def test_pbs_submits_through_the_transport(tmp_path: Path):
    calls: list[list[str]] = []

    def qsub(argv, inp):
        calls.append(argv)
        return 0, f"{7 + len(calls)}[].server\n", ""

    site = site_from_mapping({"scheduler": "pbs", "pbs_flavor": "pbspro", "storage": str(tmp_path),
                              "python": "/opt/py"}, name="p")
    sched = PBSScheduler(site, MockTransport(qsub), str(tmp_path / "store"))
    assert sched.submit(_tasks(1), Target(), []) == ["8"]
    assert sched.submit(_tasks(2), Target(), []) == ["9_0", "9_1"]
    assert calls[0][0] == "qsub" and "-J" not in calls[0]
    assert calls[1][calls[1].index("-J") + 1] == "0-1"
    assert "export HPC_SERVERLESS_STORE=" in Path(calls[1][-1]).read_text()


def test_a_refused_submission_leaves_no_script(tmp_path: Path):
    from hpc_serverless.core.errors import SchedulerError

    site = site_from_mapping({"scheduler": "slurm", "storage": str(tmp_path), "python": "/opt/py"}, name="s")
    sched = SlurmScheduler(site, MockTransport(lambda argv, inp: (1, "", "sbatch: error: invalid partition")),
                           str(tmp_path / "store"))
    with pytest.raises(SchedulerError, match="Slurm refused"):
        sched.submit(_tasks(1), Target(), [])
    assert not list((tmp_path / "jobs").glob(".submission_file_*"))
