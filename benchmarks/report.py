"""One command for a reproducible performance report: every figure beside its baseline,
measured in the same run, and their ratio.

    python benchmarks/report.py [--out DIR] [--quick] [--no-cluster] [--job-cap N] [--pilot-max N]

Writes DIR (default benchmarks/results/<timestamp>/): results.json (all figures and a
description of the machine), report.md (Markdown tables) and PNG plots. Sections:

* local: no-op task overhead of the local provider vs ProcessPoolExecutor, dask
  LocalCluster and Ray (if installed), same worker count; put+get vs numpy.save+load and
  vs shutil.copyfile of a file of the same size, in the same directory;
* cluster (when `sinfo` answers and --no-cluster is not given): tasks/s and time to the
  first result for one job per task, job arrays and pilot mode, vs plain submitit
  (SlurmExecutor.map_array) and plain dask-jobqueue (SLURMCluster + client.map); scheduler
  commands per minute while 1,000 tasks are tracked; programs submitted per second over
  SSH; a scaling curve (pilot up to 10,000 tasks, job modes capped at --job-cap);
* quantum: examples/benchmark.py at three sizes on local, job (arrays) and pilot modes;
  K Estimator observables on one circuit as one PUB vs K runs of one PUB each.

--quick uses tiny sizes (a smoke test, well under 90 s without the cluster).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import local_overhead, pilot_throughput, slurm_throughput, ssh_programs  # noqa: E402

JOBS_SITE = ROOT / "site_configs/localhost-slurm.yaml"
PILOT_SITE = ROOT / "site_configs/localhost-slurm-pilot.yaml"

FULL = {"tasks": 10_000, "gib": 1.0, "job_sizes": [10, 100, 300], "pilot_sizes": [10, 100, 1000, 10_000],
        "tracked": 1000, "window_s": 60.0, "ssh_n": 20, "graphs": [1, 2, 4], "k_obs": 64}
QUICK = {"tasks": 300, "gib": 0.02, "job_sizes": [4], "pilot_sizes": [10, 100],
         "tracked": 50, "window_s": 8.0, "ssh_n": 2, "graphs": [1], "k_obs": 8}


def noop(x: int) -> int:
    return x


# ---------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for pkg in ("hpc_serverless", "numpy", "cloudpickle", "dask", "distributed", "dask-jobqueue", "submitit",
                "qiskit", "qiskit-aer", "ray", "matplotlib"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    slurm = None
    if shutil.which("sinfo"):
        r = subprocess.run(["sinfo", "--version"], capture_output=True, text=True)
        slurm = r.stdout.strip() or None
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    return {"hostname": socket.gethostname(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "memory_gib": round(mem, 1) if mem else None,
            "platform": platform.platform(), "machine": platform.machine(),
            "python": sys.version.split()[0], "packages": versions, "slurm": slurm, "git_commit": commit}


def cluster_available() -> tuple[bool, str]:
    if not shutil.which("sinfo"):
        return False, "skipped: no cluster (sinfo not found)"
    try:
        r = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return False, "skipped: no cluster (sinfo timed out)"
    if r.returncode != 0:
        return False, f"skipped: no cluster (sinfo: {r.stderr.strip()[:200]})"
    return True, ""


# ---------------------------------------------------------------- local
def bench_dask_local(n: int, workers: int) -> dict[str, float]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        client.gather(client.map(noop, range(workers * 4), pure=False))  # warm
        t0 = time.perf_counter()
        values = client.gather(client.map(noop, range(n), pure=False))
        wall = time.perf_counter() - t0
    assert values == list(range(n))
    return {"dask_local_s": wall, "dask_local_tasks_per_s": n / wall}


def ray_status() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError as e:
        return f"ray: not installed ({e})"
    return None


def bench_ray(n: int, workers: int) -> dict[str, float]:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        f = ray.remote(noop)
        ray.get([f.remote(i) for i in range(workers * 4)])  # warm
        t0 = time.perf_counter()
        values = ray.get([f.remote(i) for i in range(n)])
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert values == list(range(n))
    return {"ray_s": wall, "ray_tasks_per_s": n / wall}


def section_local(p: dict[str, Any]) -> dict[str, Any]:
    tasks = local_overhead.bench_tasks(p["tasks"])
    tasks.update(bench_dask_local(p["tasks"], tasks["workers"]))
    tasks["dask_ratio"] = tasks["local_s"] / tasks["dask_local_s"]
    note = ray_status()
    if note is None:
        try:
            tasks.update(bench_ray(p["tasks"], tasks["workers"]))
            tasks["ray_ratio"] = tasks["local_s"] / tasks["ray_s"]
        except Exception as e:  # noqa: BLE001 - a broken ray install is a note, not a failure
            note = f"ray: failed ({type(e).__name__}: {e})"
    tasks["ray_note"] = note
    d = Path(tempfile.mkdtemp(prefix="hpcs-report-", dir=os.environ.get("TMPDIR")))
    try:
        store = local_overhead.bench_store(p["gib"], d)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"tasks": tasks, "store": store}


# ---------------------------------------------------------------- cluster
def bench_submitit(n: int, folder: Path) -> dict[str, Any]:
    """Plain submitit: a SlurmExecutor, map_array of the no-op, results by job.result()."""
    import submitit

    ex = submitit.SlurmExecutor(folder=str(folder / "%j"))
    ex.update_parameters(partition="debug", time=10, mem="400M", cpus_per_task=1)
    t0 = time.perf_counter()
    jobs = ex.map_array(noop, range(n))
    while not any(j.done() for j in jobs):
        time.sleep(0.2)
    first = time.perf_counter() - t0
    values = [j.result() for j in jobs]
    wall = time.perf_counter() - t0
    assert values == list(range(n))
    return {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall, "first_result_s": first}


def start_jobqueue() -> tuple[Any, Any, float]:
    """Plain dask-jobqueue: a SLURMCluster with the pilot site's worker shape."""
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    from hpc_serverless.config.site import load_site
    from hpc_serverless.engines.pilot_cluster import worker_shape

    site = load_site(str(PILOT_SITE))
    shape = worker_shape(site)
    t = shape.target
    logs = Path(tempfile.mkdtemp(prefix="hpcs-report-jq-"))
    cluster = SLURMCluster(cores=t.cpu, processes=shape.processes, memory=f"{t.mem_mib}MiB",
                           queue=t.partition, walltime="00:30:00", python=sys.executable,
                           job_extra_directives=[f"--output={logs}/%j.log"],
                           scheduler_options={"dashboard_address": ":0"})
    t0 = time.perf_counter()
    cluster.scale(jobs=site.pilot.workers)
    client = Client(cluster)
    client.wait_for_workers(1, timeout=300)
    return cluster, client, time.perf_counter() - t0


