"""Where runs, caches and weights live: a local (or NFS) folder, or a prefix on S3-compatible object
storage (`s3://bucket/prefix`).

Code reads and writes local files. A remote location is *mirrored*: each node keeps a local copy
under `SPLITMATCH_MIRROR` (default: the temp folder) and copies files down (`pull`) before it reads
them and up (`push`) after it writes them, at the points that need sharing: a pseudo-mask shard
when an actor finishes it, a manifest or a run's selected weights once written. An S3 object
appears whole or not at all, so a pushed file is as atomic as a local rename. Nodes share nothing
but the remote prefix, as on a cluster whose nodes have their own disks.

Endpoint and credentials come from the usual environment variables (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, ...), which pyarrow, Ray Train and boto3 (MLflow) all read; the config key
`storage.s3_endpoint_url` sets `AWS_ENDPOINT_URL` for the command and its Ray workers.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from splitmatch.files import write_atomic

REMOTE_SCHEMES = ("s3",)
# What Ray workers need to reach the same object store as the driver (credentials stay with the
# nodes: an instance role, or the environment their Ray processes were started with).
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def is_remote(location: str | os.PathLike) -> bool:
    return urlparse(str(location)).scheme in REMOTE_SCHEMES


def join(location: str, *parts: str) -> str:
    """`location` / parts, for a path or a URI."""
    if is_remote(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location, *parts))


def mirror_root() -> Path:
    return Path(os.environ.get("SPLITMATCH_MIRROR") or Path(tempfile.gettempdir(), "splitmatch-mirror"))


def local_path(location: str | os.PathLike) -> Path:
    """The local folder or file that stands for `location` on this node (absolute)."""
    if not is_remote(location):
        return Path(location).resolve()
    parsed = urlparse(str(location))
    return mirror_root() / parsed.scheme / parsed.netloc / parsed.path.strip("/")


def use_endpoint(endpoint_url: str | None) -> dict[str, str]:
    """Point this process at `endpoint_url` (when given) and return the variables Ray workers
    need for the same, to pass in their runtime environment."""
    if endpoint_url:
        for name in ENDPOINT_VARIABLES:
            os.environ[name] = endpoint_url
    return {name: os.environ[name] for name in ENDPOINT_VARIABLES if name in os.environ}


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def info(uri: str) -> dict | None:
    """{"size", "mtime_ns"} of a remote file, or None when there is none."""
    import pyarrow.fs

    fs, path = _fs(uri)
    found = fs.get_file_info(path)
    if found.type != pyarrow.fs.FileType.File:
        return None
    return {"size": found.size, "mtime_ns": found.mtime_ns}


def exists(location: str) -> bool:
    """A local path that exists, or a remote file or non-empty prefix."""
    if not is_remote(location):
        return Path(location).exists()
    return info(location) is not None or bool(listdir(location))


def listdir(uri: str) -> list[str]:
    """Names directly under a remote folder ([] when it does not exist)."""
    import pyarrow.fs

    fs, path = _fs(uri)
    selector = pyarrow.fs.FileSelector(path, allow_not_found=True)
    return sorted(Path(entry.path).name for entry in fs.get_file_info(selector))


def pull(uri: str, local: Path | None = None, refresh: bool = False) -> Path | None:
    """Copy a remote file to `local` (default: its mirror path); None when there is no such file.
    A local copy of the same size is kept unless `refresh` (files that change: manifests)."""
    local = Path(local or local_path(uri))
    remote = info(uri)
    if remote is None:
        return None
    if not refresh and local.is_file() and local.stat().st_size == remote["size"]:
        return local
    fs, path = _fs(uri)
    local.parent.mkdir(parents=True, exist_ok=True)

    def download(target) -> None:
        with fs.open_input_stream(path) as source:
            while chunk := source.read(1 << 22):
                target.write(chunk)

    return write_atomic(local, download)  # a reader never sees half a download


def pull_tree(uri: str, local: Path | None = None) -> Path:
    """Copy every file under a remote folder that the local mirror lacks (or has at another
    size); returns the local folder."""
    import pyarrow.fs

    local = Path(local or local_path(uri))
    fs, path = _fs(uri)
    selector = pyarrow.fs.FileSelector(path, recursive=True, allow_not_found=True)
    for entry in fs.get_file_info(selector):
        if entry.type == pyarrow.fs.FileType.File:
            relative = entry.path[len(path):].strip("/")
            pull(join(uri, relative), local / relative)
    return local


def push(local: Path, uri: str) -> None:
    """Upload one file; the object appears whole when the upload completes."""
    fs, path = _fs(uri)
    with open(local, "rb") as source, fs.open_output_stream(path) as target:
        while chunk := source.read(1 << 22):
            target.write(chunk)


def resolve_file(location: str) -> str:
    """A file argument that may be remote (a CLIP checkpoint on S3): the local path to read."""
    if not is_remote(location):
        return location
    local = pull(location)
    if local is None:
        raise FileNotFoundError(f"no such file: {location}")
    return str(local)


__all__ = ["is_remote", "join", "local_path", "mirror_root", "use_endpoint", "info", "exists", "listdir",
           "pull", "pull_tree", "push", "resolve_file"]
