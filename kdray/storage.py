"""The run storage: a local folder or a URI (``s3://bucket/prefix?endpoint_override=...``, ``gs://``, ...).

On a cluster every node must read what another wrote (teachers, checkpoints, the sweep's own state), so
whatever a worker writes goes to the run's storage, never to a path on the head. Ray Train and Tune read
and write such URIs through pyarrow's filesystems; kdray's own files go the same way. A URI's query string
(endpoint, scheme) belongs to the bucket, not to a path: ``join`` keeps it at the end.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in str(path)


def join(root: str, *parts: str) -> str:
    """``root/part/...`` for a folder or a URI, keeping a URI's ``?query`` after the path."""
    if not is_remote(root):
        return str(Path(root).joinpath(*parts))
    base, sep, query = str(root).partition("?")
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)]) + (sep + query if sep else "")


def _fs(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def exists(path: str) -> bool:
    if not is_remote(path):
        return Path(path).exists()
    import pyarrow.fs

    fs, p = _fs(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    """Write all of ``data`` or nothing: a local file is renamed into place; an object store's put is atomic."""
    if not is_remote(path):
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_text(path: str) -> str:
    return read_bytes(path).decode()


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def newest(folder: str, pattern: str) -> str | None:
    """The file of ``folder`` whose name matching ``pattern`` sorts last (how Tune picks its newest state file), or
    None when there is none."""
    import fnmatch

    if not is_remote(folder):
        names = [p.name for p in Path(folder).glob(pattern)]
    else:
        import pyarrow.fs

        fs, p = _fs(folder)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(p, allow_not_found=True))
        names = [i.base_name for i in infos if fnmatch.fnmatch(i.base_name, pattern)]
    return join(folder, max(names)) if names else None


def remove_tree(path: str) -> None:
    """Delete a folder (or a URI's prefix) and everything under it; nothing if it is not there."""
    if not is_remote(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = _fs(path)
    try:
        fs.delete_dir(p)
    except (FileNotFoundError, OSError):
        pass


def resolve_storage(path: str | None) -> str:
    """``--storage``: a URI (``s3://...``) as given, a folder made absolute (default ./kdray_runs)."""
    if path and is_remote(path):
        return path
    return str(Path(path or "kdray_runs").expanduser().resolve())
