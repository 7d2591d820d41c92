"""Engine fixtures: tiny typed exports (fp32, fp16) shared by the session, and the TensorRT-RTX backend."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.exporter.precision import typed_decoder
from layerpair.iospec import IOSpec
from tests.conftest import tiny_model

HAVE_RTX = importlib.util.find_spec("tensorrt_rtx") is not None and importlib.util.find_spec("polygraphy") is not None
needs_rtx = pytest.mark.skipif(
    not HAVE_RTX, reason="TensorRT-RTX not installed: pip install 'tensorrt-rtx-cu13==1.7.1.116' 'polygraphy==0.53.6'"
)
TINY_PAIRS = [(1, 2)]


@dataclass
class TinyExport:
    dec32: Decoder  # fp32 reference
    onnx: dict[str, Path]  # dtype -> model.onnx
    specs: dict[str, IOSpec]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    m = tiny_model("llama")
    arch = ArchSpec.from_hf_config(m.config)
    dec32 = Decoder.from_hf(m, arch, TINY_PAIRS)
    root = tmp_path_factory.mktemp("tiny_engine")
    paths, specs = {}, {}
    for dtype in ("float32", "float16"):
        path = root / dtype / "model.onnx"
        export_onnx(typed_decoder(dec32, dtype), path)
        paths[dtype], specs[dtype] = path, IOSpec.for_model(arch, TINY_PAIRS, dtype=dtype)
    return TinyExport(dec32, paths, specs)


@pytest.fixture(scope="session")
def rtx_backend():  # type: ignore[no-untyped-def]
    if not HAVE_RTX:
        pytest.skip("TensorRT-RTX not installed: pip install 'tensorrt-rtx-cu13==1.7.1.116' 'polygraphy==0.53.6'")
    from layerpair.engine.backend import load_backend

    return load_backend("tensorrt-rtx")


def spec_of_export(export_dir: Path) -> IOSpec:
    """The I/O spec of an export directory's model.onnx (merged or not, whatever dtype), read without weights."""
    from layerpair.exporter.loading import load_config, resolve_source

    report = json.loads((export_dir / "report.json").read_text())
    arch = ArchSpec.from_hf_config(load_config(resolve_source(report["model"])))
    names = [i.name for i in onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph.input]
    pairs = [tuple(p) for p in report["pairs"]]
    for merged in (True, False):
        spec = IOSpec.for_model(arch, pairs, merged=merged, dtype=report["dtype"])
        if spec.input_names == names:
            return spec
    raise AssertionError(f"{export_dir}/model.onnx inputs match neither the merged nor the unmerged I/O spec")
