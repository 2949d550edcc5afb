"""Site configuration files: validation, errors naming file/key/line, expansion."""

from pathlib import Path

import pytest

from hpc_serverless import QuantumServerless
from hpc_serverless.config.site import expand, load_site
from hpc_serverless.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "site_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_site_configs_are_valid(path):
    site = load_site(path)
    assert site.scheduler in ("slurm", "pbs") and site.storage


def test_expansion(monkeypatch):
    monkeypatch.setenv("HPCS_X", "/scratch/alice")
    monkeypatch.delenv("HPCS_UNSET", raising=False)
    assert expand("$HPCS_X/a") == "/scratch/alice/a"
    assert expand("${HPCS_X}/b") == "/scratch/alice/b"
    assert expand("${HPCS_UNSET:-/tmp/x}/c") == "/tmp/x/c"
    assert expand("$HPCS_UNSET/d") == "$HPCS_UNSET/d"  # left for the cluster's shell
    assert expand("~/e").startswith(str(Path.home()))


@pytest.mark.parametrize("text,match", [
    ("scheduler: slurm\nstorage: /x\npartiton: debug\n", r"site.yaml:3, key 'partiton': unknown key.*valid keys are"),
    ("scheduler: sge\nstorage: /x\n", r"site.yaml:1, key 'scheduler': must be one of 'slurm' or 'pbs'"),
    ("scheduler: slurm\n", r"key 'storage': required key 'storage' is missing"),
    ("scheduler: slurm\nstorage: /x\ndefaults:\n  cpus: 2\n", r"site.yaml:3, key 'defaults': unknown target key"),
    ("scheduler: slurm\nstorage: /x\nmpi:\n  launcher: srun\n", r"site.yaml:4, key 'mpi.launcher': unknown key.*command, args"),
    ("scheduler: slurm\nstorage: /x\npoll_interval: -1\n", r"key 'poll_interval'.*greater than 0"),
    ("scheduler: slurm\nstorage: /x\nresult_grace: -5\n", r"site.yaml:3, key 'result_grace'.*greater than or equal to 0"),
    ("scheduler: slurm\nstorage: /x\nresult_grace: soon\n", r"site.yaml:3, key 'result_grace'.*number"),
    ("scheduler: slurm\nstorage: /x\nsetup: [1, 2]\n", r"key 'setup'"),
    ("scheduler: slurm\nstorage: /x\nenv:\n  1X: y\n", r"key 'env'.*not an environment variable name"),
])
def test_bad_site_files_name_file_key_line(tmp_path, text, match):
    p = tmp_path / "site.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_site(p)


def test_provider_entry_errors_name_the_site_file(tmp_path):
    site = tmp_path / "mysite.yaml"
    site.write_text("scheduler: slurm\nstorage: /x\nqeue: a\n")
    cfg = tmp_path / "serverless.yaml"
    cfg.write_text("providers:\n  - name: cluster\n    site: mysite.yaml\n")
    with pytest.raises(ConfigError, match=r"mysite.yaml:3, key 'qeue'"):
        QuantumServerless.load_configuration(cfg)
    cfg.write_text("providers:\n  - name: cluster\n    site: nothere.yaml\n")
    with pytest.raises(ConfigError, match="nothere.yaml.*not found"):
        QuantumServerless.load_configuration(cfg)


@pytest.mark.parametrize("text,key,line", [
    ('scheduler: slurm\nstorage: "/tmp/s\\necho pwned"\n', "storage", 2),
    ('scheduler: slurm\nstorage: /tmp/s\nenv:\n  A: "x\\u001b[2Jy"\n', "env.A", 4),
    ('scheduler: slurm\nstorage: /tmp/s\nsetup:\n  - module load x\n  - "a\\rb"\n', "setup.1", 5),
    ('scheduler: slurm\nstorage: /tmp/s\ndefaults:\n  partition: "p\\u0000"\n', "defaults.partition", 4),
])
def test_control_characters_in_site_values_are_refused(tmp_path, text, key, line):
    """A value that reaches a batch script may not hold a newline or other control
    character (a newline in storage would end a comment line and run the rest as shell)."""
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="control character") as e:
        load_site(path)
    assert e.value.key == key and e.value.file == str(path) and e.value.line == line


def test_description_may_span_lines(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("scheduler: slurm\nstorage: /tmp/s\ndescription: |\n  two\n  lines\n")
    assert load_site(path).description == "two\nlines\n"
