"""End to end through the CLI on tiny checkpoints of every family: report, files, and ONNX vs transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers as tf

from layerpair.arch import ArchSpec
from layerpair.cli import main
from layerpair.exporter.validate import empty_past
from layerpair.iospec import IOSpec
from tests.conftest import ARCHS

REPORT_KEYS = {
    "model",
    "architecture",
    "num_layers",
    "pairs",
    "depth",
    "onnx",
    "agreement",
    "versions",
    "timings_s",
    "peak_rss_mb",
}


def _export(ckpt: Path, out: Path, pairs: str) -> dict:
    assert main([str(ckpt), "--pairs", pairs, "-o", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


def _ort_logits(out: Path, report: dict, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    io = report["io"]
    names = [t["name"] for t in io["inputs"]]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for t in io["inputs"][3:]:
        feeds[t["name"]] = np.zeros((ids.shape[0], t["dims"][1], 0, t["dims"][3]), np.float32)
    assert list(feeds) == names
    return sess.run(["logits"], feeds)[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_export_matches_transformers(arch: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """--pairs none: ONNX logits == transformers' AutoModelForCausalLM, padded batch included."""
    out = tmp_path / "out"
    report = _export(tiny_checkpoints[arch], out, "none")
    assert REPORT_KEYS <= set(report)
    assert report["pairs"] == [] and report["depth"] == 4 and report["architecture"] == arch
    for case in ("prefill", "decode", "padded"):
        a = report["agreement"][case]
        assert a["max_abs"] <= 1e-4 and a["top1"] == 1.0 and a["positions"] > 0
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_checkpoints[arch], attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 128, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    ours = _ort_logits(out, report, ids.numpy(), mask.numpy(), pos.numpy())
    valid = mask.bool().numpy()
    assert np.abs(ours - ref)[valid].max() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_export_with_pairs(arch: str, tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = _export(tiny_checkpoints[arch], out, "1-2")
    assert report["pairs"] == [[1, 2]] and report["depth"] == 3
    for case in ("prefill", "decode", "padded"):
        assert report["agreement"][case]["max_abs"] <= 1e-4
    assert (out / "model.onnx").is_file()
    assert not list(tmp_path.glob(".*partial"))  # staging directory renamed, not left behind


def test_io_names_and_dims(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "out"
    _export(tiny_checkpoints["llama"], out, "none")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    spec = IOSpec.for_model(ArchSpec.from_hf_config(tf.AutoConfig.from_pretrained(tiny_checkpoints["llama"])))
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*m.graph.input, *m.graph.output]
    }
    # The one I/O spec (tests: names and order, then a sample of dims) drives the ONNX graph's interface.
    assert [v.name for v in m.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert dims["past_key_values.0.key"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.3.value"] == ["batch", 2, "total_sequence", 16]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["logits"] == ["batch", "sequence", 128]
    assert {v.name for v in m.graph.input} >= set(spec.input_names[:3])


def test_external_data_on_request(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(tiny_checkpoints["qwen2"]), "-o", str(out), "--external-data"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["external_data"] == "model.onnx.data"
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size


def test_empty_past_layout() -> None:
    spec = IOSpec.for_model(ArchSpec.from_hf_config(tf.LlamaConfig(num_hidden_layers=4)), [(0, 1)], merged=True)
    shapes = [p.shape for p in empty_past(spec, 3)]
    assert (
        len(shapes) == 2 * 3 and shapes[0][1] == 2 * spec.arch.num_kv_heads and shapes[-1][1] == spec.arch.num_kv_heads
    )
