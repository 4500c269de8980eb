"""Atomic, no-clobber file output: a temp file in the same directory, fsync, then rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import OutputError


def check_writable(paths: Sequence[Path], *, force: bool) -> None:
    """Refuse before any work if an output exists (without ``force``) or its folder is missing.

    Raises:
        OutputError: reason ``output_exists`` or ``output_unwritable``.
    """
    for path in paths:
        if path.exists() and not force:
            raise OutputError(f"{path} exists; use --force to replace it")
        if not path.parent.is_dir():
            raise OutputError(f"folder {path.parent} does not exist", reason="output_unwritable")


def write_files_atomically(
    files: Sequence[tuple[Path, bytes]], *, force: bool, sync_folder: bool = True
) -> None:
    """Write every file or none: all go to temp files first, then each is renamed into place.

    Without ``force`` an existing target is never replaced (``os.link`` fails if it exists).
    Whatever stops the write (an error, ``KeyboardInterrupt``) removes the temp files and the
    files this call already placed, and is raised again. Each file's data is fsynced before it
    is placed; the folder too, unless ``sync_folder`` is false (a batch writing many files into
    one folder syncs it once at the end: :func:`fsync_folder`).

    Raises:
        OutputError: an output exists, or a write failed (temp files are removed).
    """
    check_writable([p for p, _ in files], force=force)
    temps: list[tuple[str, Path]] = []
    placed: list[Path] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            temps.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in temps:
            if force:
                Path(tmp).replace(path)
            else:
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise OutputError(f"{path} exists; use --force to replace it") from None
                Path(tmp).unlink()
            placed.append(path)
        if sync_folder:
            fsync_folder(temps[0][1].parent if temps else Path())
    except OSError as exc:
        _remove(placed)
        raise OutputError(
            f"cannot write {exc.filename or 'output'}: {exc.strerror}", reason="output_unwritable"
        ) from None
    except BaseException:  # OutputError, and an interrupt between two renames: no half pair
        _remove(placed)
        raise
    finally:
        for tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                Path(tmp).unlink()


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def fsync_folder(folder: Path) -> None:
    """Make the names placed in ``folder`` durable (fsync of the directory).

    Raises:
        OSError: the folder cannot be opened or synced.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
