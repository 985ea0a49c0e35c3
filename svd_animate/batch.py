"""Batch jobs: many (reference, driving clip) pairs with the models loaded once per process.

- Jobs come from two folders (every pair, or pairs matched by file stem) or from a manifest
  (CSV or YAML, one row per job, optional per-job overrides). Every structural problem (empty
  folder, missing column, path that does not exist, bad value, two jobs writing one file) is
  listed at once, before any work; files that exist but cannot be read fail their own jobs only.
- Resumable: a job whose output exists is skipped (outputs are written to a temporary name and
  renamed, so an existing output is a finished one); leftovers of a killed run are removed.
- One job's failure is recorded and the batch goes on.
- Several processes (`accelerate launch` or `--num-processes`): jobs are split by driving clip, so a
  clip is extracted once; each process writes its part of the report, the main one merges them.
- Or Ray workers (`--ray`, svd_animate/ray_batch.py), handed the jobs as they become free; job listing, skips,
  records and the report are this module's, shared by both backends.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import yaml
from tqdm import tqdm

from pose.skeleton import PoseSequence
from svd_common.atomic import write_json
from svd_common.errors import InputError, UserError
from svd_common.paths import file_keys
from svd_common.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, check_output_container, probe_video, read_image

from .config import AnimateConfig, expand_shortcuts, parse_value, per_job_fields
from .run import RunSettings

logger = logging.getLogger(__name__)

POSE_SUFFIXES = VIDEO_SUFFIXES | {".gif", ".npz"}
PAIRINGS = ("all", "name")
REPORT = "report.json"
PART_GLOB = ".*.part.*"  # VideoWriter's temporary files (the extension kept)

# Per-job overrides a manifest may set (the config fields marked per_job, and `guidance` for min and max).
JOB_OPTIONS = per_job_fields()
MANIFEST_COLUMNS = {"ref", "pose", "output", *JOB_OPTIONS}


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """How a batch runs, beyond the generation config (what `svd-animate batch` takes as flags): where, with which
    run settings (a device of None: this process's GPU when there is one, else the CPU), redo or skip, how written."""
    outdir: Path
    run: RunSettings = RunSettings()
    overwrite: bool = False
    side_by_side: bool = False


@dataclasses.dataclass(frozen=True)
class Job:
    number: int  # from 1: the manifest's row, the table's and report.json's `job`
    ref: Path
    pose: Path
    output: Path
    overrides: tuple = ()  # (key, value) pairs

    @property
    def name(self) -> str:
        return self.output.name


class Problems(list):
    """Problems found before any work; raised together as one InputError."""

    def raise_if_any(self, where: str) -> None:
        if self:
            lines = "\n".join(f"  {problem}" for problem in self)
            raise InputError(f"{where}: {len(self)} problem{'s' * (len(self) > 1)}, nothing was started:\n{lines}")


def default_output(ref: Path, pose: Path) -> str:
    return f"{pose.stem}__{ref.stem}.mp4"


def _listing(folder: Path, suffixes: set[str], what: str, problems: Problems) -> list[Path]:
    if not folder.is_dir():
        problems.append(f"{folder}: no such folder")
        return []
    visible = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in visible if p.suffix.lower() in suffixes]
    ignored = [p.name for p in visible if p.suffix.lower() not in suffixes]
    if ignored:
        logger.warning("%s: %d file%s left out, not %s: %s", folder, len(ignored), "s" * (len(ignored) > 1), what,
                       ", ".join(ignored[:5]) + (", ..." if len(ignored) > 5 else ""))
    if not files:
        problems.append(f"{folder}: no {what} in it ({', '.join(sorted(suffixes))})")
    return files


def jobs_from_folders(refs: Path, poses: Path, outdir: Path, pairing: str = "all") -> list[Job]:
    """Every reference with every clip, or (`pairing="name"`) each reference with the clip of the same stem."""
    problems = Problems()
    ref_files = _listing(Path(refs), IMAGE_SUFFIXES, "images", problems)
    pose_files = _listing(Path(poses), POSE_SUFFIXES, "videos or poses .npz", problems)
    problems.raise_if_any("batch")
    if pairing == "name":
        by_stem = {p.stem: p for p in pose_files}
        pairs = [(ref, by_stem[ref.stem]) for ref in ref_files if ref.stem in by_stem]
        if not pairs:
            raise InputError(f"--pairing name: no reference in {refs} has the stem of a clip in {poses}")
    elif pairing == "all":
        pairs = [(ref, pose) for pose in pose_files for ref in ref_files]
    else:
        raise InputError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    jobs = [Job(number, ref, pose, Path(outdir) / default_output(ref, pose))
            for number, (ref, pose) in enumerate(pairs, start=1)]
    _check_unique_outputs(jobs, problems)
    _check_outputs_are_not_inputs(jobs, problems)
    problems.raise_if_any("batch")
    return jobs


