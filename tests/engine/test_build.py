"""TensorRT-RTX engines built on the CPU: tiny model and SmolLM2, fp32 and fp16, bindings vs the I/O spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerpair.engine.build import (
    Binding,
    EngineBuildError,
    bindings_from_network,
    check_bindings,
    engine_from_onnx,
    gpu_status,
)
from layerpair.engine.profile import EngineLimits, profiles_from_limits
from layerpair.iospec import IOSpec
from tests.conftest import run_cli
from tests.engine.conftest import TinyExport, needs_rtx, spec_of_export

LIMITS = EngineLimits(max_batch=2, max_seq=16, max_context=64)


def _good_bindings(spec: IOSpec) -> list[Binding]:
    ins = [Binding(t.name, t.dtype, tuple(d if isinstance(d, int) else -1 for d in t.dims), True) for t in spec.inputs]
    outs = [
        Binding(t.name, t.dtype, tuple(d if isinstance(d, int) else -1 for d in t.dims), False) for t in spec.outputs
    ]
    return ins + outs


def test_check_bindings_finds_each_kind_of_mismatch(tiny_export: TinyExport) -> None:
    spec = tiny_export.specs["float16"]
    good = _good_bindings(spec)
    assert check_bindings(good, spec) == []
    bad = list(good)
    bad[3] = Binding(bad[3].name, "float32", bad[3].shape, True)  # cache dtype
    bad[4] = Binding(bad[4].name, bad[4].dtype, (-1, 3, -1, 16), True)  # head count
    bad[5] = Binding(bad[5].name, bad[5].dtype, (1, 2, -1, 16), True)  # batch fixed
    bad[0] = Binding("tokens", "int64", (-1, -1), True)  # renamed
    problems = check_bindings(bad, spec)
    assert any("missing ['input_ids'], unexpected ['tokens']" in p for p in problems)
    assert any("dtype float32 != spec float16" in p for p in problems)
    assert any("axis 1 is 3, spec says 2" in p for p in problems)
    assert any("fixed to 1, spec says dynamic" in p for p in problems)
    swapped = [good[1], good[0], *good[2:]]
    assert any("order" in p for p in check_bindings(swapped, spec))


@needs_rtx
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_engine_builds_on_cpu_with_spec_bindings(
    tiny_export: TinyExport, rtx_backend: object, tmp_path: Path, dtype: str
) -> None:
    from polygraphy.backend.trt import NetworkFromOnnxPath

    spec = tiny_export.specs[dtype]
    _, network, _ = NetworkFromOnnxPath(str(tiny_export.onnx[dtype]), strongly_typed=True)()
    assert check_bindings(bindings_from_network(network), spec) == []
    plan = tmp_path / "model.plan"
    build = engine_from_onnx(tiny_export.onnx[dtype], spec, plan, profiles_from_limits(LIMITS), rtx_backend, {})  # type: ignore[arg-type]
    assert plan.stat().st_size == build.engine_bytes > 100_000
    assert build.backend["name"] == "tensorrt-rtx" and build.dtype == dtype
    assert [p["name"] for p in build.profiles] == ["decode", "prefill"]
    assert build.io == spec.to_json()
    assert build.bindings_checked_on[0] == "network"


@needs_rtx
def test_build_refuses_a_graph_that_does_not_match_the_spec(
    tiny_export: TinyExport, rtx_backend: object, tmp_path: Path
) -> None:
    wrong = tiny_export.specs["float16"]  # fp32 graph, fp16 spec
    with pytest.raises(EngineBuildError, match="dtype float32 != spec float16"):
        engine_from_onnx(
            tiny_export.onnx["float32"], wrong, tmp_path / "m.plan", profiles_from_limits(LIMITS), rtx_backend
        )  # type: ignore[arg-type]
    assert not (tmp_path / "m.plan").exists()


@needs_rtx
@pytest.mark.slow
def test_smollm2_fp32_engine(smollm2_lp_export: Path, rtx_backend: object, tmp_path: Path) -> None:
    spec = spec_of_export(smollm2_lp_export)
    assert spec.dtype == "float32"
    build = engine_from_onnx(
        smollm2_lp_export / "model.onnx",
        spec,
        tmp_path / "model.plan",
        profiles_from_limits(EngineLimits(1, 64, 256)),
        rtx_backend,
    )  # type: ignore[arg-type]
    assert build.engine_bytes > 100e6  # 135M fp32 parameters


@pytest.fixture(scope="session")
def smollm2_fp16_trt_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The issue's acceptance command, small limits to keep CI short."""
    if not __import__("tests.engine.conftest", fromlist=["HAVE_RTX"]).HAVE_RTX:
        pytest.skip("TensorRT-RTX not installed: pip install 'tensorrt-rtx-cu13==1.7.1.116' 'polygraphy==0.53.6'")
    out = tmp_path_factory.mktemp("smollm2_fp16") / "lp20-24-fp16"
    r = run_cli(
        "smollm2-135m",
        "--pairs",
        "20:24",
        "--trt",
        "--dtype",
        "fp16",
        "--trt-backend",
        "tensorrt-rtx",
        "--max-batch",
        "2",
        "--max-seq",
        "64",
        "--max-context",
        "256",
        "-o",
        str(out),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout + r.stderr


@needs_rtx
@pytest.mark.slow
def test_smollm2_fp16_trt_cli(smollm2_fp16_trt_export: tuple[Path, str]) -> None:
    out, console = smollm2_fp16_trt_export
    report = json.loads((out / "report.json").read_text())
    spec = spec_of_export(out)
    assert report["dtype"] == spec.dtype == "float16"
    e = report["engine"]
    assert (out / "model.plan").stat().st_size == e["engine_bytes"] > 50e6
    assert e["io"] == spec.to_json() and e["backend"]["name"] == "tensorrt-rtx"
    assert report["overflow_scan"]["dtype"] == "float16"
    usable, why = gpu_status()
    if not usable:
        assert e["gpu"] == {"ran": False, "reason": why}
        assert "engine NOT run" in console and why in console


@needs_rtx
def test_tiny_fp16_trt_cli_merged(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """The whole --trt --dtype fp16 path on a tiny checkpoint: typed export, merge, engine, report."""
    out = tmp_path / "out"
    args = [str(tiny_checkpoints["llama"]), "--pairs", "1-2", "--dtype", "fp16", "--trt", "--trt-backend"]
    args += ["tensorrt-rtx", "--max-seq", "16", "--max-context", "64", "-o", str(out)]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == "float16" and report["engine"]["dtype"] == "float16"
    assert report["engine"]["io"] == report["io"]
    assert (out / "model.plan").stat().st_size == report["engine"]["engine_bytes"]
    assert [1, 2] in [s["layers"] for s in report["io"]["cache_slots"]]  # built from the merged graph
    assert report["overflow_scan"]["findings"] == []
    if not gpu_status()[0]:
        assert "engine NOT run" in r.stdout and report["engine"]["gpu"]["ran"] is False
