"""benchmarks.ort_decode on tiny exports (portable and --target ort): the JSON it writes, no timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from benchmarks.ort_decode import SCHEMA, main
from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import build_model, save_model
from layerpair.graph_passes.ort_target import to_ort
from tests.conftest import tiny_model


def test_times_portable_and_ort_exports_side_by_side(tmp_path: Path) -> None:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config))
    model: ir.Model = build_model(dec)
    save_model(model, tmp_path / "portable" / "model.onnx", external_data=True)
    fused, _ = to_ort(build_model(dec), dec.io)
    save_model(fused, tmp_path / "ort" / "model.onnx", external_data=True)
    out = tmp_path / "res" / "ort_decode.json"
    argv = [f"portable={tmp_path / 'portable'}", f"ort={tmp_path / 'ort'}", "--prompt", "8", "--steps", "3"]
    argv += ["--speedup", "ort/portable"]
    assert main([*argv, "--rounds", "2", "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    s = {n: np.array(doc["models"][n]["ms_per_token"]["samples"]) for n in ("ort", "portable")}
    assert doc["speedups"]["ort/portable"]["median"] == float(np.median(s["portable"] / s["ort"]))
    assert doc["schema"] == SCHEMA and set(doc["models"]) == {"portable", "ort"}
    assert doc["settings"] == {"threads": 1, "batch": 1, "prompt": 8, "steps": 3, "rounds": 2}
    for row in doc["models"].values():
        assert row["ms_per_token"]["n"] == 2 and row["ms_per_token"]["median"] > 0
    assert doc["models"]["ort"]["nodes"] < doc["models"]["portable"]["nodes"]
    assert len(doc["load_average_start"]) == 3


def test_paired_ratios_keep_a_nan_and_a_bad_pair_is_refused(tmp_path: Path) -> None:
    from benchmarks.ort_decode import paired_ratios

    doc = {"models": {n: {"ms_per_token": {"samples": v}} for n, v in (("a", [1.0, float("nan")]), ("b", [2.0, 2.0]))}}
    assert np.isnan(paired_ratios(doc, ["a/b"])["a/b"]["median"])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"")
    with pytest.raises(SystemExit, match="--speedup 'm/x' is not A/B"):
        main([f"m={tmp_path / 'm'}", "--speedup", "m/x", "--out", str(tmp_path / "o.json")])


def test_replot_draws_from_the_json_files(tmp_path: Path) -> None:
    ms = {"genai": (2.0, 1.5, 2.5), "ort-lp": (1.0, 0.9, 1.1)}
    doc = {
        "models": {n: {"ms_per_token": dict(zip(("median", "q25", "q75"), v, strict=True))} for n, v in ms.items()},
        "settings": {"threads": 2},
        "date": "2026-12-03T09:20:00Z",
        "load_average_start": [0.1, 0.1, 0.1],
    }
    (tmp_path / "a.json").write_text(json.dumps(doc))
    png = tmp_path / "p.png"
    assert main([str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--replot", "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