def _read_manifest(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # Excel saves CSV as UTF-8 with a byte-order mark
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        return [{k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None
                 and v not in ("", None)} for row in rows]
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML ({e})") from None
        data = data.get("jobs") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise InputError(f"{path}: expected a list of jobs (mappings with ref and pose), or jobs: [...]")
        return data
    raise InputError(f"{path}: a manifest is .csv, .yaml or .yml")


def jobs_from_manifest(path, outdir: Path, config: AnimateConfig | None = None) -> list[Job]:
    """One job per row: `ref`, `pose`, optional `output` (relative to OUTDIR) and overrides.
    Relative paths are relative to the manifest's folder. With `config`, each job's settings are
    checked against it too (e.g. an overlap not smaller than the window)."""
    path = Path(path)
    rows = _read_manifest(path)
    if not rows:
        raise InputError(f"{path}: no jobs in it")
    problems = Problems()
    jobs = []
    for number, row in enumerate(rows, start=1):
        where = f"job {number}"
        unknown = sorted(set(map(str, row)) - MANIFEST_COLUMNS)
        if unknown:
            problems.append(f"{where}: unknown column {', '.join(map(repr, unknown))} "
                            f"(known: ref, pose, output, {', '.join(JOB_OPTIONS)})")
        missing = [key for key in ("ref", "pose") if not row.get(key)]
        if missing:
            problems.append(f"{where}: no {' and no '.join(missing)}")
            continue
        files = {key: (path.parent / str(row[key])).resolve() if not Path(str(row[key])).is_absolute()
                 else Path(str(row[key])) for key in ("ref", "pose")}
        for key, file in files.items():
            if not file.is_file():
                problems.append(f"{where}: {key} {row[key]}: no such file")
        overrides = {}
        for key, annotation in JOB_OPTIONS.items():
            if key in row:
                try:
                    overrides[key] = parse_value(annotation, row[key])
                except ValueError as e:
                    problems.append(f"{where}: {key} must be {e}, got {row[key]!r}")
        if config is not None:
            try:
                config.with_given(**expand_shortcuts(overrides))
            except InputError as e:
                problems.append(f"{where}: {e}")
        output = Path(outdir) / str(row.get("output") or default_output(files["ref"], files["pose"]))
        try:
            check_output_container(output)
        except InputError as e:
            problems.append(f"{where}: {e}")
        jobs.append(Job(number, files["ref"], files["pose"], output, tuple(sorted(overrides.items()))))
    _check_unique_outputs(jobs, problems)
    _check_outputs_are_not_inputs(jobs, problems)
    problems.raise_if_any(str(path))
    return jobs


def _check_unique_outputs(jobs: list[Job], problems: Problems) -> None:
    seen = {}
    for job in jobs:
        if job.output in seen:
            problems.append(f"jobs {seen[job.output]} and {job.number} both write {job.output.name}")
        seen.setdefault(job.output, job.number)


def _check_outputs_are_not_inputs(jobs: list[Job], problems: Problems) -> None:
    """No job may write over a file that it, or another job, reads (`--overwrite` would replace it)."""
    inputs = {}
    for job in jobs:
        for column, path in (("ref", job.ref), ("pose", job.pose)):
            for key in file_keys(path):
                inputs.setdefault(key, (job.number, column, path))
    for job in jobs:
        clash = next((inputs[key] for key in file_keys(job.output) if key in inputs), None)
        if clash is not None:
            number, column, path = clash
            whose = "its own" if number == job.number else f"job {number}'s"
            problems.append(f"job {job.number}: output {job.output.name} would overwrite {whose} {column} {path}")


def unreadable_inputs(jobs: list[Job]) -> dict[Path, str]:
    """Files that exist but cannot be read, each with the reason; checked once per file."""
    reasons = {}
    for path in sorted({job.ref for job in jobs}):
        try:
            read_image(path)
        except InputError as e:
            reasons[path] = str(e)
    for path in sorted({job.pose for job in jobs}):
        try:
            PoseSequence.load(path) if path.suffix.lower() == ".npz" else probe_video(path)
        except InputError as e:
            reasons[path] = str(e)
    return reasons


def split_jobs(jobs: list[Job], num_processes: int) -> list[list[Job]]:
    """Jobs of one driving clip stay in one process (the clip is extracted once); clips go, largest
    first, to the process with the fewest jobs. The same jobs always give the same split."""
    by_clip: dict[Path, list[Job]] = {}
    for job in jobs:
        by_clip.setdefault(job.pose, []).append(job)
    shares: list[list[Job]] = [[] for _ in range(num_processes)]
    for clip_jobs in sorted(by_clip.values(), key=lambda group: (-len(group), str(group[0].pose))):
        min(shares, key=len).extend(clip_jobs)
    return [sorted(share, key=lambda job: job.number) for share in shares]


def remove_leftovers(outdir: Path) -> list[Path]:
    """Temporary files of a killed run (never a finished output)."""
    leftovers = sorted(Path(outdir).glob(PART_GLOB))
    for path in leftovers:
        path.unlink(missing_ok=True)
        logger.info("%s: removed (left by an interrupted run)", path)
    return leftovers


@dataclasses.dataclass
class Record:
    job: int
    ref: str
    pose: str
    output: str
    status: str  # done, skipped, failed
    error: str | None = None
    frames: int | None = None
    seconds: float = 0.0
    process: int = 0  # the process, or the Ray backend's worker, that ran it
    retries: int = 0  # how often it ran again because its worker was lost (the Ray backend)


def new_record(job: Job, process: int = 0, status: str = "done", error: str | None = None) -> Record:
    return Record(job.number, str(job.ref), str(job.pose), str(job.output), status, error, process=process)


def settled(job: Job, overwrite: bool, failed_inputs: dict[Path, str], process: int = 0) -> Record | None:
    """The record of a job that needs no run (an unreadable input: failed; an existing output: skipped), else None:
    decided where the jobs are listed, so every backend skips and fails them alike."""
    bad = [failed_inputs[p] for p in (job.ref, job.pose) if p in failed_inputs]
    if bad:
        return new_record(job, process, "failed", bad[0])
    if job.output.exists() and not overwrite:
        return new_record(job, process, "skipped")
    return None


def execute(job: Job, run_one: Callable[[Job], int], process: int = 0) -> Record:
    """Run one job (`run_one` returns its frame count); its failure is recorded, not raised, so the batch goes on."""
    record = new_record(job, process)
    started = time.perf_counter()
    try:
        record.frames = run_one(job)
    except UserError as e:
        record.status, record.error = "failed", str(e)
    except Exception as e:  # one job's fault (a bad file, a model error) must not stop the batch
        logger.debug("job %d failed", job.number, exc_info=True)
        record.status, record.error = "failed", f"{type(e).__name__}: {e}"
        _free_device_memory()
    record.seconds = round(time.perf_counter() - started, 3)
    return record


def announce(record: Record) -> None:
    """A failure is printed when it happens (above the progress bar), not only in the final table."""
    if record.status == "failed":
        tqdm.write(f"job {record.job} ({Path(record.output).name}) failed: {record.error}")


def run_jobs(jobs: list[Job], run_one: Callable[[Job], int], overwrite: bool = False,
             failed_inputs: dict[Path, str] | None = None, process: int = 0, progress: bool = True) -> list[Record]:
    """Run each job (`run_one` returns its frame count); skip finished ones; record failures and go on."""
    failed_inputs = failed_inputs or {}
    records = []
    bar = tqdm(jobs, desc=f"jobs (process {process})" if process else "jobs", unit="job", disable=not progress,
               position=0)
    for job in bar:
        bar.set_postfix_str(job.name)
        record = settled(job, overwrite, failed_inputs, process) or execute(job, run_one, process)
        announce(record)
        records.append(record)
    return records


def animate_job(animator, job: Job, side_by_side: bool) -> int:
    """One job on a loaded `Animator`: its frame count."""
    return animator(job.ref, job.pose, job.output, side_by_side, **dict(job.overrides)).frames


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_report(outdir: Path, process: int, num_processes: int) -> Path:
    return Path(outdir) / f".report.{process}-of-{num_processes}.json"


def merge_reports(outdir: Path, num_processes: int, seconds: float) -> dict:
    """report.json from every process's part (the parts are removed)."""
    records = []
    for process in range(num_processes):
        part = part_report(outdir, process, num_processes)
        if part.is_file():
            records += json.loads(part.read_text())
    report = write_report(outdir, records, num_processes, seconds)
    for process in range(num_processes):
        part_report(outdir, process, num_processes).unlink(missing_ok=True)
    return report


def write_report(outdir: Path, records: list[dict], processes: int, seconds: float, **summary) -> dict:
    """OUTDIR/report.json: the jobs in their numbers' order and the counts (`summary`: what a backend adds)."""
    records = sorted(records, key=lambda r: r["job"])
    counts = {status: sum(r["status"] == status for r in records) for status in ("done", "skipped", "failed")}
    report = {"summary": {"jobs": len(records), **counts, "processes": processes, "seconds": round(seconds, 3),
                          **summary}, "jobs": records}
    write_json(Path(outdir) / REPORT, report)
    return report


def print_report(report: dict, outdir: Path, label: str = "") -> int:
    """The table and the summary line; the exit status (1 when a job failed)."""
    summary = report["summary"]
    print(format_table(report["jobs"]))
    print(f"{Path(outdir) / REPORT}: {summary['jobs']} jobs, {summary['done']} done, {summary['skipped']} skipped, "
          f"{summary['failed']} failed in {summary['seconds']:.1f} s{label}")
    return 1 if summary["failed"] else 0


def format_table(records: list[dict]) -> str:
    """A plain-text table of the report's jobs."""
    header = ("job", "status", "frames", "seconds", "output / error")
    rows = [(str(r["job"]), r["status"], "" if r["frames"] is None else str(r["frames"]),
             f"{r['seconds']:.1f}", r["error"] if r["status"] == "failed" else Path(r["output"]).name)
            for r in records]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4]
             for row in [header, *rows]]
    return "\n".join(lines)


