"""Small files of a training job in its folder ``<train.storage_path>/<job>``, on a local path or
on an object store through pyarrow (the storage Ray Train checkpoints to): the recorded config,
metric points the tracking server did not take, and the listing of checkpoint folders."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"  # held (flock) by the job writing a results folder; the kernel drops it when the job dies


def job_dir(storage: str, job: str) -> tuple[Any, str]:
    """``(pyarrow filesystem or None for a local path, path)`` of a job's folder."""
    if "://" not in storage:
        return None, str(Path(storage) / job)
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    return fs, f"{root.rstrip('/')}/{job}"


def model_dir(storage: str, job: str) -> Path:
    """Where a finished job's ``model.pt`` is copied: its folder, or ``./rayrcm_results/<job>``
    for object-store storage."""
    return Path(storage) / job if "://" not in storage else Path(".") / "rayrcm_results" / job


def read_text(storage: str, job: str, name: str) -> str | None:
    """The text of ``<job>/<name>``, or None when it does not exist."""
    fs, d = job_dir(storage, job)
    if fs is None:
        f = Path(d) / name
        return f.read_text() if f.is_file() else None
    import pyarrow.fs

    if fs.get_file_info(f"{d}/{name}").type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(f"{d}/{name}") as f:
        return f.read().decode()


def write_text(storage: str, job: str, name: str, text: str) -> str:
    """Write ``<job>/<name>`` whole (a local temporary file renamed into place; object stores write
    whole objects). Returns where it is, for messages."""
    fs, d = job_dir(storage, job)
    if fs is None:
        Path(d).mkdir(parents=True, exist_ok=True)
        tmp = Path(d) / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, Path(d) / name)
        return str(Path(d) / name)
    fs.create_dir(d, recursive=True)
    with fs.open_output_stream(f"{d}/{name}") as f:
        f.write(text.encode())
    return f"{storage.rstrip('/')}/{job}/{name}"


def remove(storage: str, job: str, name: str) -> None:
    fs, d = job_dir(storage, job)
    if fs is None:
        (Path(d) / name).unlink(missing_ok=True)
    elif read_text(storage, job, name) is not None:
        fs.delete_file(f"{d}/{name}")


def checkpoint_dirs(fs: Any, root: str) -> list[str]:
    """The ``checkpoint_*`` folders directly under ``root`` on ``fs`` (a pyarrow filesystem)."""
    import pyarrow.fs

    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=False))
    except (FileNotFoundError, OSError):
        return []
    return sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                  and i.base_name.startswith("checkpoint_"))


@contextlib.contextmanager
def folder_lock(folder: Path, name: str, key: str = "name") -> Iterator[None]:
    """Hold ``folder``'s lock while a results job writes it: a second job on the same folder (two
    identical commands at once) is refused in one line instead of writing the same images twice. An
    advisory ``flock``: released when the holder exits or is killed, so a dead job never locks its folder."""
    import fcntl

    from rayrcm.errors import ConfigError

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise ConfigError(key, name, f"another rayrcm job (pid {holder}) is writing {folder}; wait for it to "
                                         "finish (then rerun to resume), or choose another name") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