def bench_jobqueue(client: Any, n: int) -> dict[str, Any]:
    from dask.distributed import as_completed

    t0 = time.perf_counter()
    futures = client.map(noop, range(n), pure=False)
    next(iter(as_completed(futures)))
    first = time.perf_counter() - t0
    values = client.gather(futures)
    wall = time.perf_counter() - t0
    assert values == list(range(n))
    return {"tasks": n, "wall_s": wall, "tasks_per_s": n / wall, "first_result_s": first}


def bench_tracking(provider: Any, n: int, window: float) -> dict[str, Any]:
    """Scheduler commands per minute while `n` queued/running tasks are tracked."""
    from hpc_serverless import QuantumServerless

    s = QuantumServerless().add_provider(provider)
    with s.context(provider.name):
        refs = [slurm_throughput.noop(i) for i in range(n)]
    time.sleep(min(5.0, window / 4))  # let the submission settle
    before = dict(provider.transport.counts)
    t0 = time.perf_counter()
    time.sleep(window)
    elapsed = time.perf_counter() - t0
    used = {k: v - before.get(k, 0) for k, v in provider.transport.counts.items() if v != before.get(k, 0)}
    sched = sum(v for k, v in used.items() if k in ("sbatch", "sacct", "squeue", "scancel", "scontrol", "sinfo"))
    jobs = sorted({str(r.job_id).split("_")[0] for r in refs if r.job_id})
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True)
    poll = provider.site.poll_interval
    naive = n * 60.0 / poll
    return {"tasks": n, "window_s": elapsed, "commands": used, "commands_per_min": sched * 60.0 / elapsed,
            "naive_per_task_per_min": naive, "poll_interval_s": poll,
            "ratio_naive_over_ours": naive / max(sched * 60.0 / elapsed, 1e-9)}


