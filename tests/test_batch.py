import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pose.skeleton import PoseSequence
from svd_animate import cli
from svd_animate.batch import (Job, format_table, jobs_from_folders, jobs_from_manifest, merge_reports,
                               part_report, remove_leftovers, run_jobs, split_jobs, write_json)
from svd_animate.config import expand_shortcuts
from svd_animate.run import RunSettings
from svd_common.errors import InputError
from tests.helpers import make_pose

ROOT = Path(__file__).resolve().parents[1]


def write_ref(path, value=128):
    cv2.imwrite(str(path), np.full((64, 64, 3), value, np.uint8))
    return path


def write_poses(path, frames=3):
    PoseSequence.stack([make_pose({0: (0.5, 0.3), 1: (0.5, 0.4), 2: (0.4, 0.4)})] * frames, 64, 64,
                       fps=5).save(path)
    return path


@pytest.fixture
def folders(tmp_path):
    refs, poses = tmp_path / "refs", tmp_path / "poses"
    refs.mkdir(), poses.mkdir()
    write_ref(refs / "alice.png", 100), write_ref(refs / "bob.png", 200)
    write_poses(poses / "alice.npz"), write_poses(poses / "walk.npz", 2)
    (refs / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    return refs, poses


def run(capsys, *args):
    code = cli.main(["-q", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---- job lists -----------------------------------------------------------------------------------

def test_every_pair_and_pairs_by_name(folders, tmp_path, caplog):
    refs, poses = folders
    with caplog.at_level("WARNING", logger="svd_animate.batch"):
        jobs = jobs_from_folders(refs, poses, tmp_path / "out")
    assert [r.getMessage() for r in caplog.records] == [f"{refs}: 1 file left out, not images: notes.txt"]
    assert [j.number for j in jobs] == [1, 2, 3, 4]
    assert [(j.ref.name, j.pose.name, j.output.name) for j in jobs] == [
        ("alice.png", "alice.npz", "alice__alice.mp4"), ("bob.png", "alice.npz", "alice__bob.mp4"),
        ("alice.png", "walk.npz", "walk__alice.mp4"), ("bob.png", "walk.npz", "walk__bob.mp4")]
    by_name = jobs_from_folders(refs, poses, tmp_path / "out", pairing="name")
    assert [(j.ref.name, j.pose.name) for j in by_name] == [("alice.png", "alice.npz")]


def test_empty_folders_are_all_listed(tmp_path):
    (tmp_path / "refs").mkdir(), (tmp_path / "poses").mkdir()
    with pytest.raises(InputError) as error:
        jobs_from_folders(tmp_path / "refs", tmp_path / "poses", tmp_path / "out")
    message = str(error.value)
    assert "2 problems, nothing was started" in message
    assert "refs: no images in it" in message and "poses: no videos or poses .npz in it" in message


def test_manifest_csv_and_yaml(folders, tmp_path):
    refs, poses = folders
    (tmp_path / "jobs.csv").write_text("ref,pose,seed,steps,output\nrefs/alice.png,poses/walk.npz,7,2,a.mp4\n"
                                       "refs/bob.png,poses/alice.npz,,,\n")
    jobs = jobs_from_manifest(tmp_path / "jobs.csv", tmp_path / "out")
    assert jobs[0] == Job(1, refs / "alice.png", poses / "walk.npz", tmp_path / "out" / "a.mp4",
                          (("seed", 7), ("steps", 2)))
    assert jobs[1].overrides == () and jobs[1].output.name == "alice__bob.mp4"
    (tmp_path / "jobs.yaml").write_text(f"jobs:\n  - {{ref: {refs / 'bob.png'}, pose: poses/walk.npz, "
                                        "guidance: 2.5}\n")
    job = jobs_from_manifest(tmp_path / "jobs.yaml", tmp_path / "out")[0]
    assert expand_shortcuts(dict(job.overrides)) == {"min_guidance": 2.5, "max_guidance": 2.5}


def test_manifest_problems_all_listed_before_anything_starts(folders, tmp_path, capsys):
    (tmp_path / "jobs.csv").write_text(
        "ref,pose,seed,colour\nrefs/alice.png,poses/walk.npz,seven,red\nrefs/nobody.png,poses/walk.npz,1,\n"
        "refs/bob.png,,1,\nrefs/alice.png,poses/walk.npz,2,\n")
    code, stdout, stderr = run(capsys, "batch", "--jobs", tmp_path / "jobs.csv", "-o", tmp_path / "out",
                               "--preset", "tiny")
    assert code == 2 and stdout == ""
    assert "jobs.csv: 5 problems, nothing was started" in stderr
    for problem in ("job 1: unknown column 'colour'", "job 1: seed must be int, got 'seven'",
                    "job 2: ref refs/nobody.png: no such file", "job 3: no pose",
                    "jobs 1 and 4 both write walk__alice.mp4"):
        assert problem in stderr, problem
    assert not (tmp_path / "out").exists()


def test_manifest_without_the_columns(tmp_path):
    (tmp_path / "jobs.csv").write_text("image,video\na.png,b.mp4\n")
    with pytest.raises(InputError, match=r"job 1: unknown column 'image', 'video'.*\n.*job 1: no ref and no pose"):
        jobs_from_manifest(tmp_path / "jobs.csv", tmp_path / "out")


def test_split_keeps_each_clip_in_one_process_and_covers_every_job_once():
    clips = ["a"] * 5 + ["b"] * 2 + ["c"] * 2 + ["d"]
    jobs = [Job(i, Path(f"r{i}.png"), Path(f"{clip}.mp4"), Path(f"o{i}.mp4")) for i, clip in enumerate(clips)]
    shares = split_jobs(jobs, 2)
    assert sorted(j.number for share in shares for j in share) == list(range(10))
    assert [sorted({j.pose.stem for j in share}) for share in shares] == [["a"], ["b", "c", "d"]]
    assert split_jobs(jobs, 2) == shares  # deterministic: every process computes the same split
    assert split_jobs(jobs, 1) == [jobs]


def test_run_jobs_records_failures_and_goes_on(tmp_path):
    jobs = [Job(i, tmp_path / "r.png", tmp_path / f"p{i}.mp4", tmp_path / f"o{i}.mp4") for i in range(4)]
    jobs[1].output.write_bytes(b"finished earlier")

    def run_one(job):
        if job.number == 2:
            raise RuntimeError("CUDA error: device-side assert")
        return 10 + job.number

    records = run_jobs(jobs, run_one, failed_inputs={jobs[3].pose: "p3.mp4: not a readable video"}, progress=False)
    assert [(r.status, r.frames, r.error) for r in records] == [
        ("done", 10, None), ("skipped", None, None), ("failed", None, "RuntimeError: CUDA error: device-side assert"),
        ("failed", None, "p3.mp4: not a readable video")]
    assert [r.status for r in run_jobs(jobs[:2], run_one, overwrite=True, progress=False)] == ["done", "done"]


def test_reports_merged_and_table(tmp_path):
    write_json(part_report(tmp_path, 1, 2), [{"job": 2, "ref": "r", "pose": "p", "output": "/o/b.mp4",
                                               "status": "failed", "error": "bad", "frames": None, "seconds": 0.5,
                                               "process": 1}])
    write_json(part_report(tmp_path, 0, 2), [{"job": 1, "ref": "r", "pose": "p", "output": "/o/a.mp4",
                                               "status": "done", "error": None, "frames": 12, "seconds": 3.25,
                                               "process": 0}])
    report = merge_reports(tmp_path, 2, 4.0)
    assert report["summary"] == {"jobs": 2, "done": 1, "skipped": 0, "failed": 1, "processes": 2, "seconds": 4.0}
    assert [r["job"] for r in report["jobs"]] == [1, 2]  # numbered as the table numbers them
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # parts removed
    assert format_table(report["jobs"]).splitlines() == [
        "job  status  frames  seconds  output / error", "1    done    12      3.2      a.mp4",
        "2    failed          0.5      bad"]


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".walk__bob.abc123.part.mp4").write_bytes(b"half")
    (tmp_path / "walk__alice.mp4").write_bytes(b"done")
    assert [p.name for p in remove_leftovers(tmp_path)] == [".walk__bob.abc123.part.mp4"]
    assert [p.name for p in tmp_path.iterdir()] == ["walk__alice.mp4"]


# ---- the command ---------------------------------------------------------------------------------

TINY = ["--preset", "tiny", "--steps", "1", "--window", "4", "--overlap", "1"]


def test_batch_runs_skips_and_reports(folders, tmp_path, capsys):
    refs, poses = folders
    (refs / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    code, stdout, stderr = run(capsys, "batch", "--refs", refs, "--poses", poses, "-o", out, *TINY)
    assert code == 1  # the broken reference's jobs failed, the others ran
    report = json.loads((out / "report.json").read_text())
    statuses = {Path(r["output"]).name: r["status"] for r in report["jobs"]}
    assert statuses == {"alice__alice.mp4": "done", "alice__bob.mp4": "done", "alice__broken.mp4": "failed",
                        "walk__alice.mp4": "done", "walk__bob.mp4": "done", "walk__broken.mp4": "failed"}
    failed = [r for r in report["jobs"] if r["status"] == "failed"]
    assert all("broken.png: not a readable image" in r["error"] for r in failed)
    assert [r["frames"] for r in report["jobs"] if r["status"] == "done"] == [3, 3, 2, 2]
    assert "4 done, 0 skipped, 2 failed" in stdout and "RANDOM WEIGHTS" in stdout
    assert "alice__bob.mp4" in stdout and "broken.png: not a readable image" in stdout  # the table
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["alice__alice.mp4", "alice__bob.mp4", "walk__alice.mp4", "walk__bob.mp4", "report.json"])
    assert not list(out.glob(".*"))  # no temporary or partial report files left
    before = (out / "alice__alice.mp4").stat().st_mtime_ns

    (refs / "broken.png").unlink()
    code, stdout, _ = run(capsys, "batch", "--refs", refs, "--poses", poses, "-o", out, *TINY)
    assert code == 0 and "0 done, 4 skipped, 0 failed" in stdout
    assert (out / "alice__alice.mp4").stat().st_mtime_ns == before
    code, stdout, _ = run(capsys, "batch", "--refs", refs, "--poses", poses, "-o", out, *TINY, "--overwrite",
                          "--pairing", "name")
    assert code == 0 and "1 done, 0 skipped" in stdout


def test_dry_run_lists_cache_and_skips(shared_data, folders, tmp_path, capsys):
    refs, poses = folders
    clip = poses / "dance.mp4"
    clip.symlink_to(shared_data / "driving_controlnext_v2_01.mp4")
    out = tmp_path / "out"
    out.mkdir()
    (out / "walk__bob.mp4").write_bytes(b"done before")
    args = ["batch", "--refs", refs, "--poses", poses, "-o", out, *TINY, "--max-frames", "2",
            "--cache-dir", tmp_path / "cache", "--align", "none"]
    code, stdout, _ = run(capsys, *args, "--dry-run")
    lines = stdout.splitlines()
    assert code == 0 and len(lines) == 7
    assert "skip  poses npz" in lines[5] and "walk__bob.mp4" in lines[5]
    assert "run   poses to extract" in lines[2] and "dance__alice.mp4" in lines[2]
    assert lines[-1] == "6 jobs: 5 to run, 1 already done (skipped), 0 with unreadable inputs"
    assert sorted(p.name for p in out.iterdir()) == ["walk__bob.mp4"]  # a dry run writes nothing
    code, _, _ = run(capsys, "batch", "--refs", refs, "--poses", poses, "-o", tmp_path / "new", *TINY, "--dry-run",
                     "--cache-dir", tmp_path / "cache", "--align", "none")
    assert code == 0 and not (tmp_path / "new").exists()

    code, stdout, _ = run(capsys, "animate", "--ref", refs / "alice.png", "--pose", clip, *TINY, "--max-frames",
                          "2", "--cache-dir", tmp_path / "cache", "--align", "none", "-o", tmp_path / "one.mp4")
    assert code == 0
    code, stdout, _ = run(capsys, *args, "--dry-run")
    assert "run   poses cached" in stdout.splitlines()[2]


def test_output_folder_not_writable(folders, tmp_path, capsys):
    refs, poses = folders
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, stderr = run(capsys, "batch", "--refs", refs, "--poses", poses, "-o", blocker / "out", *TINY)
    assert code == 2 and "cannot create the output folder" in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = run(capsys, "batch", "--refs", refs, "-o", tmp_path / "out", *TINY)
    assert code == 2 and "--refs and --poses go together" in stderr


def finished_outputs(out) -> dict:
    """Visible .mp4 files (pathlib's `*` also matches the writer's hidden temporary files)."""
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4") if not p.name.startswith(".")}


def batch_command(refs, poses, out, *extra):
    return [sys.executable, "-m", "svd_controlnext", "-q", "batch", "--refs", str(refs), "--poses", str(poses), "-o", str(out),
            *TINY, *extra]


def test_two_processes_do_each_job_once_and_merge_one_report(folders, tmp_path):
    refs, poses = folders
    write_poses(poses / "jump.npz", 2)
    out = tmp_path / "out"
    result = subprocess.run(batch_command(refs, poses, out, "--num-processes", "2"), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["processes"] == 2 and report["summary"]["done"] == 6
    assert sorted(r["job"] for r in report["jobs"]) == list(range(1, 7))
    by_process = {}
    for record in report["jobs"]:
        by_process.setdefault(record["process"], set()).add(Path(record["pose"]).name)
    assert set(by_process) == {0, 1} and not by_process[0] & by_process[1]  # a clip stays in one process
    assert len(finished_outputs(out)) == 6 and not list(out.glob(".*"))
    assert result.stdout.count("6 jobs, 6 done") == 1  # one merged report, printed once


def test_sigkill_then_rerun_finishes_the_rest(folders, tmp_path):
    refs, poses = folders
    write_poses(poses / "long.npz", 12)
    out = tmp_path / "out"
    process = subprocess.Popen(batch_command(refs, poses, out, "--steps", "3"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not finished_outputs(out) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # in the middle of the second job (or later)
    process.wait()
    finished = finished_outputs(out)
    assert finished and len(finished) < 6 and not (out / "report.json").exists()

    result = subprocess.run(batch_command(refs, poses, out, "--steps", "3"), cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    statuses = {Path(r["output"]).name: r["status"] for r in report["jobs"]}
    assert len(statuses) == 6 and all(statuses[name] == "skipped" for name in finished)
    assert sum(status == "done" for status in statuses.values()) == 6 - len(finished)
    now = finished_outputs(out)
    assert {name: now[name] for name in finished} == finished  # not redone
    assert len(now) == 6 and not list(out.glob(".*"))  # nothing partial left


def test_batch_from_python_without_the_command_line(folders, tmp_path):
    """The library takes a BatchOptions, not argparse's Namespace."""
    from svd_animate.batch import BatchOptions, dry_run_listing
    from svd_animate.config import load_preset

    refs, poses = folders
    out = tmp_path / "out"
    jobs = jobs_from_folders(refs, poses, out)
    out.mkdir()
    jobs[0].output.write_bytes(b"done")
    listing = dry_run_listing(jobs, load_preset("tiny").replace(detector="mediapipe"),
                              BatchOptions(out, RunSettings(use_cache=False)), unreadable={})
    lines = listing.splitlines()
    assert len(lines) == 5 and lines[-1] == "4 jobs: 3 to run, 1 already done (skipped), 0 with unreadable inputs"
    assert "skip" in lines[0] and all("npz" in line for line in lines[:4])
