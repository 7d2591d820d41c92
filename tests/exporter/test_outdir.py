"""``staged_output``: the finished directory gets the user's normal permissions (umask), not mkdtemp's 0700."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerpair.outdir import current_umask, staged_output


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o755), (0o002, 0o775), (0o077, 0o700)])
def test_output_dir_mode_follows_umask(tmp_path: Path, umask: None, mask: int, mode: int) -> None:
    os.umask(mask)
    assert current_umask() == mask
    dest = tmp_path / "sub" / "out"
    with staged_output(dest) as tmp:
        (tmp / "model.onnx").write_bytes(b"x")
    assert stat.S_IMODE(dest.stat().st_mode) == mode
    assert stat.S_IMODE(dest.parent.stat().st_mode) == mode  # a created parent: plain mkdir, same rule
    assert stat.S_IMODE((dest / "model.onnx").stat().st_mode) == mode & 0o666


def test_force_replacement_gets_the_umask_mode_too(tmp_path: Path, umask: None) -> None:
    os.umask(0o022)
    dest = tmp_path / "out"
    dest.mkdir(mode=0o700)
    with staged_output(dest, force=True) as tmp:
        (tmp / "report.json").write_text("{}")
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755 and (dest / "report.json").is_file()