def section_cluster(p: dict[str, Any], job_cap: int, log: Callable[[str], None]) -> dict[str, Any]:
    import cloudpickle

    from hpc_serverless import SlurmProvider
    from hpc_serverless.config.site import load_site
    from hpc_serverless.providers.pilot import PilotProvider

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    for m in (pilot_throughput, slurm_throughput):
        cloudpickle.register_pickle_by_value(m)
    out: dict[str, Any] = {"job_cap": job_cap}
    job_sizes = sorted({min(n, job_cap) for n in p["job_sizes"]})
    out["job_sizes"] = job_sizes

    site = load_site(str(JOBS_SITE))
    arrays = SlurmProvider("arrays", site=site)
    single = SlurmProvider("single", site=site.model_copy(update={"arrays": False}))
    out["arrays"], out["one_per_task"], out["submitit"] = [], [], []
    folder = Path(tempfile.mkdtemp(prefix="hpcs-report-submitit-"))
    for n in job_sizes:
        log(f"cluster: job modes, {n} tasks")
        out["arrays"].append(pilot_throughput.run(arrays, n))
        out["one_per_task"].append(pilot_throughput.run(single, n))
        out["submitit"].append(bench_submitit(n, folder))
    log(f"cluster: tracking {p['tracked']} tasks for {p['window_s']:.0f} s")
    out["tracking"] = bench_tracking(arrays, p["tracked"], p["window_s"])
    arrays.backend.close()
    single.backend.close()

    log("cluster: pilot mode")
    pilot = PilotProvider("pilot", site=load_site(str(PILOT_SITE)))
    t0 = time.perf_counter()
    pilot.start(wait=True, timeout=300)
    out["pilot_startup_s"] = time.perf_counter() - t0
    pilot_throughput.run(pilot, 20)  # warm the workers, as for dask-jobqueue below
    out["pilot"] = []
    for n in p["pilot_sizes"]:
        out["pilot"].append(pilot_throughput.run(pilot, n))
    pilot.close()

    log("cluster: plain dask-jobqueue")
    cluster, client, startup = start_jobqueue()
    out["jobqueue_startup_s"] = startup
    try:
        bench_jobqueue(client, 20)  # warm both workers' imports
        out["jobqueue"] = [bench_jobqueue(client, n) for n in p["pilot_sizes"]]
    finally:
        client.close()
        cluster.close()

    log(f"cluster: {p['ssh_n']} programs over SSH")
    try:
        out["ssh"] = ssh_programs.bench_ssh(p["ssh_n"], site=str(JOBS_SITE))
    except Exception as e:  # noqa: BLE001 - no sshd here is a note
        out["ssh"] = {"skipped": f"{type(e).__name__}: {e}"}
    return out


# ---------------------------------------------------------------- quantum
def bench_estimator(k: int, n_qubits: int = 8) -> dict[str, Any]:
    import numpy as np
    from qiskit.circuit.library import efficient_su2
    from qiskit.quantum_info import SparsePauliOp, random_pauli_list
    from qiskit_aer.primitives import EstimatorV2

    circuit = efficient_su2(n_qubits, reps=2)
    circuit = circuit.assign_parameters(np.random.default_rng(1).uniform(0, np.pi, circuit.num_parameters))
    rng = np.random.default_rng(2)
    obs = [SparsePauliOp(random_pauli_list(n_qubits, 4, seed=rng, phase=False)) for _ in range(k)]
    est = EstimatorV2()
    est.run([(circuit, obs[0])]).result()  # warm
    t0 = time.perf_counter()
    merged = est.run([(circuit, obs)]).result()[0].data.evs
    t_merged = time.perf_counter() - t0
    t0 = time.perf_counter()
    each = [float(est.run([(circuit, o)]).result()[0].data.evs) for o in obs]
    t_each = time.perf_counter() - t0
    assert np.allclose(merged, each, atol=1e-8)
    return {"observables": k, "qubits": n_qubits, "one_pub_s": t_merged, "one_call_each_s": t_each,
            "speedup": t_each / t_merged}


def section_quantum(p: dict[str, Any], with_cluster: bool, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"estimator": bench_estimator(p["k_obs"])}
    modes = {"local": None}
    if with_cluster:
        modes.update({"jobs": str(JOBS_SITE), "pilot": str(PILOT_SITE)})
    graph: dict[str, list[Any]] = {m: [] for m in modes}
    for g in p["graphs"]:
        for mode, site in modes.items():
            log(f"quantum: benchmark graph n_graphs={g} on {mode}")
            graph[mode].append(pilot_throughput.graph(site, g))
    out["graph"] = {"n_graphs": p["graphs"], "tasks_per_graph": 6, "seconds": graph}
    return out


