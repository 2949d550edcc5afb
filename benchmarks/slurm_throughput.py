"""Tasks/s and scheduler commands per task on a Slurm site: job arrays vs one job per task.

    python benchmarks/slurm_throughput.py [--site site_configs/localhost-slurm.yaml] [--sizes 10 200]

For each size N, N no-op tasks are submitted in a loop and collected with get(): once
with the site's arrays (one sbatch per array), once with one sbatch per task. Prints
wall time, tasks/s, time to the first result, and the scheduler commands issued per
task (sbatch, sacct, squeue, scancel, ...) counted by the transport, plus the ratio
arrays / one-per-task. Needs a running cluster (tests/cluster/up.sh for the test one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hpc_serverless import QuantumServerless, SlurmProvider, distribute_task, get, wait
from hpc_serverless.config.site import load_site


@distribute_task
def noop(i: int) -> int:
    return i


def run(provider: SlurmProvider, n: int) -> dict[str, float]:
    s = QuantumServerless().add_provider(provider)
    before = dict(provider.transport.counts)
    t0 = time.perf_counter()
    with s.context(provider.name):
        refs = [noop(i) for i in range(n)]
    done, _ = wait(refs, num_returns=1, timeout=600)
    first = time.perf_counter() - t0
    values = get(refs, timeout=1800)
    wall = time.perf_counter() - t0
    assert values == list(range(n))
    used = {k: v - before.get(k, 0) for k, v in provider.transport.counts.items() if v != before.get(k, 0)}
    scheduler_cmds = sum(v for k, v in used.items() if k in ("sbatch", "sacct", "squeue", "scancel"))
    return {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall, "first_result_s": first,
            "commands": used, "commands_per_task": scheduler_cmds / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site", default="site_configs/localhost-slurm.yaml")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    site = load_site(a.site)
    arrays = SlurmProvider("arrays", site=site)
    single = SlurmProvider("single", site=site.model_copy(update={"arrays": False}))
    rows = []
    for n in a.sizes:
        ra = run(arrays, n)
        rs = run(single, n)
        rows.append({"arrays": ra, "one_per_task": rs})
        print(f"N={n:5d}  arrays: {ra['wall_s']:6.1f} s  {ra['tasks_per_s']:6.1f} tasks/s  first "
              f"{ra['first_result_s']:5.1f} s  {ra['commands_per_task']:.3f} cmds/task {ra['commands']}")
        print(f"         one job per task: {rs['wall_s']:6.1f} s  {rs['tasks_per_s']:6.1f} tasks/s  first "
              f"{rs['first_result_s']:5.1f} s  {rs['commands_per_task']:.3f} cmds/task {rs['commands']}")
        print(f"         ratio arrays/one-per-task: speed x{ra['tasks_per_s'] / rs['tasks_per_s']:.2f}, "
              f"commands x{ra['commands_per_task'] / rs['commands_per_task']:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
