"""Atomic output directories: all work goes into a temporary sibling, renamed into place only on success.

A failed or interrupted run leaves the destination exactly as it was (absent, or the old directory when
``--force`` was given) and removes any parent directories it created. The finished directory has the mode a
plain ``mkdir`` would give it under the user's umask (not the temporary directory's 0700), so a server
running as another user can read an export.

A run killed outright (SIGKILL, power loss) cannot clean up after itself, so its temporaries carry its pid —
``.{name}.{pid}.{random}.partial`` and ``.{name}.{pid}.old`` — and the next run for the same destination
removes those it can prove dead (``remove_stale``): the pid is no longer a live process on this machine. A
``.old`` left between the two renames of ``--force`` is the previous output: it is put back when the
destination is missing, so an interrupted replacement leaves the old export in place, as documented.
"""

from __future__ import annotations

import os
import re
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
    remove_stale(dest)
    check_destination(dest, force)
    created: list[Path] = []
    p = dest.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".partial", dir=dest.parent))
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the result gets a plain mkdir's mode
    except OSError as e:
        _cleanup(created)
        raise OutputError(f"cannot create '{dest}' ({e.strerror})", "choose a writable -o location") from None
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.{os.getpid()}.old")
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


def remove_stale(dest: Path) -> list[Path]:
    """Remove the temporaries of dead runs for ``dest`` (restoring a ``.old`` when ``dest`` is missing); returns
    what was removed or restored. A temporary whose pid is alive, or unreadable, is left alone."""
    parent = dest.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)\.(?:[A-Za-z0-9_]+\.partial|old)$")
    done = []
    for entry in sorted(parent.iterdir()):
        m = pattern.match(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink() or _alive(int(m.group(1))):
            continue
        if entry.name.endswith(".old") and not dest.exists():
            entry.rename(dest)  # the killed run had moved the previous output aside: put it back
        else:
            shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


def _alive(pid: int) -> bool:
    """True unless ``pid`` is certainly not a running process here (a zombie counts as alive: not reaped yet)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid we cannot ask about: not provably dead
    return True


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