# ---------------------------------------------------------------- output
def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# hpc_serverless performance report ({'quick' if res['quick'] else 'full'} run)", "",
             f"{m['date']} on `{m['hostname']}`: {m['cpu_count']} CPUs, {m['memory_gib']} GiB, Python {m['python']}, "
             f"{m['slurm'] or 'no Slurm'}; hpc_serverless {m['packages'].get('hpc_serverless')} "
             f"(commit {m['git_commit']}). Wall time of the run: {res['wall_s']:.0f} s. "
             "Every baseline was measured in the same run.", ""]
    loc = res.get("local", {})
    if "tasks" in loc:
        t = loc["tasks"]
        lines += [f"## Local: {t['tasks']:,} no-op tasks, {t['workers']} workers", "",
                  "| runner | time (s) | tasks/s | our time / its time |", "|---|---:|---:|---:|",
                  f"| hpc_serverless local | {fmt(t['local_s'], 3)} | {fmt(t['local_tasks_per_s'], 0)} | 1.00 |",
                  f"| ProcessPoolExecutor | {fmt(t['processpool_s'], 3)} | {fmt(t['processpool_tasks_per_s'], 0)} "
                  f"| {fmt(t['overhead_ratio'])} |",
                  f"| dask LocalCluster | {fmt(t['dask_local_s'], 3)} | {fmt(t['dask_local_tasks_per_s'], 0)} "
                  f"| {fmt(t['dask_ratio'])} |"]
        if t.get("ray_s"):
            lines.append(f"| Ray | {fmt(t['ray_s'], 3)} | {fmt(t['ray_tasks_per_s'], 0)} | {fmt(t['ray_ratio'])} |")
        else:
            lines.append(f"| Ray | {t['ray_note']} | | |")
        s = loc["store"]
        lines += ["", f"## Local: put+get of {s['gib']:g} GiB (float64 array), same directory", "",
                  "| method | time (s) | GiB/s (write+read) | its time / our time |", "|---|---:|---:|---:|",
                  f"| put + get | {fmt(s['put_get_s'], 3)} | {fmt(s['put_get_gib_per_s'])} | 1.00 |",
                  f"| numpy.save + numpy.load | {fmt(s['numpy_save_load_s'], 3)} | {fmt(s['numpy_gib_per_s'])} "
                  f"| {fmt(s['speed_ratio'])} |",
                  f"| shutil.copyfile | {fmt(s['copyfile_s'], 3)} | {fmt(s['copyfile_gib_per_s'])} "
                  f"| {fmt(s['copy_speed_ratio'])} |"]
    for name in ("local", "cluster", "quantum"):
        if res.get(f"{name}_error"):
            lines += ["", f"**{name} section failed:** `{res[f'{name}_error'][-300:]}`"]
    c = res.get("cluster", {})
    if c.get("skipped"):
        lines += ["", "## Cluster", "", c["skipped"]]
    elif c:
        lines += ["", "## Cluster: no-op tasks", "",
                  f"Job modes are capped at {c['job_cap']} tasks (the test cluster starts ~4-5 jobs/s). "
                  f"Pilot start-up (first worker connected) {fmt(c.get('pilot_startup_s'))} s, plain dask-jobqueue "
                  f"start-up {fmt(c.get('jobqueue_startup_s'))} s, not included below.", "",
                  "| mode | tasks | wall (s) | tasks/s | first result (s) | sbatch |", "|---|---:|---:|---:|---:|---:|"]
        for label, key in (("one job per task", "one_per_task"), ("job arrays", "arrays"),
                           ("plain submitit map_array", "submitit"), ("pilot", "pilot"),
                           ("plain dask-jobqueue", "jobqueue")):
            for r in c.get(key, []):
                lines.append(f"| {label} | {r['tasks']:,} | {fmt(r['wall_s'])} | {fmt(r['tasks_per_s'], 1)} | "
                             f"{fmt(r['first_result_s'])} | {r.get('sbatch', '–')} |")
        ratios = cluster_ratios(c)
        if ratios:
            lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {fmt(v)} |" for k, v in ratios.items()]
        tr = c.get("tracking")
        if tr:
            lines += ["", f"## Cluster: scheduler load while {tr['tasks']:,} tasks are tracked", "",
                      f"Over {tr['window_s']:.0f} s: {fmt(tr['commands_per_min'], 1)} scheduler commands per minute "
                      f"({tr['commands']}); polling each task every {tr['poll_interval_s']:g} s would be "
                      f"{tr['naive_per_task_per_min']:,.0f}/min (computed, not run): x{fmt(tr['ratio_naive_over_ours'], 0)} "
                      "fewer."]
        ssh = c.get("ssh", {})
        if ssh.get("skipped"):
            lines += ["", f"SSH programs: skipped ({ssh['skipped']})"]
        elif ssh:
            lines += ["", f"## Cluster: {ssh['programs']} Programs submitted over SSH (loopback)", "",
                      "| method | time (s) | programs/s |", "|---|---:|---:|",
                      f"| one reused connection (ours) | {fmt(ssh['ours_s'])} | {fmt(ssh['ours_programs_per_s'])} |",
                      f"| one `ssh` per command | {fmt(ssh['ssh_per_command_s'])} | "
                      f"{fmt(ssh['ssh_per_command_programs_per_s'])} |", "",
                      f"Ratio: x{fmt(ssh['speed_ratio'])} faster."]
    q = res.get("quantum", {})
    if q:
        e = q["estimator"]
        lines += ["", f"## Quantum: {e['observables']} observables on one {e['qubits']}-qubit circuit "
                  "(qiskit-aer EstimatorV2, local)", "",
                  "| method | time (s) |", "|---|---:|",
                  f"| one PUB (circuit, [obs1..obsK]) | {fmt(e['one_pub_s'], 4)} |",
                  f"| K runs of one PUB each | {fmt(e['one_call_each_s'], 4)} |", "",
                  f"Speedup of merging: x{fmt(e['speedup'], 1)}."]
        g = q["graph"]
        modes = list(g["seconds"])
        lines += ["", "## Quantum: examples/benchmark.py (transpile -> estimate, 3 backends per graph, "
                  "cold start included)", "",
                  "| n_graphs (tasks) | " + " | ".join(f"{m} (s)" for m in modes) + " |",
                  "|---" * (len(modes) + 1) + "|"]
        for i, n in enumerate(g["n_graphs"]):
            lines.append(f"| {n} ({n * g['tasks_per_graph']}) | "
                         + " | ".join(fmt(g["seconds"][m][i]) for m in modes) + " |")
    if res.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in res["plots"]]
    return "\n".join(lines) + "\n"


