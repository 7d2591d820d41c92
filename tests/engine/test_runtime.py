"""The generation runtime: one greedy loop over PyTorch, ONNX Runtime (and TensorRT on a GPU)."""

from __future__ import annotations

import numpy as np
import torch

from layerpair.arch import ArchSpec
from layerpair.engine.runtime import Generator, left_pad, mean_kl, top1_agreement
from layerpair.exporter.model import Decoder
from layerpair.exporter.validate import OrtRunner, TorchRunner
from tests.conftest import tiny_model
from tests.engine.conftest import TinyExport

PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [77, 12, 4]]


def test_left_pad_masks_and_positions() -> None:
    ids, mask, pos = left_pad(PROMPTS, pad_id=0)
    assert ids.shape == (2, 7) and ids[1].tolist() == [0, 0, 0, 0, 77, 12, 4]
    assert mask[1].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert pos[1].tolist() == [0, 0, 0, 0, 0, 1, 2] and pos[0].tolist() == list(range(7))


def test_greedy_matches_transformers_generate() -> None:
    m = tiny_model("llama")
    dec = Decoder.from_hf(m, ArchSpec.from_hf_config(m.config))
    gen = Generator(TorchRunner(dec), dec.io).generate([PROMPTS[0]], max_new_tokens=10)
    with torch.no_grad():
        ref = m.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert gen.tokens[0] == ref[0, len(PROMPTS[0]) :].tolist()


def test_batched_left_padded_equals_one_by_one(tiny_export: TinyExport) -> None:
    g = Generator(TorchRunner(tiny_export.dec32), tiny_export.dec32.io)
    batch = g.generate(PROMPTS, 8)
    assert batch.tokens == [g.generate([p], 8).tokens[0] for p in PROMPTS]


def test_ort_and_pytorch_generate_the_same_tokens(tiny_export: TinyExport) -> None:
    spec = tiny_export.specs["float32"]
    ort = Generator(OrtRunner(tiny_export.onnx["float32"], spec), spec).generate(PROMPTS, 12, keep_logits=True)
    ref = Generator(TorchRunner(tiny_export.dec32), tiny_export.dec32.io).generate(PROMPTS, 12, keep_logits=True)
    assert ort.tokens == ref.tokens
    assert top1_agreement(ref.step_logits, ort.step_logits) == 1.0
    assert mean_kl(ref.step_logits, ort.step_logits) < 1e-8


def test_stop_token_and_teacher_forcing(tiny_export: TinyExport) -> None:
    g = Generator(TorchRunner(tiny_export.dec32), tiny_export.dec32.io)
    free = g.generate([PROMPTS[0]], 8)
    stop = free.tokens[0][2]
    stopped = g.generate([PROMPTS[0]], 8, stop_ids={stop})
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    forced_seq = [[1, 2, 3, 4, 5]]
    forced = g.generate([PROMPTS[0]], 8, forced=forced_seq, keep_logits=True)
    assert len(forced.step_logits) == 5
    # the forced path's step-k choice equals a fresh greedy continuation of prompt + forced[:k]
    k = 3
    again = g.generate([PROMPTS[0] + forced_seq[0][:k]], 1)
    assert forced.tokens[0][k] == again.tokens[0][0]


def test_kl_and_top1_metrics() -> None:
    a = [np.array([[0.0, 1.0, 2.0]])]
    b = [np.array([[2.0, 1.0, 0.0]])]
    assert mean_kl(a, a) == 0.0 and mean_kl(a, b) > 0.5
    assert top1_agreement(a, a) == 1.0 and top1_agreement(a, b) == 0.0


def test_engine_vs_torch_metrics_run_on_cpu_with_any_runner(tiny_export: TinyExport) -> None:
    """The GPU path's comparison (engine_vs_torch) is runner-agnostic: exercise it here with ONNX Runtime."""
    from layerpair.engine.gpu import _feeds, engine_vs_torch

    spec = tiny_export.specs["float16"]
    res = engine_vs_torch(
        OrtRunner(tiny_export.onnx["float16"], spec), spec, tiny_export.dec32, PROMPTS[0], n_tokens=64
    )
    g = res["generation"]
    assert g["tokens"] == 64 and g["teacher_forced_top1"] >= 0.9 and 0 <= g["mean_kl"] < 1e-3
    assert 0 < g["logits_max_abs"] < 0.05 and 0 <= g["free_running_identical_prefix"] <= 64
    assert set(res["agreement"]) == {"prefill", "decode", "chunked", "padded"}
    feeds = _feeds(spec, 2, 3, 5, spec.arch.vocab_size)
    assert {k: v.shape for k, v in feeds.items()} == spec.shapes({"batch": 2, "sequence": 3, "past_sequence": 5})
    assert feeds["past_key_values.0.key"].dtype == np.float16 and feeds["input_ids"].dtype == np.int64
