"""Atomic output directories: all work goes into a temporary sibling, renamed into place only on success.

A failed or interrupted run leaves the destination exactly as it was (absent, or the old directory when
``--force`` was given) and removes any parent directories it created. The finished directory has the mode a
plain ``mkdir`` would give it under the user's umask (not the temporary directory's 0700), so a server
running as another user can read an export.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from layerpair.errors import OutputError


def check_destination(dest: Path, force: bool) -> None:
    """Fail early (before any heavy work) if ``dest`` cannot be used."""
    if dest.exists() and not force:
        raise OutputError(f"output '{dest}' already exists", "pass --force to replace it, or choose another -o")
    if dest.exists() and not dest.is_dir():
        raise OutputError(f"output '{dest}' exists and is not a directory", "remove it or choose another -o")
    parent = _first_existing(dest.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create '{dest}': '{parent}' is not a directory", "choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to '{parent}' (permission denied)", "choose a writable -o location")


def _first_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextmanager
def staged_output(dest: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it becomes ``dest``."""
    dest = dest.absolute()
    check_destination(dest, force)
    created: list[Path] = []
    p = dest.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the result gets a plain mkdir's mode
    except OSError as e:
        _cleanup(created)
        raise OutputError(f"cannot create '{dest}' ({e.strerror})", "choose a writable -o location") from None
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _cleanup(created)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (``/proc/self/status``); elsewhere
    set and restored at once (``os.umask`` is the only portable way to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _cleanup(created: list[Path]) -> None:
    for d in created:  # innermost first
        try:
            d.rmdir()
        except OSError:
            pass