def prepare_outdir(outdir: Path) -> Path:
    """Create OUTDIR if needed and prove it writable before any work."""
    from svd_common.video import check_writable

    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"{outdir}: exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{outdir}: cannot create the output folder ({e.strerror or e})") from None
    check_writable(outdir / REPORT)
    return outdir


def pose_cache_state(job: Job, config, cache, detector) -> str:
    """'cached', 'to extract', or 'npz' (no extraction) for a job's driving clip."""
    from pose.extract import extraction_key

    from .animate import extract_settings, job_config

    if job.pose.suffix.lower() == ".npz":
        return "npz"
    if cache is None:
        return "to extract"
    config = job_config(config, job.pose, **dict(job.overrides))
    key = extraction_key(job.pose, detector, extract_settings(config))
    return "cached" if cache.path(key).is_file() else "to extract"


def dry_run_listing(jobs: list[Job], config, options: BatchOptions, unreadable: dict[Path, str]) -> str:
    from pose.detect import load_detector

    from .animate import detector_name

    cache = options.run.pose_cache()
    lines = []
    counts = {"run": 0, "skip": 0, "fail": 0}
    with load_detector(detector_name(config), dwpose_dir=options.run.dwpose_dir) as detector:
        for job in jobs:
            if job.ref in unreadable or job.pose in unreadable:
                action = "fail"
            else:
                action = "skip" if job.output.exists() and not options.overwrite else "run"
            counts[action] += 1
            poses = "-" if job.pose in unreadable else pose_cache_state(job, config, cache, detector)
            extra = " ".join(f"{k}={v}" for k, v in job.overrides)
            lines.append(f"{job.number:>4}  {action:<4}  poses {poses:<10}  {job.ref.name} + {job.pose.name} -> "
                         f"{job.output}{'  ' + extra if extra else ''}")
    lines.append(f"{len(jobs)} jobs: {counts['run']} to run, {counts['skip']} already done (skipped), "
                 f"{counts['fail']} with unreadable inputs")
    return "\n".join(lines)


