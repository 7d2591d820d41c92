"""benchmarks.quant_ppl: the window NLL is the log-softmax of the session's logits (checked against PyTorch's
cross entropy on the same Decoder), a NaN logit gives NaN, never a number."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from benchmarks.ort_decode import SessionDecoder
from benchmarks.quant_ppl import ratios, window_nll
from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import build_model, save_model
from tests.conftest import tiny_model


def test_window_nll_is_cross_entropy_and_nan_stays_nan(tmp_path: Path) -> None:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config))
    save_model(build_model(dec), tmp_path / "m" / "model.onnx", external_data=True)
    sess = SessionDecoder(tmp_path / "m" / "model.onnx", 1)
    ids = np.random.default_rng(0).integers(0, dec.arch.vocab_size, (1, 12)).astype(np.int64)
    nll, n = window_nll(sess, ids)
    with torch.no_grad():
        t = torch.from_numpy(ids)
        logits = dec(t, torch.ones_like(t), torch.arange(12)[None], *dec.empty_past(1))[0]
        ref = torch.nn.functional.cross_entropy(logits[0, :-1].double(), t[0, 1:], reduction="sum").item()
    assert n == 11 and math.isclose(nll, ref, rel_tol=1e-5)

    class NanLogits(SessionDecoder):
        def step(self, ids, total, past):  # type: ignore[no-untyped-def]
            logits, p = super().step(ids, total, past)
            logits[0, 3, 5] = np.nan
            return logits, p

    bad = NanLogits(tmp_path / "m" / "model.onnx", 1)
    assert math.isnan(window_nll(bad, ids)[0])
    assert ratios({"a": {"ppl": 2.0}, "a-int4": {"ppl": 2.2}}, [])["a-int4/a"] == 2.2 / 2.0
