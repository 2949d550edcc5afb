"""QuantumServerless, providers in context, configuration files, the import surface."""

import json
import subprocess
import sys

import pytest

import hpc_serverless as hs
from hpc_serverless import LocalProvider, QuantumServerless, distribute_task, get, put
from hpc_serverless.api import current_provider
from hpc_serverless.core.errors import ConfigError, UnknownProviderError


@distribute_task
def where():
    import os
    return os.environ.get("HPC_SERVERLESS_STORE", "")


def test_import_is_light():
    code = ("import sys, hpc_serverless; heavy = [m for m in ('qiskit', 'numpy', 'dask', 'paramiko', "
            "'submitit', 'distributed', 'mpi4py') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names():
    names = ["QuantumServerless", "distribute_task", "put", "get", "wait", "Program", "Job",
             "ObjectRef", "TaskRef", "Target", "LocalProvider", "get_arguments", "save_result",
             "HPCServerlessError"]
    for name in names:
        assert name in hs.__all__ and getattr(hs, name)
    assert hs.__all__ == sorted(hs.__all__)


def test_default_has_local():
    s = QuantumServerless()
    assert repr(s) == "<QuantumServerless: providers [local]>"
    assert s.provider().name == "local"


def test_context_and_set_provider(tmp_path):
    tmp_path.chmod(0o700)
    other = LocalProvider("other", store=tmp_path / "other-store")
    s = QuantumServerless({"providers": [{"name": "local"}]}).add_provider(other)
    assert str(s) == "<QuantumServerless: providers [local, other]>"
    with s.context("other") as p:
        assert p is other and current_provider() is other
        ref = put(123)
        assert ref.provider == "other" and str(tmp_path) in ref.store_root
        with s.context():
            assert current_provider().name == "local"
        assert current_provider() is other
    assert current_provider().name == "local"
    assert s.set_provider("other") is s
    assert current_provider() is other
    assert get(ref) == 123
    s.set_provider(s.provider("local"))
    assert current_provider().name == "local"


def test_unknown_provider_lists_names():
    s = QuantumServerless()
    with pytest.raises(UnknownProviderError, match="unknown provider 'clutser'.*local"):
        with s.context("clutser"):
            pass
    with pytest.raises(KeyError):
        s.set_provider("nope")


def test_load_configuration_yaml_and_json(tmp_path):
    y = tmp_path / "serverless.yaml"
    y.write_text("providers:\n  - name: local\n  - name: mine\n    cpus: 1\ndefault: mine\n")
    s = QuantumServerless.load_configuration(y)
    assert repr(s) == "<QuantumServerless: providers [local, mine]>"
    assert s.provider().name == "mine"
    j = tmp_path / "serverless.json"
    j.write_text(json.dumps({"providers": [{"name": "local"}]}))
    assert repr(QuantumServerless.load_configuration(j)) == "<QuantumServerless: providers [local]>"


@pytest.mark.parametrize("text,match", [
    ("providers:\n  - name: local\n    cpuz: 2\n", r"serverless.yaml:3, key 'providers\[0\].cpuz'.*unknown key"),
    ("providers: [\n", r"serverless.yaml:\d+: malformed YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("provders: []\n", r"key 'provders'.*valid keys are: providers, default"),
    ("providers:\n  - cpus: 2\n", r"needs a 'name'"),
    ("providers:\n  - name: a\n  - name: a\n", r"appears twice"),
    ("providers:\n  - name: a\ndefault: b\n", r"default provider 'b' is not one of"),
])
def test_malformed_configuration_names_file_key_line(tmp_path, text, match):
    p = tmp_path / "serverless.yaml"
    p.write_text(text)
    with pytest.raises((ConfigError, UnknownProviderError), match=match):
        QuantumServerless.load_configuration(p)


def test_missing_and_bad_json_configuration(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml.*not found"):
        QuantumServerless.load_configuration(tmp_path / "nope.yaml")
    bad = tmp_path / "c.json"
    bad.write_text('{"providers": [}')
    with pytest.raises(ConfigError, match=r"c.json:1: malformed JSON"):
        QuantumServerless.load_configuration(bad)
    with pytest.raises(ConfigError, match="mapping"):
        QuantumServerless(["local"])  # type: ignore[arg-type]