def run_batch_process(jobs: list[Job], config, options: BatchOptions, unreadable: dict[Path, str],
                      label: str = "") -> int:
    """This process's share of the jobs; the main process then merges the report and prints it."""
    import torch
    from accelerate import PartialState

    from .animate import Animator

    started = time.perf_counter()
    state = PartialState(cpu=not torch.cuda.is_available() or (options.run.device or "").startswith("cpu"))
    outdir = Path(options.outdir)
    if state.is_main_process:
        remove_leftovers(outdir)
    state.wait_for_everyone()
    share = split_jobs(jobs, state.num_processes)[state.process_index]
    device = options.run.device or (str(state.device) if state.device.type == "cuda" else "cpu")
    with Animator(config, dataclasses.replace(options.run, device=device)) as animator:
        records = run_jobs(share, lambda job: animate_job(animator, job, options.side_by_side), options.overwrite,
                           unreadable, state.process_index, options.run.progress)
    write_json(part_report(outdir, state.process_index, state.num_processes),
               [dataclasses.asdict(record) for record in records])
    state.wait_for_everyone()
    if state.is_main_process:
        return print_report(merge_reports(outdir, state.num_processes, time.perf_counter() - started), outdir, label)
    return 1 if any(record.status == "failed" for record in records) else 0
