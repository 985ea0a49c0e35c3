"""bench/acceptance.py, the one script for a GPU machine, run here as its --dry-run (tiny models, 64x64, CPU) on a
subset of modes: each mode's file and the combined JSON, an injected failure and a timeout recorded while the later
modes still run, comparisons with the default, the budget; and the GPU plan's arithmetic (8 minutes on an H100)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.acceptance import GPU_SETUP_S, MODES, RECORD_KEYS, SAMPLING_KEYS  # noqa: E402

RUN = ("weights", "default", "bf16", "low_vram", "offload_sequential", "dwpose")  # in the planned order
FAILS, HANGS = "bf16", "offload_sequential"


def acceptance(*args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "acceptance.py"), "--dry-run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    done = acceptance("--only", ",".join(RUN), "--fail", FAILS, "--hang", HANGS, "--limit", f"{HANGS}=4",
                      "--out", str(out), "--work", str(work))
    assert done.returncode == 0, done.stdout + done.stderr
    return out, json.loads((out / "acceptance.json").read_text()), done.stdout


def test_every_mode_has_its_file_and_the_combined_json_has_each_with_the_required_keys(dry_run):
    out, report, _ = dry_run
    assert report["format"] == "svd-animate.acceptance" and report["dry_run"] and report["complete"]
    assert report["order"] == list(RUN) and list(report["modes"]) == list(RUN)
    for name in RUN:
        record = json.loads((out / f"{name}.json").read_text())
        assert set(RECORD_KEYS) <= set(record), name
        assert record == report["modes"][name], name
        assert (out / "logs" / f"{name}.err").exists()
    for name in ("weights", "default", "low_vram", "dwpose"):
        assert report["modes"][name]["status"] == "ok", report["modes"][name]
    for name in ("default", "low_vram"):
        result = report["modes"][name]["result"]
        assert set(SAMPLING_KEYS) <= set(result), name
        assert result["seconds_per_frame"] > 0 and result["peak_cuda_gib"] is None  # (CPU)
    assert report["modes"]["default"]["result"]["shape"] == "video"
    assert set(report["modes"]["default"]["result"]["references"]) == {"window", "short"}
    assert report["modes"]["dwpose"]["result"]["cuda_provider"] == "absent"  # the CPU provider ran instead
    assert report["summary"]["status"] == {name: report["modes"][name]["status"] for name in RUN}


def test_a_failing_mode_is_recorded_and_the_later_modes_still_run(dry_run):
    _, report, stdout = dry_run
    failed = report["modes"][FAILS]
    assert failed["status"] == "failed" and failed["exit_status"] == 1 and failed["result"] is None
    assert failed["error"] == f"RuntimeError: injected failure (--fail {FAILS})"
    assert any("injected failure" in line for line in failed["stderr_tail"])
    assert report["modes"]["low_vram"]["status"] == "ok"  # after the failure
    assert f"{FAILS}: failed" in stdout


def test_a_mode_past_its_limit_is_recorded_as_timed_out_and_killed(dry_run):
    _, report, _ = dry_run
    hung = report["modes"][HANGS]
    assert hung["status"] == "timeout" and hung["limit_s"] == 4
    assert hung["error"].startswith("timed out after 4 s") and 4 <= hung["wall_s"] < 15
    assert any("hanging on purpose" in line for line in hung["stderr_tail"])
    assert report["modes"]["dwpose"]["status"] == "ok"  # after the timeout


def test_modes_are_compared_with_the_default_at_their_shape(dry_run):
    _, report, _ = dry_run
    versus = report["modes"]["low_vram"]["result"]["vs_default"]
    assert versus["against"] == "default@window"
    assert versus["time_ratio"] > 0 and versus["latents_max_relative"] == 0  # on a CPU --low-vram changes no value
    assert report["modes"]["default"]["result"]["vs_default"] is None
    assert report["summary"]["vs_default"]["low_vram"] == versus


def test_a_mode_the_budget_cannot_hold_is_skipped(tmp_path):
    done = acceptance("--only", "weights,dwpose", "--budget", "1", "--out", str(tmp_path), "--work",
                      str(tmp_path / "work"), timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "acceptance.json").read_text())
    for name in ("weights", "dwpose"):
        assert report["modes"][name]["status"] == "skipped" and report["modes"][name]["error"].startswith("budget")
        assert json.loads((tmp_path / f"{name}.json").read_text())["status"] == "skipped"


def test_the_gpu_plan_fits_eight_minutes_on_an_h100():
    names = [mode.name for mode in MODES]
    assert names[:10] == ["weights", "published", "default", "fast", "compile", "compile_fast", "bf16", "low_vram",
                          "offload_model", "offload_sequential"]  # the most telling first
    assert set(names[10:]) == {"step", "decode", "train_full", "train_lora", "dwpose"}
    assert sum(mode.expected_s for mode in MODES) + GPU_SETUP_S <= 8 * 60
    assert all(mode.expected_s < mode.limit_s for mode in MODES)
    gpu_sh = (ROOT / "bench" / "gpu.sh").read_text()
    budget = int(re.search(r"BUDGET:-(\d+)", gpu_sh).group(1))
    assert budget <= 8 * 60 and "bench/acceptance.py --device cuda" in gpu_sh
    listed = acceptance("--list", timeout=60).stdout  # the plan prints without running anything
    assert all(name in listed for name in names)


def test_the_docstring_table_is_the_plan():
    import bench.acceptance as acceptance

    rows = re.findall(r"^\| (\w+) +\|.*\| +(\d+) \| +(\d+) \|$", acceptance.__doc__, re.MULTILINE)
    assert [(name, int(expected), int(limit)) for name, expected, limit in rows] == [
        (mode.name, mode.expected_s, mode.limit_s) for mode in MODES]
    assert f"Expected total {sum(mode.expected_s for mode in MODES)} s" in acceptance.__doc__
    assert f"({sum(mode.limit_s for mode in MODES)} s)" in acceptance.__doc__