def cluster_ratios(c: dict[str, Any]) -> dict[str, float]:
    r: dict[str, float] = {}

    def at(key: str, n: int) -> dict[str, Any] | None:
        return next((x for x in c.get(key, []) if x["tasks"] == n), None)

    if c.get("job_sizes"):
        n = c["job_sizes"][-1]
        a, one, sub = at("arrays", n), at("one_per_task", n), at("submitit", n)
        if a and sub:
            r[f"arrays / plain submitit, tasks/s at {n}"] = a["tasks_per_s"] / sub["tasks_per_s"]
        if a and one:
            r[f"arrays / one job per task, tasks/s at {n}"] = a["tasks_per_s"] / one["tasks_per_s"]
    if c.get("pilot"):
        n = c["pilot"][-1]["tasks"]
        pl, jq = at("pilot", n), at("jobqueue", n)
        if pl and jq:
            r[f"pilot / plain dask-jobqueue, tasks/s at {n:,}"] = pl["tasks_per_s"] / jq["tasks_per_s"]
        if c.get("job_sizes"):
            m = c["job_sizes"][-1]
            one = at("one_per_task", m)
            best = max(c["pilot"], key=lambda x: x["tasks_per_s"])
            if one:
                r["pilot (best) / one job per task (capped), tasks/s"] = best["tasks_per_s"] / one["tasks_per_s"]
                pm = at("pilot", m) or c["pilot"][0]
                r["time to first result: one job per task / pilot"] = one["first_result_s"] / max(
                    pm["first_result_s"], 1e-6)
    return r


