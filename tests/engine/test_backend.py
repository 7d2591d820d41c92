"""Backend resolution and the `--trt` missing-package error (no TensorRT needed for these)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from layerpair.engine import backend
from layerpair.engine.backend import resolve_backend
from layerpair.errors import InputError, MissingDependencyError


def _pretend_installed(monkeypatch: pytest.MonkeyPatch, modules: set[str]) -> None:
    monkeypatch.setattr(backend, "_installed", lambda name: name in modules)


def test_auto_prefers_datacenter_tensorrt_then_rtx(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_installed(monkeypatch, {"tensorrt", "tensorrt_rtx", "polygraphy"})
    assert resolve_backend("auto") == "tensorrt"
    _pretend_installed(monkeypatch, {"tensorrt_rtx", "polygraphy"})
    assert resolve_backend("auto") == "tensorrt-rtx"
    assert resolve_backend("tensorrt-rtx") == "tensorrt-rtx"


def test_missing_packages_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _pretend_installed(monkeypatch, set())
    with pytest.raises(MissingDependencyError) as e:
        resolve_backend("auto")
    msg = str(e.value)
    assert "\n" not in msg
    assert "tensorrt-rtx-cu13==1.7.1.116" in msg and "polygraphy==0.53.6" in msg and "tensorrt==" in msg
    _pretend_installed(monkeypatch, {"tensorrt_rtx"})
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'polygraphy==0.53.6'")):
        resolve_backend("tensorrt-rtx")
    _pretend_installed(monkeypatch, {"tensorrt_rtx", "polygraphy"})
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'tensorrt==10.13.3.9'")):
        resolve_backend("tensorrt")


def test_unknown_backend_is_input_error() -> None:
    with pytest.raises(InputError, match="--trt-backend 'cuda' is not known"):
        resolve_backend("cuda")


# Hide both TensorRT modules from find_spec, run the CLI, and report whether torch got imported: the error
# must come before any export work (the export parser alone imports torch).
_NO_TRT = """
import importlib.util as u, sys
real = u.find_spec
u.find_spec = lambda name, *a, **k: None if name.split(".")[0] in ("tensorrt", "tensorrt_rtx") else real(name, *a, **k)
from layerpair.cli import main
rc = main(sys.argv[1:])
print("torch imported:", "torch" in sys.modules)
sys.exit(rc)
"""


def test_trt_without_tensorrt_fails_before_any_export_work(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-c", _NO_TRT, "smollm2-135m", "--pairs", "20:24", "--trt", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --trt needs TensorRT"), r.stderr
    assert "tensorrt-rtx-cu13==1.7.1.116" in lines[0] and "polygraphy==0.53.6" in lines[0]
    assert "torch imported: False" in r.stdout
    assert not out.exists()
