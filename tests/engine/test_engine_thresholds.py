"""Engine checks enforce ENGINE_THRESHOLDS: the GPU comparisons run here with stand-in runners (ONNX Runtime,
and wrappers that break it), and a missed threshold fails the engine stage with exit 3."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from layerpair.engine import gpu, stage
from layerpair.engine.gpu import ENGINE_THRESHOLDS, engine_failures, engine_vs_torch, ort_providers
from layerpair.engine.profile import EngineLimits, profiles_from_limits
from layerpair.errors import ValidationError
from layerpair.exporter.validate import OrtRunner, Runner
from layerpair.iospec import IOSpec
from tests.engine.conftest import TinyExport

PROMPT = [5, 17, 99, 3, 42, 8, 61, 12, 4, 77, 31, 64, 2, 9, 100, 45]
N_TOKENS = 32


class Broken(Runner):
    """ONNX Runtime with its logits changed: Gaussian ``noise`` (standard deviation) or NaN at one position."""

    def __init__(self, inner: Runner, noise: float = 0.0, nan: bool = False) -> None:
        self.inner, self.noise, self.nan = inner, noise, nan
        self.rng = np.random.default_rng(0)

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, presents = self.inner.step(ids, mask, pos, past)
        logits = logits + self.noise * self.rng.standard_normal(logits.shape)
        if self.nan:
            logits[..., -1, 3] = np.nan
        return logits.astype(np.float32), presents


def _vs_ort(passed: bool = True, max_abs: float = 1e-4) -> dict[str, Any]:
    """What engine_vs_ort returns (it needs TensorRT itself), for both cases."""
    case = {"passed": passed, "onnxruntime_provider": "cpu", "max_abs": {"logits": max_abs, "present.0.key": 0.0}}
    return {"prefill": dict(case), "decode": dict(case)}


def _section(tiny: TinyExport, runner: Runner, dtype: str = "float16", **vs_ort: Any) -> dict[str, Any]:
    spec = tiny.specs[dtype]
    vt = engine_vs_torch(runner, spec, tiny.dec32, PROMPT, n_tokens=N_TOKENS)
    return {"ran": True, "vs_onnxruntime": _vs_ort(**vs_ort), "vs_pytorch": vt}


@pytest.fixture(scope="module")
def ort16(tiny_export: TinyExport) -> OrtRunner:
    return OrtRunner(tiny_export.onnx["float16"], tiny_export.specs["float16"], threads=1)


def test_a_faithful_engine_meets_the_thresholds(tiny_export: TinyExport, ort16: OrtRunner) -> None:
    assert engine_failures(_section(tiny_export, ort16), "float16") == []


def test_a_wrong_engine_fails_every_pytorch_threshold(tiny_export: TinyExport, ort16: OrtRunner) -> None:
    bad = engine_failures(_section(tiny_export, Broken(ort16, noise=3.0)), "float16")
    text = " | ".join(bad)
    assert "logits max_rel" in text and "greedy top-1 agreement" in text and "mean KL" in text


def test_a_nan_from_the_engine_fails(tiny_export: TinyExport, ort16: OrtRunner) -> None:
    bad = engine_failures(_section(tiny_export, Broken(ort16, nan=True)), "float16")
    assert any("logits max_rel nan" in b for b in bad)


@pytest.mark.parametrize(("passed", "max_abs"), [(False, 0.2), (True, float("nan"))])
def test_engine_vs_onnxruntime_miss_fails(
    tiny_export: TinyExport, ort16: OrtRunner, passed: bool, max_abs: float
) -> None:
    bad = engine_failures(_section(tiny_export, ort16, passed=passed, max_abs=max_abs), "float16")
    assert len(bad) == 2 and all(b.startswith("engine vs ONNX Runtime") for b in bad)


def test_thresholds_are_documented_per_dtype() -> None:
    assert set(ENGINE_THRESHOLDS) == {"float32", "float16", "bfloat16"}
    assert ENGINE_THRESHOLDS["float16"].torch_rel == 2e-2 and ENGINE_THRESHOLDS["bfloat16"].torch_rel == 8e-2


class _FakeTrt(Runner):
    """Stands in for TrtStepRunner in the stage: a (possibly broken) ONNX Runtime session."""

    noise = 0.0

    def __init__(self, plan: Path, spec: IOSpec, profiles: Any, backend: Any) -> None:
        self.inner = Broken(OrtRunner(plan.with_name("model.onnx"), spec, threads=1), noise=self.noise)

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.inner.step(ids, mask, pos, past)

    def close(self) -> None:
        pass


@pytest.mark.parametrize("noise", [0.0, 3.0])
def test_engine_stage_fails_with_exit_3_when_a_threshold_is_missed(
    tiny_export: TinyExport, monkeypatch: pytest.MonkeyPatch, noise: float
) -> None:
    monkeypatch.setattr(_FakeTrt, "noise", noise)
    monkeypatch.setattr(gpu, "TrtStepRunner", _FakeTrt)
    monkeypatch.setattr(gpu, "engine_vs_ort", lambda *a, **k: _vs_ort())
    out_dir = tiny_export.onnx["float16"].parent
    opts = stage.EngineOptions(n_tokens=N_TOKENS)
    profiles = profiles_from_limits(EngineLimits(2, 32, 128))
    args = (out_dir, tiny_export.specs["float16"], profiles, None, opts, tiny_export.dec32, None, lambda _: None)
    if noise == 0.0:
        section = stage.gpu_checks(*args)  # type: ignore[arg-type]
        assert section["passed"] and section["thresholds"] == ENGINE_THRESHOLDS["float16"].to_json()
        return
    with pytest.raises(ValidationError, match="the float16 engine misses its thresholds") as e:
        stage.gpu_checks(*args)  # type: ignore[arg-type]
    assert e.value.exit_code == 3


def test_onnx_side_runs_on_cuda_when_present(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    assert ort_providers() == ["cpu"]  # this machine
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert ort_providers() == ["cuda", "cpu"]
