"""Output paths that would destroy an input: refused before any work.

An output is written under a temporary name and renamed over its path at the end, so an output path that is
one of the run's inputs replaces that input with the result (the driving clip with the animation, with exit
status 0). Every front end (CLI, batch, `pose`, the web page) asks `check_not_input` first.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError


def file_keys(path) -> set:
    """What identifies the file `path` names: its resolved path, and (when it exists) its device and inode, so a
    symlink or a hard link to a file shares a key with it."""
    path = Path(path)
    keys = {str(path.resolve())}
    try:
        stat = path.stat()
    except OSError:  # not there (yet): only its path can clash
        return keys
    return keys | {(stat.st_dev, stat.st_ino)}


def same_file(a, b) -> bool:
    """Whether `a` and `b` name one file (the same resolved path, or the same inode on the same device)."""
    return bool(file_keys(a) & file_keys(b))


def input_clash(output, inputs: dict) -> str | None:
    """The label of the input (`{"--pose": path, ...}`) that `output` would overwrite, None when none."""
    return next((label for label, path in inputs.items() if path is not None and same_file(output, path)), None)


def check_not_input(output, inputs: dict, what: str = "the output") -> None:
    """Refuse `output` when it is one of `inputs` (label -> path; None entries are skipped)."""
    label = input_clash(output, inputs)
    if label is not None:
        raise InputError(f"{output}: {what} would overwrite {label} {inputs[label]}; choose another output name")


def check_input_file(path) -> Path:
    """An input that must be a file: a folder or a missing path is named as what it is."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path
