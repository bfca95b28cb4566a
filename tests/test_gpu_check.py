"""The GPU check (``launch/gpu_check.py``) in its CPU smoke mode, kept cheap: one raw
rollout of InvertedPendulum per physics backend (JAX, MuJoCo Warp), compiled ahead by a
child process and loaded from the shared compilation cache by the measuring process; the
later phases are given budgets the run cannot hold, so they must be skipped and recorded,
not crash it. The report must keep its keys. (Phase e's saving and loading is tested on a
trained run in tests/test_runs.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
TOP = {"schema", "command", "smoke", "date", "budget_s", "elapsed_s", "finished",
       "interrupted", "plan", "compile", "phases"}  # fmt: skip
PHASE = {"name", "status", "budget_s", "items"}


def test_smoke_report_records_measurements_and_skips_what_the_budget_cannot_hold(tmp_path):
    out = tmp_path / "check"
    env = {k: v for k, v in os.environ.items() if k != "MJXSAC_COMPILE_CACHE"}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    # two CPU devices: phase d plans its every-device measurements too
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": path,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}  # fmt: skip
    argv = [sys.executable, "-m", "launch.gpu_check", "--smoke", "--out", str(out),
            "--compile-cache", str(tmp_path / "cache"), "--tasks", "InvertedPendulum",
            "--size-tasks", "--budget-s", "1000", "--phase-budget", "a=900", "b=5000",
            "c=5000", "d=5000"]  # fmt: skip
    # (a generous budget costs nothing: the run ends when its phases have)
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report.keys() >= TOP and report["finished"] and report["interrupted"] is None
    phases = report["phases"]
    assert list(phases) == ["0", "a", "b", "c", "d", "e"]
    assert all(phase.keys() >= PHASE for phase in phases.values())

    versions = phases["0"]["items"]["versions"]["result"]
    assert versions["packages"]["jax"] and versions["packages"]["mujoco-mjx"]
    assert versions["backend"] == "cpu" and versions["devices"]

    # a: measured, with programs compiled by a child and loaded here
    raw = phases["a"]["items"]["InvertedPendulum@8"]
    assert phases["a"]["status"] == "ok", raw
    assert raw["result"]["steps_per_s"] > 0 and raw["result"]["runs_s"]
    job = report["compile"]["jobs"]["a/InvertedPendulum@8"]
    assert job["status"] == "done" and job["programs_s"]["rollout"] > 0, job
    assert raw["programs"]["loaded"] > 0
    warp = phases["a"]["items"]["InvertedPendulum@8 impl=warp"]  # (the test extra has Warp)
    assert warp["status"] == "ok" and warp["result"]["steps_per_s"] > 0, warp

    # b, c, d: over budget, skipped with the reason; e: nothing to save
    for key in "bcd":
        assert phases[key]["status"] == "skipped", phases[key]
        assert "it needs half of its 5000 s" in phases[key]["reason"]
        assert {e["status"] for e in phases[key]["items"].values()} == {"skipped"}
    assert not any(j.startswith(("b/", "c/", "d/")) for j in report["compile"]["jobs"])
    assert {"2 members on 2 devices", "1 members on 2 devices"} <= set(phases["d"]["items"])
    policy = phases["e"]["items"]["policy"]
    assert policy["status"] == "skipped" and "no learning run" in policy["reason"]

    text = (out / "report.md").read_text()
    assert "## a. raw env steps/s (ok)" in text and "| InvertedPendulum@8 |" in text
    assert "## c. learning against wall time (skipped: " in text
