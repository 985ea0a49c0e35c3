"""`svd-animate batch --ray`: the local batch's outputs, skips, records and errors, run by Ray workers (a local Ray
with two CPUs here); a worker killed in a job, and Ctrl-C."""

import _thread
import collections
import json
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from svd_animate.batch import Job
from tests.test_batch import TINY, finished_outputs, run, write_poses, write_ref

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def folders(tmp_path):
    refs, poses = tmp_path / "refs", tmp_path / "poses"
    refs.mkdir(), poses.mkdir()
    write_ref(refs / "alice.png", 100), write_ref(refs / "bob.png", 200)
    write_poses(poses / "long.npz", 3), write_poses(poses / "walk.npz", 2)
    return refs, poses


@pytest.fixture
def one_thread():
    """Two workers on two CPUs run one thread each, and torch's CPU results depend on the thread count: the
    one-process batch they are compared with runs with one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(capsys, refs, poses, out, *extra):
    return run(capsys, "batch", "--refs", refs, "--poses", poses, "-o", out, *TINY, *extra)


def report_of(out) -> dict:
    return json.loads((out / "report.json").read_text())


def without_timing(records):
    """The records as two runs into two folders share them."""
    return [{**{k: v for k, v in r.items() if k not in ("seconds", "process")}, "output": Path(r["output"]).name}
            for r in records]


def contents(out) -> dict:
    return {name: (out / name).read_bytes() for name in finished_outputs(out)}


def test_ray_outputs_and_report_are_the_one_process_batchs_and_a_rerun_finishes_the_rest(
        local_ray, folders, tmp_path, capsys, one_thread):
    refs, poses = folders
    (refs / "broken.png").write_bytes(b"not a png")  # its jobs fail, the others run
    local = batch(capsys, refs, poses, tmp_path / "local")
    out = tmp_path / "ray"
    code, stdout, _ = batch(capsys, refs, poses, out, "--ray", "--num-processes", "2")
    assert local[0] == code == 1 and "6 jobs, 4 done, 0 skipped, 2 failed" in stdout
    assert contents(out) == contents(tmp_path / "local") and len(contents(out)) == 4
    report = report_of(out)
    assert without_timing(report["jobs"]) == without_timing(report_of(tmp_path / "local")["jobs"])
    assert {r["process"] for r in report["jobs"] if r["status"] == "done"} == {0, 1}  # both workers had jobs
    assert report["summary"] | {"seconds": 0} == {"jobs": 6, "done": 4, "skipped": 0, "failed": 2, "processes": 2,
                                                  "seconds": 0, "backend": "ray", "retries": 0}
    failures = [line for line in stdout.splitlines() if ") failed: " in line]
    assert failures == [line for line in local[1].splitlines() if ") failed: " in line] and len(failures) == 2

    kept = finished_outputs(out)
    for name in ("long__bob.mp4", "walk__alice.mp4"):  # as a batch stopped half-way leaves it
        (out / name).unlink()
    (out / ".long__bob.host.123.part.mp4").write_bytes(b"half")
    code, stdout, _ = batch(capsys, refs, poses, out, "--ray", "--num-processes", "2")
    assert code == 1 and "6 jobs, 2 done, 2 skipped, 2 failed" in stdout
    statuses = {Path(r["output"]).name: r["status"] for r in report_of(out)["jobs"]}
    assert statuses == {"long__alice.mp4": "skipped", "long__bob.mp4": "done", "long__broken.mp4": "failed",
                        "walk__alice.mp4": "done", "walk__bob.mp4": "skipped", "walk__broken.mp4": "failed"}
    now = finished_outputs(out)
    assert {name: now[name] for name in statuses if statuses[name] == "skipped"} == \
        {name: kept[name] for name in statuses if statuses[name] == "skipped"}  # not redone
    assert contents(out) == contents(tmp_path / "local") and not list(out.glob(".*"))


def worker_in_a_job() -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        if "AnimatorWorker.run_job" in " ".join(process.info["cmdline"] or []):
            return process
    return None


def kill_first_worker_in_a_job(killed: list) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        process = worker_in_a_job()
        if process is not None:
            time.sleep(0.5)  # well inside the job (the first one loads the models, then samples)
            process.kill()  # kill -9
            killed.append(process.pid)
            return
        time.sleep(0.05)


def test_a_worker_killed_in_a_job_has_its_job_run_again_once(local_ray, folders, tmp_path, capsys, one_thread):
    refs, poses = folders
    code, _, _ = batch(capsys, refs, poses, tmp_path / "local")
    assert code == 0
    killed = []
    killer = threading.Thread(target=kill_first_worker_in_a_job, args=(killed,))
    killer.start()
    out = tmp_path / "ray"
    code, stdout, _ = batch(capsys, refs, poses, out, "--ray", "--num-processes", "2")
    killer.join()
    assert killed and code == 0 and "4 jobs, 4 done, 0 skipped, 0 failed" in stdout
    report = report_of(out)
    assert sorted(r["job"] for r in report["jobs"]) == [1, 2, 3, 4]  # each job once
    assert [r["retries"] for r in report["jobs"]].count(1) == 1 and report["summary"]["retries"] == 1
    assert all(r["status"] == "done" for r in report["jobs"])
    assert contents(out) == contents(tmp_path / "local") and not list(out.glob(".*"))


def interrupt_when_a_job_is_done(out) -> None:
    deadline = time.monotonic() + 120
    while not finished_outputs(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    if finished_outputs(out):
        _thread.interrupt_main()  # Ctrl-C


def test_ctrl_c_stops_the_workers_reports_what_finished_and_a_rerun_finishes_the_rest(
        local_ray, folders, tmp_path, capsys):
    refs, poses = folders
    out = tmp_path / "out"
    threading.Thread(target=interrupt_when_a_job_is_done, args=(out,)).start()
    code, _, stderr = batch(capsys, refs, poses, out, "--ray", "--num-processes", "1")
    assert code == 130 and "interrupted" in stderr
    report = report_of(out)  # the jobs whose record had come back (an output may have appeared just after)
    assert report["summary"]["interrupted"] and report["summary"]["done"] < 4
    assert {Path(r["output"]).name for r in report["jobs"]} <= set(finished_outputs(out))
    finished = len(finished_outputs(out))

    code, stdout, _ = batch(capsys, refs, poses, out, "--ray", "--num-processes", "1")
    assert code == 0 and f"{4 - finished} done, {finished} skipped, 0 failed" in stdout
    assert len(finished_outputs(out)) == 4 and not list(out.glob(".*"))


@pytest.mark.parametrize("args", [
    ["--refs", "{refs}", "-o", "{tmp}/out"],
    ["--refs", "{refs}", "--poses", "{poses}", "-o", "{tmp}/file/out"],
    ["--jobs", "{tmp}/jobs.csv", "-o", "{tmp}/out"],
    ["--refs", "{refs}", "--poses", "{poses}", "-o", "{tmp}/out", "--retries", "-1"],
])
def test_the_same_errors_as_the_local_batch_before_anything_is_written(local_ray, folders, tmp_path, capsys, args):
    refs, poses = folders
    (tmp_path / "file").write_text("x")
    (tmp_path / "jobs.csv").write_text("ref,pose,seed\nrefs/alice.png,poses/walk.npz,seven\n")
    args = [a.format(refs=refs, poses=poses, tmp=tmp_path) for a in args]
    local = run(capsys, "batch", *args, *TINY)
    on_ray = run(capsys, "batch", *args, *TINY, "--ray")
    assert local[0] == on_ray[0] == 2 and local[2] == on_ray[2] and on_ray[2].startswith("svd-animate: error: ")
    assert not (tmp_path / "out").exists()


def test_without_ray_one_line_says_how_to_install_it(folders, tmp_path, capsys, monkeypatch):
    refs, poses = folders
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code, _, stderr = batch(capsys, refs, poses, tmp_path / "out", "--ray")
    assert code == 2
    assert stderr.strip() == "svd-animate: error: the Ray backend needs Ray: pip install 'svd-animate[ray]'"
    assert not (tmp_path / "out").exists()


def test_an_address_that_does_not_answer_is_one_line_in_seconds(monkeypatch):
    from svd_animate.ray_batch import connect
    from svd_common.errors import InputError

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh driver
    started = time.monotonic()
    with pytest.raises(InputError, match=r"^--ray: cannot connect to 127\.0\.0\.1:1 \(Connection refused\)$"):
        connect("127.0.0.1:1")
    assert time.monotonic() - started < 10


class LostWorker:
    """Ray as the driver sees it when the worker running a job has died."""
    exceptions = ray.exceptions

    @staticmethod
    def get(ref):
        raise ray.exceptions.ActorDiedError()


def test_a_job_runs_again_after_each_lost_worker_up_to_retries_then_fails_saying_so():
    from svd_animate.ray_batch import outcome

    job, lost = Job(3, Path("r.png"), Path("p.npz"), Path("out/o.mp4")), collections.Counter()
    assert [outcome(LostWorker, None, job, 1, lost, retries=2) for _ in range(2)] == [None, None]  # run again
    record = outcome(LostWorker, None, job, 0, lost, retries=2)
    assert (record.job, record.output, record.status, record.retries) == (3, "out/o.mp4", "failed", 2)
    assert record.error == "its worker was lost 3 times (The actor died unexpectedly before finishing this task.)"
    assert outcome(LostWorker, None, Job(4, job.ref, job.pose, Path("b.mp4")), 0, lost, retries=0).retries == 0


def test_a_device_index_is_refused_since_ray_gives_each_worker_its_gpu(tmp_path):
    from svd_animate.batch import BatchOptions
    from svd_animate.ray_batch import start_workers
    from svd_animate.run import RunSettings
    from svd_common.errors import InputError

    with pytest.raises(InputError, match=r"^--device cuda:1: with --ray, Ray gives each worker its GPU"):
        start_workers(ray, None, BatchOptions(tmp_path, RunSettings(device="cuda:1")), None)
