"""Quickstart: expectation values of three circuits, computed in parallel tasks.

This is the Qiskit Serverless tutorial's "Assembling all together" example on
hpc_serverless and qiskit 2.x primitives. It shows the whole programming model:

* ``@distribute_task`` turns a function into a remote task: calling it returns a
  ``TaskRef`` at once, and several calls run in parallel;
* ``put`` stores an object (here the observable) once; the ``ObjectRef`` is passed
  to every task instead of a copy;
* ``get`` waits for the tasks and returns their values, in order;
* ``with serverless.context():`` chooses where the tasks run.

The same values are then computed directly in this process, as a check.

    python examples/quickstart.py                         # on this machine
    python examples/quickstart.py --config serverless.yaml --provider cluster
"""

from __future__ import annotations

import argparse
import sys

from qiskit.circuit.random import random_circuit
from qiskit.primitives import StatevectorEstimator
from qiskit.quantum_info import SparsePauliOp

from hpc_serverless import QuantumServerless, distribute_task, get, put


@distribute_task(target={"cpu": 1})
def exp_val_remote(circuit, obs):
    estimator = StatevectorEstimator()
    return float(estimator.run([(circuit, obs)]).result()[0].data.evs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", help="provider name (default: the configuration's default)")
    parser.add_argument("--config", help="a serverless configuration file (YAML or JSON)")
    args = parser.parse_args(argv)

    serverless = QuantumServerless.load_configuration(args.config) if args.config else QuantumServerless()

    circuits = [random_circuit(2, 2, measure=False, seed=seed) for seed in (3, 7, 12)]
    observable = SparsePauliOp(["IZ"])

    with serverless.context(args.provider):
        obs_ref = put(observable)  # stored once, passed by reference to every task
        refs = [exp_val_remote(circuit, obs_ref) for circuit in circuits]
        exp_vals = get(refs)

    # the same values, computed here
    estimator = StatevectorEstimator()
    direct = [float(estimator.run([(c, observable)]).result()[0].data.evs) for c in circuits]

    for i, (remote, local) in enumerate(zip(exp_vals, direct, strict=True)):
        print(f"circuit {i}: serverless {remote:+.12f} direct {local:+.12f}")
    print(f"expectation values: {exp_vals}")

    worst = max(abs(a - b) for a, b in zip(exp_vals, direct, strict=True))
    if worst > 1e-9:
        print(f"error: serverless and direct values differ by {worst:.3g} (> 1e-9)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
