"""Content keys and crash-safe files, for every cache (pseudo masks, toy CLIP) and run file.

A cache folder is named by a key of everything that changes its content, so another config gets
another folder rather than a stale one. A file is written under a temporary name beside its final
one (`.NAME.PID.tmp`), synced, then renamed: a crash never leaves a partial file under the final
name, and what a dead process left behind can be recognised and removed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def content_key(inputs: dict) -> str:
    """16 hex digits of the sha256 of `inputs` as canonical JSON."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """`write(handle)` into a temporary file beside `path`, synced, then renamed to `path`."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: dict) -> Path:
    return write_atomic(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))


def remove_stale(folder: Path, pattern: str) -> int:
    """Delete the temporaries matching `pattern` in `folder` (files or folders named
    `.NAME.PID.tmp`) whose process is gone, or is this one; returns how many."""
    removed = 0
    for path in Path(folder).glob(pattern):
        try:
            pid = int(path.name.split(".")[-2])
            os.kill(pid, 0)
            if pid != os.getpid():
                continue  # a live process is writing it
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            continue  # alive, owned by someone else
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


class Busy(Exception):
    """A lock that another live process holds: `holder` is what it wrote in the lock file."""

    def __init__(self, path: Path, holder: str):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.holder = holder


@contextlib.contextmanager
def held_lock(path: str | Path, holder: str):
    """Hold the lock file `path` (fcntl.flock, exclusive) for the `with` block, or raise Busy at
    once when another process holds it. `holder` (who and since when) is written into the file
    for that process's message. The kernel drops the lock when the process dies, so a crashed
    run never leaves its folder locked; the file itself stays, harmless."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise Busy(path, handle.read().strip()) from None
        try:  # who holds it, for the message of a process that finds it held
            handle.seek(0)
            handle.truncate()
            handle.write(holder)
            handle.flush()
        except OSError:  # a full disk: the lock holds all the same
            pass
        yield path
    finally:
        handle.close()  # releases the lock
