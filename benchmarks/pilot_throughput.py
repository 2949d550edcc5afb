"""Pilot mode vs job modes on a Slurm site: no-op tasks/s, time to the first result, and
the seed's benchmark graph (examples/benchmark.py).

    python benchmarks/pilot_throughput.py [--pilot-site site_configs/localhost-slurm-pilot.yaml]
        [--jobs-site site_configs/localhost-slurm.yaml] [--sizes 100 1000 10000]
        [--job-cap 1000] [--no-graph] [--json out.json]

For each size N, N no-op tasks are submitted in a loop and collected with get():

* pilot: through the pilot site's dask workers (a few long Slurm jobs); the cluster is
  started (and its first worker awaited) before the runs, and that start-up is printed
  on its own line;
* arrays: the job site as it is (calls close together become one job array);
* one job per task: the job site with ``arrays: False``.

Job modes are capped at --job-cap tasks (the test cluster runs about four jobs a
second, so 10,000 of them would take most of an hour); a capped row says so. Then the
seed's benchmark graph (transpile -> estimate, 3 backends x --n-graphs) runs in pilot
and in job mode (needs qiskit and qiskit-aer). Needs a running cluster
(tests/cluster/up.sh for the test one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hpc_serverless import QuantumServerless, SlurmProvider, distribute_task, get, wait
from hpc_serverless.config.site import load_site
from hpc_serverless.providers.batch import BatchProvider
from hpc_serverless.providers.pilot import PilotProvider

ROOT = Path(__file__).resolve().parents[1]


@distribute_task
def noop(i: int) -> int:
    return i


def run(provider: BatchProvider, n: int) -> dict[str, Any]:
    counts = provider.transport.counts
    before = dict(counts)
    s = QuantumServerless().add_provider(provider)
    t0 = time.perf_counter()
    with s.context(provider.name):
        refs = [noop(i) for i in range(n)]
    wait(refs, num_returns=1, timeout=3600)
    first = time.perf_counter() - t0
    values = get(refs, timeout=7200)
    wall = time.perf_counter() - t0
    assert values == list(range(n)), "wrong values"
    used = {k: v - before.get(k, 0) for k, v in counts.items() if v != before.get(k, 0)}
    return {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall, "first_result_s": first,
            "sbatch": used.get("sbatch", 0), "commands": used}


def line(label: str, r: dict[str, Any], note: str = "") -> str:
    return (f"  {label:<17} {r['tasks']:6d} tasks {r['wall_s']:8.2f} s {r['tasks_per_s']:9.1f} tasks/s  "
            f"first {r['first_result_s']:6.2f} s  sbatch {r['sbatch']:4d}{note}")


def graph(site_path: str | None, n_graphs: int, extra: list[str] | None = None) -> float | None:
    """examples/benchmark.py on a site (None: the local provider), in a fresh process; its
    'Execution time'. `extra`: more flags for it (e.g. ["--n-circuits", "8"])."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "serverless.yaml"
        cluster = f"  - name: cluster\n    site: {site_path}\n" if site_path else ""
        config.write_text(f"providers:\n  - name: local\n{cluster}")
        out = subprocess.run([sys.executable, str(ROOT / "examples/benchmark.py"), "--config", str(config),
                              "--provider", "cluster" if site_path else "local", "--n-graphs", str(n_graphs),
                              *(extra or [])],
                             capture_output=True, text=True, timeout=1800, env={**os.environ})
    found = re.search(r"Execution time: ([0-9.]+)", out.stdout)
    if out.returncode != 0 or not found:
        print(f"  benchmark graph failed on {site_path or 'local'}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
        return None
    return float(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pilot-site", default=str(ROOT / "site_configs/localhost-slurm-pilot.yaml"))
    ap.add_argument("--jobs-site", default=str(ROOT / "site_configs/localhost-slurm.yaml"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--job-cap", type=int, default=1000, help="most tasks per run in job modes")
    ap.add_argument("--n-graphs", type=int, default=2)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    rows: dict[str, Any] = {"pilot": [], "arrays": [], "one_per_task": []}
    pilot = PilotProvider("pilot", site=load_site(a.pilot_site))
    t0 = time.perf_counter()
    pilot.start(wait=True, timeout=300)
    startup = time.perf_counter() - t0
    print(f"pilot start-up: first worker connected after {startup:.2f} s "
          f"({pilot.describe()})")
    rows["pilot_startup_s"] = startup
    for n in a.sizes:
        rows["pilot"].append(run(pilot, n))
    rows["pilot_jobs"] = pilot.pilot_jobs()
    pilot.close()

    site = load_site(a.jobs_site)
    arrays = SlurmProvider("arrays", site=site)
    single = SlurmProvider("single", site=site.model_copy(update={"arrays": False}))
    done: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for n in a.sizes:
        m = min(n, a.job_cap)
        if m not in done:  # a capped size is the run of the cap: measured once
            done[m] = (run(arrays, m), run(single, m))
        rows["arrays"].append(done[m][0])
        rows["one_per_task"].append(done[m][1])
    arrays.backend.close()
    single.backend.close()

    print(f"\nno-op tasks (pilot: {len(rows['pilot_jobs'])} pilot jobs in all; start-up {startup:.2f} s "
          "not included below)")
    for i, n in enumerate(a.sizes):
        p, ar, one = rows["pilot"][i], rows["arrays"][i], rows["one_per_task"][i]
        note = f"  (capped at {a.job_cap} of {n}: the cluster runs ~4 jobs/s)" if n > a.job_cap else ""
        print(f"N={n}")
        print(line("pilot", p))
        print(line("job arrays", ar, note))
        print(line("one job per task", one, note))
        print(f"  pilot / one job per task: x{p['tasks_per_s'] / one['tasks_per_s']:.0f} tasks/s, "
              f"first result x{one['first_result_s'] / max(p['first_result_s'], 1e-6):.0f} sooner; "
              f"pilot / arrays: x{p['tasks_per_s'] / ar['tasks_per_s']:.0f} tasks/s")

    if not a.no_graph:
        try:
            import qiskit  # noqa: F401
            import qiskit_aer  # noqa: F401
        except ImportError:
            print("\nbenchmark graph skipped: needs qiskit and qiskit-aer")
        else:
            gp = graph(a.pilot_site, a.n_graphs)
            gj = graph(a.jobs_site, a.n_graphs)
            rows["graph"] = {"pilot_s": gp, "jobs_s": gj, "n_graphs": a.n_graphs}
            print(f"\nseed benchmark graph (examples/benchmark.py, {a.n_graphs} graphs x 3 backends, "
                  "transpile -> estimate, cold start included):")
            print(f"  pilot mode {gp if gp is not None else float('nan'):7.2f} s   job mode "
                  f"{gj if gj is not None else float('nan'):7.2f} s"
                  + (f"   job / pilot x{gj / gp:.1f}" if gp and gj else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
