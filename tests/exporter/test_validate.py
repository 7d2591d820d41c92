"""``compare_runners`` / ``within_tolerance`` cannot be fooled: a NaN or inf in either runtime's logits or KV
cache fails (named by output, case, step and position), so does a wrong finite answer, and the ``chunked`` case
catches a runtime that mishandles a multi-token step on a non-empty cache."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from layerpair.arch import ArchSpec
from layerpair.errors import ValidationError
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.exporter.precision import within_dtype_tolerance
from layerpair.exporter.validate import (
    Agreement,
    OrtRunner,
    Runner,
    TorchRunner,
    compare_runners,
    record_reference,
    within_tolerance,
)
from tests.conftest import tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> tuple[Decoder, Path]:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    path = tmp_path_factory.mktemp("validate") / "model.onnx"
    export_onnx(dec, path)
    return dec, path


class Poisoned(Runner):
    """``inner`` with one value overwritten in call ``at`` (1-based): in the logits (``which`` None) or in
    present ``which``."""

    def __init__(self, inner: Runner, at: int, value: float, which: int | None = None) -> None:
        self.inner, self.at, self.value, self.which = inner, at, value, which
        self.calls = 0

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, presents = self.inner.step(ids, mask, pos, past)
        self.calls += 1
        if self.calls == self.at:
            if self.which is None:
                logits = logits.copy()
                logits[0, -1, 5] = self.value if math.isnan(self.value) else logits[0, -1, 5] + self.value
            else:
                presents = list(presents)
                t = presents[self.which].copy()
                t[0, 0, -1, 3] = self.value
                presents[self.which] = t
        return logits, presents


class IgnoresPastOnChunks(Runner):
    """A runtime bug the prefill/decode/padded cases cannot see: a multi-token step on a non-empty cache
    attends to the new tokens only."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if ids.shape[1] > 1 and past[0].shape[2] > 0:
            logits, new = self.inner.step(ids, mask[:, -ids.shape[1] :], pos, [p[:, :, :0] for p in past])
            return logits, [np.concatenate([p, n], axis=2) for p, n in zip(past, new, strict=True)]
        return self.inner.step(ids, mask, pos, past)


