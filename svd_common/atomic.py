"""Finishing an atomic write: the temporary file gets normal permissions, then replaces the target."""

from __future__ import annotations

import os
from pathlib import Path


# Read once, at import (one thread): reading it means setting it, process-wide, and a thread creating a file in
# that moment (the web page's uploads) would get a world-writable one.
_UMASK = os.umask(0)
os.umask(_UMASK)


def publish(tmp, path) -> Path:
    """Rename `tmp` over `path` with the mode a plain `open(path, "w")` would have given it
    (mkstemp creates files readable by their owner only)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)
    return Path(path)


def publish_folder(tmp, path) -> Path:
    """Rename the folder `tmp` (made by `tempfile.mkdtemp`, owner-only) to `path` with a plain folder's mode:
    a job built in a hidden folder appears whole or not at all."""
    os.chmod(tmp, 0o777 & ~_UMASK)
    os.replace(tmp, path)
    return Path(path)


def write_json(path, data, indent: int | None = 1) -> Path:
    """JSON written to a temporary name beside `path`, then renamed over it: readers never see half a file."""
    import json

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=indent))
    return publish(tmp, path)
