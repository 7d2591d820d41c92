"""Typed graphs are executed: the merged fp16/bf16 graph is held to the unmerged graph of its dtype at a tight
tolerance, the bf16 graph runs on ONNX's reference evaluator, and a large bf16 model says it was not run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from layerpair.arch import ArchSpec
from layerpair.errors import ValidationError
from layerpair.exporter import precision
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx, save_model
from layerpair.exporter.precision import (
    MERGE_TOLERANCE,
    TypedMergeCheck,
    record_unmerged,
    typed_decoder,
    within_dtype_tolerance,
)
from layerpair.exporter.validate import OrtRunner, RecordedRunner, TorchRunner, compare_runners, record_reference
from layerpair.graph_passes import merge_pairs
from layerpair.iospec import IOSpec
from tests.conftest import run_cli, tiny_model

PAIR = (1, 2)


@dataclass(frozen=True)
class Fp32:
    dec: Decoder
    reference: RecordedRunner

    @property
    def arch(self) -> ArchSpec:
        return self.dec.arch


@pytest.fixture(scope="module")
def fp32() -> Fp32:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [PAIR])
    return Fp32(dec, record_reference(TorchRunner(dec), dec.io))


def _typed(fp32: Fp32, dtype: str, root: Path) -> tuple[Path, IOSpec, TypedMergeCheck, list[str]]:
    """The unmerged typed export and its recorded check; the messages said while recording."""
    path = root / "model.onnx"
    export_onnx(typed_decoder(fp32.dec, dtype), path)
    spec = IOSpec.for_model(fp32.arch, [PAIR], merged=False, dtype=dtype)
    said: list[str] = []
    check = record_unmerged(path, spec, fp32.arch.num_parameters(), fp32.reference, fp32.dec.io, None, said.append)
    return path, spec, check, said


def _merged(path: Path, fp32: Fp32, dtype: str) -> tuple[Path, IOSpec]:
    """The pair merged in memory and written beside the unmerged graph (the graph passes do no file I/O)."""
    model, _ = merge_pairs(ir.load(str(path)), fp32.arch, [PAIR])
    merged = path.with_name("merged.onnx")
    save_model(model, merged, external_data=True)
    return merged, IOSpec.for_model(fp32.arch, [PAIR], merged=True, dtype=dtype)


def test_fp16_merged_graph_is_held_to_the_unmerged_one(fp32: Fp32, tmp_path: Path) -> None:
    path, _, check, _ = _typed(fp32, "float16", tmp_path)
    merged, mspec = _merged(path, fp32, "float16")
    entry = check.compare(merged, mspec, lambda _: None)["typed_merge_check"]
    assert entry["executed"] and entry["runtime"] == "onnxruntime"
    assert entry["tolerance"]["logits_max_rel"] == MERGE_TOLERANCE["float16"] == 8 * 2.0**-11
    for case in ("prefill", "decode", "chunked", "padded"):
        assert 0 < entry["agreement"][case]["max_rel"] <= MERGE_TOLERANCE["float16"]  # executed: not bit-equal


def test_fp16_merge_bug_hidden_by_the_dtype_tolerance_is_caught(fp32: Fp32, tmp_path: Path) -> None:
    """One branch's down projection scaled by 1.05 in the merged graph: within fp16's 2e-2 of the fp32 reference,
    beyond 8 unit roundoffs of the unmerged fp16 graph."""
    path, _, check, _ = _typed(fp32, "float16", tmp_path)
    model, _ = merge_pairs(ir.load(str(path)), fp32.arch, [PAIR])
    i = fp32.arch.intermediate_size
    down = next(v for v in model.graph.initializers.values() if v.name.startswith("lp_red") and v.shape[0] == 2 * i)
    w = down.const_value.numpy().copy()
    w[i:] *= 1.05
    down.const_value = ir.tensor(w)
    bad = tmp_path / "bad.onnx"
    save_model(model, bad, external_data=True)
    mspec = IOSpec.for_model(fp32.arch, [PAIR], merged=True, dtype="float16")
    vs_fp32 = compare_runners(OrtRunner(bad, mspec), mspec, fp32.reference, fp32.dec.io)
    assert within_dtype_tolerance(vs_fp32, "float16", fp32.reference.cache_max(), 1e-4) == []  # it hides there
    with pytest.raises(ValidationError, match="merged float16 graph disagrees with the unmerged float16 graph"):
        check.compare(bad, mspec, lambda _: None)


def test_bf16_graph_runs_on_the_reference_evaluator(fp32: Fp32, tmp_path: Path) -> None:
    path, _, check, said = _typed(fp32, "bfloat16", tmp_path)
    vs_fp32 = check.report["vs_fp32_reference"]
    # Really bf16 arithmetic (not an fp32 run in disguise), and within the bf16 tolerance of the fp32 reference.
    assert all(1e-3 < a["max_rel"] <= 8e-2 for a in vs_fp32.values())
    merged, mspec = _merged(path, fp32, "bfloat16")
    entry = check.compare(merged, mspec, said.append)["typed_merge_check"]
    assert entry["executed"] and entry["runtime"] == "onnx.reference"
    assert all(a["max_rel"] <= MERGE_TOLERANCE["bfloat16"] for a in entry["agreement"].values())
    assert any("merged vs unmerged bfloat16 graph (onnx.reference)" in s for s in said)


def test_bf16_beyond_the_evaluator_says_it_was_not_executed(
    fp32: Fp32, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(precision, "EVALUATOR_MAX_PARAMETERS", fp32.arch.num_parameters() - 1)
    path, _, check, said = _typed(fp32, "bfloat16", tmp_path)
    assert check.unmerged is None
    assert len(said) == 1 and "the bf16 ONNX graph was NOT executed" in said[0]
    merged, mspec = _merged(path, fp32, "bfloat16")
    entry = check.compare(merged, mspec, lambda _: None)["typed_merge_check"]
    assert entry == {"dtype": "bfloat16", "executed": False, "reason": said[0]}


def test_fp32_has_nothing_to_add(fp32: Fp32, tmp_path: Path) -> None:
    path, _, check, said = _typed(fp32, "float32", tmp_path)
    assert said == [] and check.compare(path, fp32.dec.io, lambda _: None) == {}


@pytest.mark.parametrize("flag", ["fp16", "bf16"])
def test_cli_typed_export_runs_its_graphs(flag: str, tmp_path: Path) -> None:
    """Through the CLI: the report says which runtime executed the 16-bit graphs and how close they were."""
    ckpt = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(ckpt)
    out = tmp_path / "out"
    r = run_cli(str(ckpt), "--pairs", "1:3", "--dtype", flag, "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    entry = json.loads((out / "report.json").read_text())["typed_merge_check"]
    assert entry["executed"] and entry["runtime"] == ("onnxruntime" if flag == "fp16" else "onnx.reference")
    assert np.isfinite([a["max_rel"] for a in entry["agreement"].values()]).all()
    assert "merged vs unmerged" in r.stderr
