"""Benchmark: a graph of dependent tasks, transpile then estimate, for several backends.

For each of `n_backends` fake backends (qiskit's ``GenericBackendV2``, 5 qubits and up),
a ``transpile_remote`` task transpiles `n_circuits` random circuits for that backend,
and its ``TaskRef`` goes straight into an ``estimator_remote`` task, which runs after it
and computes one expectation value per circuit with qiskit-aer's ``EstimatorV2``.
The circuits and their observables (sums of random Pauli strings) are ``put`` once and
shared by every task. The whole graph is submitted `n_graphs` times; every result is
collected with one ``get`` at the end, and the wall time from the first ``put`` to the
last value is printed as ``Execution time: <seconds>``.

Run it directly::

    python examples/benchmark.py --n-graphs 2
    python examples/benchmark.py --config serverless.yaml --provider cluster

or as a Program, with the same settings as arguments (underscores)::

    Program(title="benchmark", entrypoint="benchmark.py", working_dir="examples/")
    serverless.run_program(program, arguments={"n_graphs": 3, "n_qubits": 5})

Settings: ``DEFAULTS`` below, overridden by ``get_arguments()`` (when running as a
Program), overridden in turn by the command-line flags that are given explicitly.
As a Program it also calls ``save_result`` with the values and the execution time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from hpc_serverless import (
    QuantumServerless,
    distribute_task,
    get,
    get_arguments,
    put,
    save_result,
)
from hpc_serverless.core.jobs import JOB_DIR_ENV  # set only inside a Program

DEFAULTS = {
    "n_qubits": 4,  # qubits per random circuit
    "depth": 4,  # depth of each random circuit
    "n_circuits": 4,  # circuits (and observables) per graph
    "n_graphs": 1,  # times the whole graph is submitted
    "n_backends": 3,  # fake backends, each a transpile -> estimate pair of tasks
    "optimization_level": 1,  # transpiler optimization level
    "seed": 42,  # seeds circuits, observables, backends and the transpiler
    "provider": None,  # provider name (None: the default provider)
    "config": None,  # serverless configuration file (YAML or JSON)
}


@distribute_task(target={"cpu": 1})
def transpile_remote(circuits, backend, optimization_level, seed):
    from qiskit import transpile

    return transpile(circuits, backend, optimization_level=optimization_level, seed_transpiler=seed)


@distribute_task(target={"cpu": 1})
def estimator_remote(circuits, observables):
    from qiskit_aer.primitives import EstimatorV2

    # a transpiled circuit acts on the backend's qubits: lay the observable out the same way
    pubs = [(c, obs.apply_layout(c.layout)) for c, obs in zip(circuits, observables, strict=True)]
    return [float(r.data.evs) for r in EstimatorV2().run(pubs).result()]


def settings(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in DEFAULTS.items():
        kind = str if name in ("provider", "config") else int
        parser.add_argument(
            "--" + name.replace("_", "-"), type=kind, default=None, help=f"default: {default}"
        )
    flags = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    arguments = get_arguments()
    unknown = sorted(set(arguments) - set(DEFAULTS))
    if unknown:
        parser.error(f"unknown program arguments {unknown}; valid: {', '.join(DEFAULTS)}")
    return {**DEFAULTS, **arguments, **flags}


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from qiskit.circuit.random import random_circuit
    from qiskit.providers.fake_provider import GenericBackendV2
    from qiskit.quantum_info import SparsePauliOp, random_pauli_list

    s = settings(argv)
    seed = s["seed"]
    circuits = [
        random_circuit(s["n_qubits"], s["depth"], measure=False, seed=seed + i)
        for i in range(s["n_circuits"])
    ]
    rng = np.random.default_rng(seed)
    n_terms = 2 * s["n_qubits"]  # each observable: a sum of random Pauli strings, real coefficients
    observables = [
        SparsePauliOp(
            random_pauli_list(s["n_qubits"], n_terms, seed=rng, phase=False),
            coeffs=rng.uniform(-1, 1, n_terms),
        )
        for _ in range(s["n_circuits"])
    ]
    backends = [
        GenericBackendV2(num_qubits=max(5, s["n_qubits"]) + i, seed=seed + i) for i in range(s["n_backends"])
    ]

    serverless = QuantumServerless.load_configuration(s["config"]) if s["config"] else QuantumServerless()
    print(f"{serverless}; settings: {s}")

    start = time.perf_counter()
    with serverless.context(s["provider"]):
        circuits_ref, observables_ref = put(circuits), put(observables)  # once, shared by all
        refs = []
        for _ in range(s["n_graphs"]):
            for backend in backends:
                transpiled = transpile_remote(circuits_ref, backend, s["optimization_level"], seed)
                refs.append(estimator_remote(transpiled, observables_ref))  # runs after its transpile
        flat = get(refs)  # everything, in submission order
    execution_time = time.perf_counter() - start

    n = s["n_backends"]
    results = [flat[g * n : (g + 1) * n] for g in range(s["n_graphs"])]  # [graph][backend][circuit]
    print(f"Execution time: {execution_time:.3f}")
    for g, graph in enumerate(results):
        for backend, values in zip(backends, graph, strict=True):
            print(f"graph {g} {backend.name} ({backend.num_qubits}q): {[round(v, 6) + 0.0 for v in values]}")
    # the fake backends are noiseless: every backend and graph should give the same values
    spread = max(max(col) - min(col) for col in zip(*flat, strict=True)) if flat else 0.0
    print(f"largest difference between backends: {spread:.3g}")

    if os.environ.get(JOB_DIR_ENV):  # running as a Program
        save_result(
            {
                "results": results,
                "backends": [b.name for b in backends],
                "settings": s,
                "execution_time": execution_time,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
