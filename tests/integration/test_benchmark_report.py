"""Smoke test of the one-command performance report: `benchmarks/report.py --quick`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("matplotlib")
pytest.importorskip("dask.distributed")


def _positive_numbers(obj: object, path: str = "") -> list[str]:
    """Paths of numbers that are not > 0 among the measured figures."""
    bad: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _positive_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _positive_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj <= 0:
        bad.append(path)
    return bad


def test_quick_report(tmp_path: Path) -> None:
    with_cluster = bool(shutil.which("sinfo")) and bool(os.environ.get("HPC_SERVERLESS_TEST_SITE"))
    out = tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "benchmarks/report.py"), "--quick", "--out", str(out)]
    if not with_cluster:
        cmd.append("--no-cluster")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    assert (out / "report.md").read_text().startswith("# hpc_serverless performance report")
    assert list(out.glob("*.png")), "no plots"
    res = json.loads((out / "results.json").read_text())
    assert {"machine", "local", "quantum", "cluster", "wall_s"} <= set(res)
    assert {"cpu_count", "memory_gib", "python", "packages", "hostname", "date"} <= set(res["machine"])
    tasks, store = res["local"]["tasks"], res["local"]["store"]
    for key in ("local_tasks_per_s", "processpool_tasks_per_s", "dask_local_tasks_per_s", "overhead_ratio",
                "dask_ratio"):
        assert tasks[key] > 0, key
    assert tasks.get("ray_tasks_per_s", 1) > 0 or tasks["ray_note"]
    for key in ("put_get_gib_per_s", "numpy_gib_per_s", "copyfile_gib_per_s", "speed_ratio", "copy_speed_ratio"):
        assert store[key] > 0, key
    est = res["quantum"]["estimator"]
    assert est["speedup"] > 0 and est["one_pub_s"] > 0
    assert all(s and s > 0 for s in res["quantum"]["graph"]["seconds"]["local"])
    if with_cluster:
        c = res["cluster"]
        for key in ("arrays", "one_per_task", "submitit", "pilot", "jobqueue"):
            assert c[key] and all(row["tasks_per_s"] > 0 for row in c[key]), key
        assert c["tracking"]["commands_per_min"] > 0
    else:
        assert res["cluster"]["skipped"].startswith("skipped")
    bad = [p for p in _positive_numbers({k: res[k] for k in ("local", "quantum")})
           if not p.endswith(("ray_note",))]
    assert not bad, f"non-positive figures: {bad}"