def test_onnx_agrees_on_all_four_cases(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    res = compare_runners(OrtRunner(path, dec.io, threads=1), dec.io, TorchRunner(dec), dec.io)
    assert list(res) == ["prefill", "decode", "chunked", "padded"]
    assert res["chunked"].positions == 10  # 5 tokens after the decode cache, 5 after one masked slot
    assert within_tolerance(res, ATOL) == [], {k: a.to_json() for k, a in res.items()}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_onnx_logits_fail(tiny_onnx: tuple[Decoder, Path], value: float) -> None:
    dec, path = tiny_onnx
    ours = Poisoned(OrtRunner(path, dec.io, threads=1), at=3, value=value)  # call 3 = decode step 2
    res = compare_runners(ours, dec.io, TorchRunner(dec), dec.io)
    assert not math.isfinite(res["decode"].max_abs)
    bad = within_tolerance(res, ATOL)
    assert len(bad) == 1 and bad[0].startswith("decode: logits non-finite"), bad
    assert "decode step 2" in bad[0] and "position 17" in bad[0] and "vocab 5" in bad[0], bad


def test_nan_in_one_onnx_present_fails_and_is_named(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    # present 2 of the unmerged-pair layout = layer 1's key; poisoned in the prefill, so it also flows on
    ours = Poisoned(OrtRunner(path, dec.io, threads=1), at=1, value=math.nan, which=2)
    res = compare_runners(ours, dec.io, TorchRunner(dec), dec.io)
    bad = within_tolerance(res, ATOL)
    prefill = [b for b in bad if b.startswith("prefill:")]
    assert prefill == [b for b in bad if b.startswith("prefill: KV cache non-finite")], bad
    assert "KV cache of layer 1 (key)" in prefill[0] and "head 0 position 15" in prefill[0], bad
    assert math.isnan(res["prefill"].present_max_abs) and res["prefill"].max_abs <= ATOL


def test_nan_in_the_reference_fails_too(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    ref = Poisoned(TorchRunner(dec), at=1, value=math.nan)
    bad = within_tolerance(compare_runners(OrtRunner(path, dec.io, threads=1), dec.io, ref, dec.io), ATOL)
    assert bad and bad[0].startswith("prefill: logits non-finite") and "reference nan" in bad[0], bad


def test_wrong_finite_answer_fails(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, path = tiny_onnx
    ours = Poisoned(OrtRunner(path, dec.io, threads=1), at=7, value=1e-3)  # call 7 = the chunk after the cache
    bad = within_tolerance(compare_runners(ours, dec.io, TorchRunner(dec), dec.io), ATOL)
    assert len(bad) == 1 and bad[0].startswith("chunked: logits max_abs 0.001 > 0.0001"), bad


def test_chunked_case_catches_a_cache_bug_the_others_miss() -> None:
    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    bad = within_tolerance(
        compare_runners(IgnoresPastOnChunks(TorchRunner(dec)), dec.io, TorchRunner(dec), dec.io), ATOL
    )
    assert bad and all(b.startswith("chunked:") for b in bad), bad


def test_agreement_never_drops_a_nan() -> None:
    a = Agreement()
    ref = np.zeros((1, 2, 4), np.float32)
    big = ref.copy()
    big[0, 1, 2] = 5.0
    a.update(big, ref, np.ones((1, 2), bool), "step A")
    nan = ref.copy()
    nan[0, 0, 1] = np.nan
    a.update(nan, ref, np.ones((1, 2), bool), "step B")
    a.update(big, ref, np.ones((1, 2), bool), "step C")  # a larger finite error later does not hide it
    assert math.isnan(a.max_abs) and math.isnan(a.max_rel) and "step B" in a.max_abs_at
    a.update_present([np.full((1, 1, 2, 2), np.inf, np.float32)], [np.zeros((1, 1, 2, 2), np.float32)], "step D")
    assert a.present_max_abs == math.inf and "step D" in a.present_max_abs_at
    assert within_tolerance({"x": a}, ATOL) == [
        f"x: logits non-finite (nan) at {a.max_abs_at}",
        f"x: KV cache non-finite (inf) at {a.present_max_abs_at}",
    ]


def test_mistral_longer_than_its_sliding_window(tmp_path: Path) -> None:
    """Tiny Mistral, window 6: the 16-token prefill, the decode steps and the 5-token chunk after 20 cached
    tokens all reach past the window. The merged pair's ONNX agrees with PyTorch on all four cases, and the
    same check fails against a reference without the window (so the window is what is being checked)."""
    import onnx_ir as ir

    from layerpair.exporter.onnx_export import save_model
    from layerpair.graph_passes import merge_pairs
    from layerpair.iospec import IOSpec

    hf = tiny_model("mistral")
    arch = ArchSpec.from_hf_config(hf.config)
    assert set(arch.sliding_windows) == {6}
    dec = Decoder.from_hf(hf, arch, [(1, 2)])
    export_onnx(dec, tmp_path / "model.onnx")
    model, _ = merge_pairs(ir.load(str(tmp_path / "model.onnx")), arch, [(1, 2)])
    save_model(model, tmp_path / "merged.onnx", external_data=True)
    spec = IOSpec.for_model(arch, [(1, 2)], merged=True)
    res = compare_runners(OrtRunner(tmp_path / "merged.onnx", spec, threads=1), spec, TorchRunner(dec), dec.io)
    assert within_tolerance(res, ATOL) == [], {k: a.to_json() for k, a in res.items()}
    assert res["prefill"].positions == 16 > 6 and res["chunked"].positions == 10

    hf.config.sliding_window = None
    full = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    assert ArchSpec.from_hf_config(hf.config).sliding_windows == ()
    bad = within_tolerance(
        compare_runners(OrtRunner(tmp_path / "merged.onnx", spec, threads=1), spec, TorchRunner(full), full.io), ATOL
    )
    assert {b.split(":")[0] for b in bad} >= {"prefill", "decode", "chunked"}, bad


# ---- in-memory graphs: the unmerged graph validated on the Decoder's own tensors ----------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_in_memory_graph_agrees_and_leaves_the_model_unchanged(dtype: str) -> None:
    import torch

    from layerpair.exporter.onnx_export import build_model
    from layerpair.iospec import IOSpec

    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), [(1, 2)])
    typed = dec if dtype == "float32" else dec.to(torch.float16)
    typed.inv_freq = dec.inv_freq.float()
    model = build_model(typed)
    before = {n: type(v.const_value) for n, v in model.graph.initializers.items()}
    spec = IOSpec.for_model(dec.arch, dec.pairs, dtype=dtype)
    ref = record_reference(TorchRunner(Decoder.from_hf(hf, dec.arch, [(1, 2)])), dec.io)
    res = compare_runners(OrtRunner(model, spec, threads=1, prepack=False), spec, ref, dec.io)
    fp32 = dtype == "float32"
    assert (within_tolerance(res, ATOL) if fp32 else within_dtype_tolerance(res, dtype, ref.cache_max(), ATOL)) == []
    assert {n: type(v.const_value) for n, v in model.graph.initializers.items()} == before  # placeholders undone


def test_in_memory_graph_reads_the_decoder_tensors_in_place() -> None:
    """No copy: scaling a weight of the Decoder *after* the session was made changes ONNX Runtime's answer."""
    import torch

    from layerpair.exporter.onnx_export import build_model

    hf = tiny_model("llama")
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config))
    runner = OrtRunner(build_model(dec), dec.io, threads=1, prepack=False)
    ids = np.array([[3, 5, 7, 9]], np.int64)
    args = (ids, np.ones_like(ids), np.arange(4, dtype=np.int64)[None], [p.numpy() for p in dec.empty_past(1)])
    first = runner.step(*args)[0].copy()
    with torch.no_grad():
        dec.layers[0].mlp.down_proj.mul_(3.0)
    second = runner.step(*args)[0]
    with torch.no_grad():
        want = dec(*map(torch.from_numpy, args[:3]), *dec.empty_past(1))[0].numpy()
    assert not np.allclose(first, second, atol=1e-3)
    np.testing.assert_allclose(second, want, atol=ATOL)


