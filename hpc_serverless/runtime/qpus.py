"""Inside a task or Program: the QPUs its job holds, as handles to run circuits on.

``qpu()`` is the task's one QPU, ``qpus()`` all of them. Which ones the job holds is read
from the scheduler that granted them (``scontrol show job`` for gres and licenses,
``qstat -f`` for PBS resources, the variables IBM's QPU plugin or hook sets, the local
pool's own grant), never from what the client asked: with ``{"qpu": 1}`` only the
scheduler knows which QPU it picked. What each QPU is (its type and options) comes with
the job (core/qpus.py, the plan); credentials come from the job's environment, in the
variables the site names.

Handles build their backend and primitives on first use and keep them; the quantum
packages are imported only then (qiskit-aer for `aer`, qiskit-ibm-runtime for `fake`
and `qiskit-ibm-runtime`, qrmi for `qrmi`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from typing import Any, Mapping

from hpc_serverless.core.errors import QPUError
from hpc_serverless.core.qpus import GRANTED_ENV, PLAN_ENV, QpuAsk, QpuDevice, names_of_resources
from hpc_serverless.runtime.qpu_grants import (
    granted_from_plugin_env,
    granted_from_qstat,
    granted_from_scontrol,
)

__all__ = ["QPU", "qpu", "qpus"]

#: the variable a `qiskit-ibm-runtime` QPU reads its API key from when the site names none
DEFAULT_TOKEN_ENV = "QISKIT_IBM_TOKEN"

_lock = threading.Lock()
_cache: dict[tuple[str, str, str], list[QPU]] = {}


class QPU:
    """A QPU this job holds: ``name`` (the site's), ``type``, and on first use
    :meth:`backend` (a qiskit ``BackendV2``, for transpiling), :meth:`sampler` and
    :meth:`estimator` (V2 primitives that run on it)."""

    def __init__(self, device: QpuDevice) -> None:
        self.device = device
        self._backend: Any = None

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def type(self) -> str:
        return self.device.type

    def __repr__(self) -> str:
        return f"<QPU {self.name!r} ({self.type})>"

    def backend(self) -> Any:
        """The device as a qiskit ``BackendV2`` (its target is what circuits are transpiled to)."""
        if self._backend is None:
            self._backend = _BACKENDS[self.type](self)
        return self._backend

    def sampler(self, **options: Any) -> Any:
        """A ``SamplerV2`` that runs on this QPU; `options` go to the primitive."""
        return _primitive(self, "sampler", options)

    def estimator(self, **options: Any) -> Any:
        """An ``EstimatorV2`` that runs on this QPU; `options` go to the primitive."""
        return _primitive(self, "estimator", options)

    # -- credentials ------------------------------------------------------------------------------
    def _token(self) -> str:
        """The API key of a cloud QPU, from the job's environment (the variable the site names)."""
        var = self.device.token_env or DEFAULT_TOKEN_ENV
        value = os.environ.get(var, "").strip()
        if not value:
            raise QPUError(
                f"QPU {self.name!r} ({self.type}) needs its API key in the environment variable ${var}, which "
                "is not set in this job. Set it on the cluster side (e.g. a `setup:` line of the site file "
                "that sources a private file, or your login shell); credentials never travel with tasks "
                f"or the store" + ("" if self.device.token_env else " (or name another variable with the "
                                   "QPU's `token_env:` key)"))
        return value


def qpus() -> list[QPU]:
    """The QPUs this task or Program holds, as its scheduler granted them."""
    plan = os.environ.get(PLAN_ENV)
    if not plan:
        raise QPUError("this code holds no QPU: qpu() and qpus() work inside a task or Program whose target "
                       "asks for one, e.g. @distribute_task(target={'qpu': 1})")
    key = (plan, os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or "",
           os.environ.get(GRANTED_ENV, ""))
    with _lock:
        found = _cache.get(key)
        if found is None:
            ask = QpuAsk.from_plan(plan)
            by_name = {d.name: d for d in ask.devices}
            found = [QPU(by_name[n]) for n in granted_names(ask, os.environ)]
            _cache.clear()  # (one task at a time per process; a pool worker moves on)
            _cache[key] = found
    return list(found)


def qpu() -> QPU:
    """The one QPU this task or Program holds (QPUError if it holds several: use qpus())."""
    held = qpus()
    if len(held) != 1:
        raise QPUError(f"this task holds {len(held)} QPUs ({', '.join(q.name for q in held)}); qpu() is for "
                       "a task with one: use qpus()")
    return held[0]


# -- what the scheduler granted ----------------------------------------------------------------------
def granted_names(ask: QpuAsk, env: Mapping[str, str]) -> list[str]:
    """The names of the QPUs the job holds, asked of whatever counted them."""
    how = ask.counted_by
    if how == "slots":
        resources = [n for n in env.get(GRANTED_ENV, "").split(",") if n]
        source = "the local pool"
    elif how in ("spank", "qrmi"):
        got = granted_from_plugin_env(env)
        if got is None:
            why = env.get("QRMI_PLUGIN_ERROR")
            raise QPUError("IBM's QPU plugin set no QRMI_JOB_QPU_RESOURCES in this job"
                           + (f" (it says: {why})" if why else "; is the plugin installed on this cluster "
                              "(plugstack.conf / the PBS hook)?"))
        resources, source = got, "IBM's QPU plugin (QRMI_JOB_QPU_RESOURCES)"
    elif how in ("gres", "licenses"):
        job = env.get("SLURM_JOB_ID")
        if not job:
            raise QPUError("this task's QPU was counted by Slurm, but it runs outside a Slurm job")
        text = _ask_scheduler(["scontrol", "show", "job", "-d", job])
        resources, source = granted_from_scontrol(text, how), f"`scontrol show job -d {job}`"
    elif how == "resource":
        job = env.get("PBS_JOBID")
        if not job:
            raise QPUError("this task's QPU was counted by PBS, but it runs outside a PBS job")
        qstat = os.path.join(env.get("HPC_SERVERLESS_COMMANDS_DIR", ""), "qstat")
        text = _ask_scheduler([qstat, "-f", job])
        resources = granted_from_qstat(text, [d.scheduler_name for d in ask.devices], how)
        source = f"`qstat -f {job}`"
    else:
        raise QPUError(f"QPUs counted by {how!r} are not known to this version of hpc_serverless")
    names = names_of_resources(resources, ask.devices)
    if len(names) < ask.count or any(n not in ask.choices for n in names):
        raise QPUError(f"the job should hold {ask.count} of the QPUs {', '.join(ask.choices)}, but {source} "
                       f"says it holds {', '.join(resources) or 'none'}")
    return names


def _ask_scheduler(argv: list[str]) -> str:
    if not (os.path.sep in argv[0] or shutil.which(argv[0])):
        raise QPUError(f"cannot ask the scheduler which QPU this job holds: {argv[0]} is not on this node's PATH")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise QPUError(f"cannot ask the scheduler which QPU this job holds: {' '.join(argv)}: {exc}") from None
    if result.returncode != 0:
        raise QPUError(f"cannot ask the scheduler which QPU this job holds: {' '.join(argv)} exited "
                       f"{result.returncode}: {result.stderr.strip()[-300:]}")
    return result.stdout


# -- backends and primitives, by type ----------------------------------------------------------------
def _need(module: str, extra: str, qpu: QPU) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise QPUError(f"QPU {qpu.name!r} of type {qpu.type!r} needs the package {module.split('.')[0]!r} "
                       f"in the job's python: pip install 'hpc-serverless[{extra}]'") from None


def _aer_backend(qpu: QPU) -> Any:
    aer = _need("qiskit_aer", "qiskit", qpu)
    return aer.AerSimulator(**dict(qpu.device.options))


def _fake_backend(qpu: QPU) -> Any:
    provider = _need("qiskit_ibm_runtime.fake_provider", "ibm", qpu)
    cls = getattr(provider, qpu.device.backend or "", None)
    if cls is None:
        raise QPUError(f"QPU {qpu.name!r}: qiskit_ibm_runtime.fake_provider has no {qpu.device.backend!r} "
                       "(the site's `backend:`); e.g. FakeManilaV2 (5 qubits) or FakeNairobiV2 (7)")
    return cls()


def _service_backend(qpu: QPU) -> Any:
    runtime = _need("qiskit_ibm_runtime", "ibm", qpu)
    token = qpu._token()
    opts = dict(qpu.device.options)
    service = runtime.QiskitRuntimeService(channel=opts.pop("channel", "ibm_quantum_platform"), token=token,
                                           **opts)
    return service.backend(qpu.device.backend or qpu.name)


def _qrmi_resource(qpu: QPU) -> Any:
    primitives = _need("qrmi.primitives", "qrmi", qpu)
    resource = primitives.QRMIService().resource(qpu.device.scheduler_name)
    if resource is None:
        raise QPUError(f"QRMI resource {qpu.device.scheduler_name!r} is not accessible in this job: the plugin "
                       f"did not acquire it, or its {qpu.device.scheduler_name}_QRMI_* variables are missing")
    return resource


def _qrmi_backend(qpu: QPU) -> Any:
    ibm = _need("qrmi.primitives.ibm", "qrmi", qpu)
    return ibm.get_backend(_qrmi_resource(qpu))


_BACKENDS = {"aer": _aer_backend, "fake": _fake_backend, "qiskit-ibm-runtime": _service_backend,
             "qrmi": _qrmi_backend}


def _primitive(qpu: QPU, kind: str, options: Mapping[str, Any]) -> Any:
    """A V2 sampler or estimator on the QPU: Aer's primitives on the simulator (for `fake`,
    Aer with the fake device's noise model, as qiskit-ibm-runtime's local mode does), the
    service's own primitives for `qiskit-ibm-runtime`, QRMI's for `qrmi`."""
    cls_name = "SamplerV2" if kind == "sampler" else "EstimatorV2"
    if qpu.type in ("aer", "fake"):
        primitives = _need("qiskit_aer.primitives", "qiskit", qpu)
        return getattr(primitives, cls_name).from_backend(qpu.backend(), **options)
    if qpu.type == "qiskit-ibm-runtime":
        import warnings

        runtime = _need("qiskit_ibm_runtime", "ibm", qpu)
        with warnings.catch_warnings():  # (0.50 announced their successors; these are the V2 interface)
            warnings.simplefilter("ignore", DeprecationWarning)
            return getattr(runtime, cls_name)(mode=qpu.backend(), options=dict(options) or None)
    ibm = _need("qrmi.primitives.ibm", "qrmi", qpu)
    return getattr(ibm, cls_name)(_qrmi_resource(qpu), options=dict(options))