def plots(res: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    t = res.get("local", {}).get("tasks")
    if t:
        names = ["hpc_serverless", "ProcessPool", "dask Local"] + (["Ray"] if t.get("ray_s") else [])
        vals = [t["local_tasks_per_s"], t["processpool_tasks_per_s"], t["dask_local_tasks_per_s"]] + (
            [t["ray_tasks_per_s"]] if t.get("ray_s") else [])
        s = res["local"]["store"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        a1.bar(names, vals, color=["C0", "C7", "C7", "C7"][: len(vals)])
        a1.set_ylabel("no-op tasks/s")
        a1.set_title(f"local, {t['workers']} workers", fontsize=9)
        a2.bar(["put+get", "numpy save+load", "copyfile"],
               [s["put_get_gib_per_s"], s["numpy_gib_per_s"], s["copyfile_gib_per_s"]], color=["C0", "C7", "C7"])
        a2.set_ylabel("GiB/s (write + read)")
        a2.set_title(f"{s['gib']:g} GiB array", fontsize=9)
        for a in (a1, a2):
            a.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "local.png", dpi=80)
        plt.close(fig)
        made.append("local.png")
    c = res.get("cluster", {})
    if c.get("pilot") or c.get("arrays"):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        for label, key, style in (("pilot", "pilot", "C0o-"), ("plain dask-jobqueue", "jobqueue", "C1s--"),
                                  ("job arrays", "arrays", "C2o-"), ("one job per task", "one_per_task", "C3o-"),
                                  ("plain submitit", "submitit", "C4s--")):
            rows = c.get(key) or []
            if rows:
                xs = [r["tasks"] for r in rows]
                a1.plot(xs, [r["tasks_per_s"] for r in rows], style, label=label, ms=4)
                a2.plot(xs, [r["first_result_s"] for r in rows], style, label=label, ms=4)
        for a, yl in ((a1, "tasks/s"), (a2, "first result (s)")):
            a.set_xscale("log")
            a.set_yscale("log")
            a.set_xlabel("no-op tasks")
            a.set_ylabel(yl)
        a1.legend(fontsize=7)
        a1.set_title(f"Slurm test cluster (job modes capped at {c['job_cap']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "cluster.png", dpi=80)
        plt.close(fig)
        made.append("cluster.png")
    q = res.get("quantum", {})
    if q:
        g = q["graph"]
        e = q["estimator"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
        for i, (mode, secs) in enumerate(g["seconds"].items()):
            pts = [(n, s) for n, s in zip(g["n_graphs"], secs, strict=True) if s is not None]
            if pts:
                a1.plot(*zip(*pts, strict=True), f"C{i}o-", label=mode)
        a1.set_xlabel("graphs (6 tasks each)")
        a1.set_ylabel("wall time (s)")
        a1.set_title("examples/benchmark.py", fontsize=9)
        a1.legend(fontsize=7)
        a2.bar(["one PUB", f"{e['observables']} calls"], [e["one_pub_s"], e["one_call_each_s"]], color=["C0", "C7"])
        a2.set_ylabel("s")
        a2.set_title(f"EstimatorV2, {e['observables']} observables: x{e['speedup']:.0f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "quantum.png", dpi=80)
        plt.close(fig)
        made.append("quantum.png")
    return made


def write(res: dict[str, Any], out: Path) -> None:
    try:
        res["plots"] = plots(res, out)
    except Exception:  # noqa: BLE001 - the figures are still in the JSON
        res["plots_error"] = traceback.format_exc()
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "report.md").write_text(markdown(res))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<timestamp>/)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--no-cluster", action="store_true", help="skip the Slurm parts")
    ap.add_argument("--job-cap", type=int, default=None, help="most tasks per run in job modes (full: 300)")
    ap.add_argument("--pilot-max", type=int, default=None, help="largest pilot run (full: 10000)")
    a = ap.parse_args(argv)
    p = dict(QUICK if a.quick else FULL)
    job_cap = a.job_cap or max(p["job_sizes"])
    if a.pilot_max:
        p["pilot_sizes"] = [n for n in p["pilot_sizes"] if n <= a.pilot_max] or [a.pilot_max]
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    res: dict[str, Any] = {"quick": a.quick, "params": {**p, "job_cap": job_cap}, "machine": machine(), "wall_s": 0.0}
    if a.no_cluster:
        with_cluster, why = False, "skipped: --no-cluster"
    else:
        with_cluster, why = cluster_available()
    sections: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("local", lambda: section_local(p)),
        ("quantum", lambda: section_quantum(p, with_cluster, log)),
        ("cluster", lambda: section_cluster(p, job_cap, log) if with_cluster else {"skipped": why}),
    ]
    for name, fn in sections:
        log(f"{name} ...")
        try:
            res[name] = fn()
        except Exception:  # noqa: BLE001 - one failed section must not lose the others
            res[f"{name}_error"] = traceback.format_exc()
            log(f"{name} FAILED:\n{res[f'{name}_error']}")
        res["wall_s"] = time.perf_counter() - t_start
        write(res, out)  # after every section: a late failure keeps what was measured
    log(f"done: {out}")
    print((out / "report.md").read_text())
    return 0 if not any(k.endswith("_error") for k in res) else 1


if __name__ == "__main__":
    sys.exit(main())