def test_cache_at_masked_positions_is_not_compared_the_rest_is() -> None:
    """A position the mask drops (left padding) is never read again: an error there is not counted; the same
    error one position later, or a NaN there, is, and is named by its true batch row and position."""
    ref = [np.zeros((2, 1, 3, 2), np.float32) for _ in (0, 1)]  # K, V of one layer: batch 2, T 3
    kept = np.array([[True, True, True], [False, True, True]])  # row 1 left-padded by one
    ours = [t.copy() for t in ref]
    ours[1][1, 0, 0, :] = 7.0  # row 1's padding: not compared
    a = Agreement()
    a.update_present(ours, ref, "padded", kept_BT=kept)
    assert a.present_max_abs == 0.0
    ours[0][1, 0, 1, 0] = np.nan  # row 1's first real key
    a.update_present(ours, ref, "padded", kept_BT=kept)
    assert math.isnan(a.present_max_abs) and "batch 1 head 0 position 1" in a.present_max_abs_at
    b = Agreement()
    b.update_present(ours, ref, "padded", kept_BT=kept, key_rows=np.array([True, False]))  # row 1's keys skipped
    assert b.present_max_abs == 0.0 and b.keys_not_compared == 1


def test_reference_that_agrees_with_its_repeat_is_recorded_once(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, _ = tiny_onnx
    said: list[str] = []
    rec = record_reference(TorchRunner(dec), dec.io, None, said.append, check_repeat=True)
    assert rec.repeat == {"first_forward_vs_repeat": 0.0, "recorded": 1} and not said


@pytest.mark.parametrize("value", [1e-2, math.nan])
def test_reference_whose_first_forward_is_off_is_recorded_again(tiny_onnx: tuple[Decoder, Path], value: float) -> None:
    """A first forward off by 1e-2 in one logit (or NaN there) — as a first-call MKL race left it once — is caught
    by the repeat, said, and replaced: the recording then equals a clean one."""
    dec, _ = tiny_onnx
    said: list[str] = []
    rec = record_reference(Poisoned(TorchRunner(dec), 1, value), dec.io, None, said.append, check_repeat=True)
    assert rec.repeat is not None and rec.repeat["recorded"] == 2 and rec.repeat["second_recording_vs_repeat"] == 0.0
    assert not rec.repeat["first_forward_vs_repeat"] <= 1e-5 and "recording the reference again" in said[0]
    clean = record_reference(TorchRunner(dec), dec.io)
    assert all(np.array_equal(a[3], b[3]) for a, b in zip(rec.calls, clean.calls, strict=True))


def test_reference_that_never_reproduces_fails_loudly(tiny_onnx: tuple[Decoder, Path]) -> None:
    dec, _ = tiny_onnx

    class Drifting(Runner):
        def __init__(self) -> None:
            self.inner, self.n = TorchRunner(dec), 0

        def step(
            self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
        ) -> tuple[np.ndarray, list[np.ndarray]]:
            logits, presents = self.inner.step(ids, mask, pos, past)
            self.n += 1
            return logits + 1e-3 * self.n, presents

    with pytest.raises(ValidationError, match="does not reproduce itself"):
        record_reference(Drifting(), dec.io, None, check_repeat=True)
