"""QPU sweep: the energy of a 2-qubit Hamiltonian over a grid of ansatz angles.

    H = X X + h (Z I + I Z),        |psi(theta)> = CX (RY(theta) x I) |00>

The classical steps run as ordinary tasks on cores: one prepares the circuit and the
observable, one fits the scan afterwards. Each point of the grid is a task with
``target={"qpu": 1}``: it waits for a QPU as a job waits for a GPU, and the scheduler
(here the local pool, on a cluster Slurm or PBS) runs one such task per QPU at a time.
Inside, ``qpu()`` is the QPU it was given; the task transpiles for it, runs the estimator
and returns its energy with the times it started and ended, so the driver can say how
long the QPU was busy and check that no two tasks held the same QPU at once.

E(theta) = a + b cos(theta) + c sin(theta) for this ansatz, so a least-squares fit of the
scan gives the minimum, a - sqrt(b^2 + c^2), which is compared with the exact ground
energy -sqrt(1 + 4 h^2).

    python examples/qpu_sweep.py                       # local provider, its `aer` QPU
    python examples/qpu_sweep.py --points 16 --qpu aer
    python examples/qpu_sweep.py --config serverless.yaml --provider cluster --qpu fake
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import pairwise

import numpy as np
from qiskit import QuantumCircuit
from qiskit.circuit import Parameter
from qiskit.quantum_info import SparsePauliOp

from hpc_serverless import QuantumServerless, distribute_task, get, qpu

FIELD = 0.5  # h


@distribute_task(target={"cpu": 1})
def prepare(field: float) -> tuple[QuantumCircuit, SparsePauliOp]:
    """The ansatz (one parameter) and the Hamiltonian, on cores."""
    theta = Parameter("theta")
    circuit = QuantumCircuit(2)
    circuit.ry(theta, 0)
    circuit.cx(0, 1)
    hamiltonian = SparsePauliOp.from_list([("XX", 1.0), ("ZI", field), ("IZ", field)])
    return circuit, hamiltonian


@distribute_task(target={"qpu": 1})
def energy(problem: tuple[QuantumCircuit, SparsePauliOp], theta: float) -> dict:
    """<psi(theta)|H|psi(theta)> on the QPU this task holds, with its start and end times."""
    from qiskit.transpiler import generate_preset_pass_manager

    start = time.time()
    circuit, hamiltonian = problem
    q = qpu()
    isa = generate_preset_pass_manager(backend=q.backend(), optimization_level=1).run(circuit)
    job = q.estimator().run([(isa, hamiltonian.apply_layout(isa.layout), [theta])])
    value = float(job.result()[0].data.evs)
    return {"theta": theta, "energy": value, "qpu": q.name, "start": start, "end": time.time()}


@distribute_task(target={"cpu": 1})
def fit(thetas: list[float], energies: list[float], field: float) -> dict:
    """Least squares for E = a + b cos + c sin, its minimum, and the exact ground energy."""
    t = np.asarray(thetas)
    design = np.column_stack([np.ones_like(t), np.cos(t), np.sin(t)])
    (a, b, c), *_ = np.linalg.lstsq(design, np.asarray(energies), rcond=None)
    h = SparsePauliOp.from_list([("XX", 1.0), ("ZI", field), ("IZ", field)]).to_matrix()
    return {"a": a, "b": b, "c": c, "theta_min": float(np.arctan2(-c, -b)),
            "e_min": float(a - np.hypot(b, c)), "exact": float(np.linalg.eigvalsh(h)[0])}


def overlaps(points: list[dict]) -> list[str]:
    """Pairs of tasks that held the same QPU at the same time (there should be none)."""
    found = []
    for name in sorted({p["qpu"] for p in points}):
        held = sorted((p["start"], p["end"]) for p in points if p["qpu"] == name)
        found += [f"{name}: {s1:.3f}-{e1:.3f} and {s2:.3f}-{e2:.3f}"
                  for (s1, e1), (s2, e2) in pairwise(held) if s2 < e1]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", help="provider name (default: the configuration's default)")
    parser.add_argument("--config", help="a serverless configuration file (YAML or JSON)")
    parser.add_argument("--points", type=int, default=8, help="angles in the grid (at least 3; default 8)")
    parser.add_argument("--qpu", help="the QPU to use, by name (default: any one the provider has)")
    args = parser.parse_args(argv)
    if args.points < 3:
        parser.error("--points must be at least 3 (the fit has three coefficients)")

    serverless = QuantumServerless.load_configuration(args.config) if args.config else QuantumServerless()
    on_qpu = energy.options(qpu=args.qpu) if args.qpu else energy
    thetas = np.linspace(-np.pi, np.pi, args.points, endpoint=False).tolist()

    t0 = time.time()
    with serverless.context(args.provider):
        problem = prepare(FIELD)  # a TaskRef: the QPU tasks wait for it, and get its value
        points = get([on_qpu(problem, theta) for theta in thetas])
        result = get(fit(thetas, [p["energy"] for p in points], FIELD))
    wall = time.time() - t0

    print(f"{'theta':>8} {'energy':>10} {'qpu':>6} {'seconds':>8}")
    for p in points:
        print(f"{p['theta']:+8.4f} {p['energy']:+10.6f} {p['qpu']:>6} {p['end'] - p['start']:8.3f}")
    print(f"fit: E = {result['a']:+.4f} {result['b']:+.4f} cos(theta) {result['c']:+.4f} sin(theta); "
          f"minimum {result['e_min']:+.6f} at theta {result['theta_min']:+.4f}, "
          f"exact ground energy {result['exact']:+.6f}")
    busy = sum(p["end"] - p["start"] for p in points)
    used = sorted({p["qpu"] for p in points})
    if len(used) > 1:
        print(f"note: the points ran on {len(used)} QPUs ({', '.join(used)}); --qpu NAME keeps a scan on one")
    print(f"wall time {wall:.2f} s, QPU busy {busy:.2f} s, ratio {busy / wall:.2f}")

    clashes = overlaps(points)
    if clashes:
        print("error: tasks held the same QPU at once: " + "; ".join(clashes), file=sys.stderr)
        return 1
    print(f"QPU intervals: {len(points)} tasks, none overlapping on the same QPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
