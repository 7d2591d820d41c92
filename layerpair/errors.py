"""Typed errors. Every user-facing failure is one of these: a one-line message that names the problem and
the fix. The CLI prints ``error: <message>`` and exits with ``exit_code``; nothing else reaches the user."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class LayerpairError(Exception):
    """Base class: ``problem`` and ``fix`` are joined into the one-line message the CLI prints."""

    exit_code = 2

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class InputError(LayerpairError):
    """Bad user input: a path, a flag value, a spec."""


class ModelLoadError(LayerpairError):
    """The checkpoint cannot be found, read or downloaded."""


class NonFiniteWeightError(ModelLoadError):
    """A checkpoint weight is NaN or infinite."""


class UnsupportedModelError(LayerpairError):
    """The checkpoint loads but its architecture or a setting in it is outside what we support."""


class PairSpecError(InputError):
    """A ``--pairs`` value that does not describe disjoint adjacent in-range pairs."""


class OutputError(LayerpairError):
    """The output location exists or cannot be written."""


class ValidationError(LayerpairError):
    """ONNX Runtime disagrees with PyTorch beyond tolerance: the export is not trustworthy."""

    exit_code = 3


class MissingDependencyError(LayerpairError):
    """An optional package (TensorRT, tritonclient, ...) needed for the requested step is not installed."""


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _short_write(e: OSError) -> bool:
    """numpy's ``tofile`` (how onnx_ir writes a large tensor) reports a write cut short by a full disk without an
    errno: "N requested and M written" or "Not enough free space to write N bytes after offset M"."""
    msg = str(e)
    return e.errno is None and (("requested and" in msg and "written" in msg) or "free space" in msg)


@contextmanager
def disk_full_as_output_error(what: str) -> Iterator[None]:
    """A full disk (or quota, or file-size limit) while writing ``what`` becomes one OutputError line."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL and not _short_write(e):
            raise
        raise OutputError(
            f"no space left while writing {what} ({e.strerror or e})",
            "free disk space or choose another -o (an fp32 export needs ~4 bytes per parameter, twice while merging)",
        ) from None
