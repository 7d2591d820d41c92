"""Window-by-window validation (exporter/windowed.py): it passes on a correct export, and fails — naming the
window — when one weight in model.onnx.data is wrong or NaN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from layerpair.arch import ArchSpec
from layerpair.cli import main
from layerpair.errors import ValidationError
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx, save_model
from layerpair.exporter.weights import SafetensorsWeights
from layerpair.exporter.windowed import residual_values, validate_windowed
from layerpair.graph_passes import merge_pairs
from tests.conftest import tiny_model

TOKENS = list(np.random.default_rng(0).integers(0, 128, 30))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_windowed_export_through_the_cli(arch: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(tiny_checkpoints[arch]), "--pairs", "1:3", "-o", str(out), "--validation", "windowed",
                 "--window-gb", "1e-6"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["validation_mode"]["mode"] == "windowed"
    # merged in memory and written once (disk): the merged graph, the one shipped, is what is validated
    assert set(report["validation"]) == {"merged"} and report["passes"]["merge_attention"] == 1
    windows = report["validation"]["merged"]["windows"]
    assert len(windows) == 4 and all(w["passed"] for w in windows)  # blocks 0, (1,2), 3 and the head
    assert windows[-1]["logits_max_abs"] <= 1e-4 and all(w["cache_max_abs"] <= 1e-4 for w in windows)


def _export(tmp_path: Path) -> tuple[Path, Decoder, SafetensorsWeights]:
    d = tmp_path / "ckpt"
    m = tiny_model("llama")
    m.save_pretrained(d)
    reader = SafetensorsWeights(d)
    skel = Decoder.skeleton(ArchSpec.from_hf_config(m.config), [(1, 2)])
    path = tmp_path / "out" / "model.onnx"
    export_onnx(skel, path, source=skel.weight_source(reader))
    return path, skel, reader


def _poke(path: Path, name: str, value: float) -> None:
    """Overwrite the first element of initializer ``name`` inside model.onnx.data."""
    model = onnx.load(str(path), load_external_data=False)
    t = next(t for t in model.graph.initializer if t.name == name)
    offset = int(next(e.value for e in t.external_data if e.key == "offset"))
    data = path.with_name(path.name + ".data")
    raw = bytearray(data.read_bytes())
    raw[offset : offset + 4] = np.float32(value).tobytes()
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize(("value", "needle"), [(0.5, "max_abs"), (float("nan"), "nan")])
def test_a_wrong_weight_fails_its_window(tmp_path: Path, value: float, needle: str) -> None:
    path, skel, reader = _export(tmp_path)
    source = skel.weight_source(reader)
    validate_windowed(path, skel.io, skel, source, TOKENS, 1e-4, 1, lambda m: None)  # correct: passes
    _poke(path, "layers.3.mlp.down_proj", value)
    with pytest.raises(ValidationError, match=needle) as e:
        validate_windowed(path, skel.io, skel, source, TOKENS, 1e-4, 1, lambda m: None)
    assert "blocks (2, 3)" in str(e.value)  # block 2 is layer 3 (blocks: 0, (1,2), 3), and only that window
    assert "blocks (3, 3)" not in str(e.value)  # the head window reads PyTorch's input: it still passes


def test_residual_stream_found_before_and_after_merging(tmp_path: Path) -> None:
    path, skel, _ = _export(tmp_path)
    n = 2 * len(skel.blocks) + 1  # x and h per block, then the final norm's input
    assert len(residual_values(onnx.load(str(path), load_external_data=False).graph)) == n
    model, _ = merge_pairs(ir.load(str(path)), skel.arch, [(1, 2)])
    save_model(model, tmp_path / "merged" / "model.onnx", external_data=True)
    assert len(residual_values(onnx.load(str(tmp_path / "merged" / "model.onnx"), load_external_data=False).graph)) == n


def test_windowed_16_bit(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """fp16: every window runs in ONNX Runtime against the fp32 PyTorch blocks (normwise fp16 tolerance); bf16:
    ONNX Runtime's CPU provider cannot run it, and the report says so instead of passing silently."""
    ck = str(tiny_checkpoints["llama"])
    flags = ["--pairs", "1:3", "--validation", "windowed", "--window-gb", "1e-6"]
    assert main([ck, "-o", str(tmp_path / "fp16"), "--dtype", "fp16", *flags]) == 0
    v = json.loads((tmp_path / "fp16" / "report.json").read_text())["validation"]
    assert all(w["passed"] for w in v["merged"]["windows"])
    assert 0 < v["merged"]["windows"][-1]["logits_max_abs"] < 2e-2 * 30  # really fp16: not exact, within tolerance
    assert main([ck, "-o", str(tmp_path / "bf16"), "--dtype", "bf16", *flags]) == 0
    v = json.loads((tmp_path / "bf16" / "report.json").read_text())["validation"]
    assert v["merged"]["executed"] is False and "bf16" in v["merged"]["why"]


def test_summary_worst_keeps_a_nan() -> None:
    """The console's worst-window figure: a NaN anywhere shows as NaN (Python's max(0.1, nan) is 0.1)."""
    import math

    from layerpair.cli import _worst

    assert _worst([0.1, None, 0.3]) == 0.3 and _worst([None]) == 0.0
    assert math.isnan(_worst([0.1, math.nan])) and math.isnan(_worst([math.nan, 0.1]))
