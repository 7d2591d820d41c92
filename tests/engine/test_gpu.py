"""GPU path: only where an NVIDIA GPU and TensorRT exist (never faked)."""

from __future__ import annotations

from pathlib import Path

import pytest

from layerpair.engine.build import engine_from_onnx, gpu_status
from layerpair.engine.profile import EngineLimits, profiles_from_limits
from tests.engine.conftest import HAVE_RTX, TinyExport

USABLE, WHY = gpu_status()
pytestmark = [
    pytest.mark.skipif(not USABLE, reason=f"needs an NVIDIA GPU: {WHY}"),
    pytest.mark.skipif(not HAVE_RTX, reason="TensorRT-RTX not installed"),
]
LIMITS = EngineLimits(2, 32, 128)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_engine_agrees_with_ort_and_pytorch(
    tiny_export: TinyExport, rtx_backend: object, tmp_path: Path, dtype: str
) -> None:
    from layerpair.engine.gpu import TrtStepRunner, engine_vs_ort, engine_vs_torch

    spec, profiles = tiny_export.specs[dtype], profiles_from_limits(LIMITS)
    build = engine_from_onnx(tiny_export.onnx[dtype], spec, tmp_path / "model.plan", profiles, rtx_backend)  # type: ignore[arg-type]
    assert build.bindings_checked_on == ["network", "engine"]
    tol = 1e-3 if dtype == "float32" else 5e-2
    vs_ort = engine_vs_ort(tmp_path / "model.plan", tiny_export.onnx[dtype], spec, profiles, rtx_backend, tol, 1e-3)  # type: ignore[arg-type]
    assert all(c["passed"] for c in vs_ort.values()), vs_ort
    runner = TrtStepRunner(tmp_path / "model.plan", spec, profiles, rtx_backend)  # type: ignore[arg-type]
    try:
        res = engine_vs_torch(runner, spec, tiny_export.dec32, list(range(5, 21)), n_tokens=64)
    finally:
        runner.close()
    g = res["generation"]
    assert g["tokens"] == 64 and g["teacher_forced_top1"] >= 0.95 and g["mean_kl"] < 1e-2
