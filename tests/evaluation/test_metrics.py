"""Metrics against hand-computed values (fake backends with known distributions) and the block runner
against the Decoder itself."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from layerpair.errors import InputError
from layerpair.evaluation.data import MCItem, default_text, read_mc, split_held_out, windows_from_tokens
from layerpair.evaluation.forward import logits_from_ids
from layerpair.evaluation.metrics import (
    TorchBackend,
    encode_pair,
    mc_metrics,
    onnx_disagreement,
    text_metrics,
    text_metrics_many,
)
from layerpair.exporter.model import Decoder

V = 16


class Bigram:
    """logits[t] = table[token t]: a model whose every probability is known in closed form."""

    name = "bigram"

    def __init__(self, seed: int) -> None:
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed)) * 2

    def logits(self, ids_BW: Tensor) -> Tensor:
        return self.table[ids_BW]


def _logp(table: Tensor, prev: int, nxt: int) -> float:
    row = table[prev].double()
    return float(row[nxt] - torch.logsumexp(row, 0))


def test_perplexity_matches_hand_computation() -> None:
    toks = torch.randint(0, V, (5 * 8 + 3,), generator=torch.Generator().manual_seed(0)).tolist()
    w = windows_from_tokens(toks, 8, None)
    assert w.shape == (5, 8)  # trailing 3 tokens dropped
    m = Bigram(0)
    got = text_metrics(m, w, batch=2)
    # By hand: in each window, token t (t >= 1) is predicted from token t-1; the first token is not scored.
    nll = [-_logp(m.table, int(win[t - 1]), int(win[t])) for win in w for t in range(1, 8)]
    assert got.scored_tokens == 5 * 7 == len(nll)
    assert got.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-6)


def test_uniform_model_has_perplexity_vocab() -> None:
    class Uniform:
        name = "uniform"

        def logits(self, ids: Tensor) -> Tensor:
            return torch.zeros(*ids.shape, V)

    got = text_metrics(Uniform(), torch.randint(0, V, (3, 10)))
    assert got.ppl == pytest.approx(V)


def test_top1_and_kl_match_hand_computation() -> None:
    ref, lp = Bigram(1), Bigram(2)
    w = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(3))
    got = text_metrics(lp, w, ref=ref)
    kls, agree = [], []
    for win in w:
        for t in range(5):  # positions that predict a scored token
            p = torch.softmax(ref.table[win[t]].double(), 0)
            q = torch.softmax(lp.table[win[t]].double(), 0)
            kls.append(float((p * (p / q).log()).sum()))
            agree.append(int(p.argmax() == q.argmax()))
    assert got.kl == pytest.approx(np.mean(kls), rel=1e-5)
    assert got.top1 == pytest.approx(np.mean(agree))
    assert got.ppl_ratio == pytest.approx(got.ppl / text_metrics(ref, w).ppl)
    same = text_metrics(ref, w, ref=ref)
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1 == 1.0 and same.ppl_ratio == pytest.approx(1.0)


def test_many_backends_in_one_pass_equal_one_at_a_time() -> None:
    """``eval --onnx`` scores two backends against one reference pass: each gets the figures it gets alone."""
    ref, a, b = Bigram(1), Bigram(2), Bigram(3)
    w = torch.randint(0, V, (5, 7), generator=torch.Generator().manual_seed(5))
    many = text_metrics_many([a, b], w, ref=ref, batch=2)
    for got, model in zip(many, (a, b), strict=True):
        alone = text_metrics(model, w, ref=ref, batch=3)
        for f in ("ppl", "ref_ppl", "ppl_ratio", "top1", "kl"):
            assert getattr(got, f) == pytest.approx(getattr(alone, f), rel=1e-9), f
    assert many[0].kl != pytest.approx(many[1].kl)  # different models: the pairing of results is checked


class Poisoned(Bigram):
    """The bigram model with one logit of one window overwritten (a NaN/inf from a broken runtime)."""

    def __init__(self, seed: int, value: float) -> None:
        super().__init__(seed)
        self.value = value

    def logits(self, ids_BW: Tensor) -> Tensor:
        out = super().logits(ids_BW).clone()
        out[0, 2, 3] = self.value
        return out


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_onnx_vs_pytorch_non_finite_fails(value: float) -> None:
    """``eval --onnx``: a non-finite ONNX logit cannot pass as "perplexity within tolerance"."""
    ref = Bigram(1)
    w = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(5))
    pytorch, onnx, bad = text_metrics_many([Bigram(2), Bigram(2), Poisoned(2, value)], w, ref=ref, batch=2)
    assert onnx_disagreement(onnx, pytorch, 1e-3) is None  # the same model on both sides passes
    why = onnx_disagreement(bad, pytorch, 1e-3)
    assert why is not None and why.startswith("ONNX Runtime ppl is nan"), why
    why = onnx_disagreement(pytorch, bad, 1e-3)  # a broken reference side fails too
    assert why is not None and why.startswith("PyTorch ppl is nan"), why


def test_onnx_vs_pytorch_wrong_finite_fails() -> None:
    ref = Bigram(1)
    w = torch.randint(0, V, (4, 7), generator=torch.Generator().manual_seed(5))
    pytorch, other = text_metrics_many([Bigram(2), Bigram(3)], w, ref=ref, batch=2)
    why = onnx_disagreement(other, pytorch, 1e-3)
    assert why is not None and why.startswith("ONNX perplexity differs from PyTorch by"), why


def test_block_runner_equals_decoder(tiny_llama: Decoder) -> None:
    ids = torch.randint(0, tiny_llama.arch.vocab_size, (2, 12))
    for pairs in [(), ((1, 2),), ((0, 1), (3, 4))]:
        dec = Decoder(tiny_llama.arch, pairs)
        dec.load_state_dict(tiny_llama.state_dict())
        with torch.no_grad():
            want = dec(ids, torch.ones_like(ids), torch.arange(12).expand(2, 12), *dec.empty_past(2))[0]
        torch.testing.assert_close(logits_from_ids(tiny_llama, ids, pairs), want, rtol=0, atol=1e-5)


class Opaque:
    """The same model, but its Decoder hidden: no prefix can be shared, each backend runs every layer itself."""

    name = "opaque"

    def __init__(self, b: TorchBackend) -> None:
        self.b = b

    def logits(self, ids: Tensor) -> Tensor:
        return self.b.logits(ids)


def test_shared_prefix_shortcut_is_exact(tiny_llama: Decoder) -> None:
    w = torch.randint(0, tiny_llama.arch.vocab_size, (3, 16), generator=torch.Generator().manual_seed(4))
    lp, ref = TorchBackend(tiny_llama, ((3, 4),)), TorchBackend(tiny_llama, ())
    fast = text_metrics(lp, w, ref=ref, batch=2)

    slow = text_metrics(Opaque(lp), w, ref=Opaque(ref), batch=2)
    assert fast.ppl == pytest.approx(slow.ppl, rel=1e-6) and fast.kl == pytest.approx(slow.kl, rel=1e-5, abs=1e-9)
    assert fast.ppl_ratio != pytest.approx(1.0)  # the pair changes the model: the test can fail


@pytest.mark.parametrize("change", ["pair_weights", "prefix_weights"])
def test_shared_prefix_across_decoders_only_when_prefix_weights_are_equal(tiny_llama: Decoder, change: str) -> None:
    """A healed copy shares the prefix with the original; a copy whose early layers differ must not."""
    w = torch.randint(0, tiny_llama.arch.vocab_size, (3, 16), generator=torch.Generator().manual_seed(6))
    other = Decoder(tiny_llama.arch, ((3, 4),))
    other.load_state_dict(tiny_llama.state_dict())
    layer: Any = other.layers[3 if change == "pair_weights" else 0]
    with torch.no_grad():
        layer.mlp.down_proj.mul_(1.5)
    lp, ref = TorchBackend(other), TorchBackend(tiny_llama, ())
    got = text_metrics(lp, w, ref=ref, batch=2)
    assert next(iter(lp.prefix_cache.values()))[1] == (3 if change == "pair_weights" else 0)

    want = text_metrics(Opaque(lp), w, ref=Opaque(ref), batch=2)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6) and got.kl == pytest.approx(want.kl, rel=1e-5, abs=1e-9)
    assert got.ref_ppl == pytest.approx(want.ref_ppl, rel=1e-6)


def _char_encode(s: str) -> list[int]:
    return [ord(c) % V for c in s]


def test_multiple_choice_matches_hand_computation() -> None:
    m = Bigram(5)
    items = [
        MCItem("ab", ["cd", "e", "fgh"], 0),
        MCItem("hello ", ["x", "yy"], 1),  # trailing space moves into the continuation, as in the harness
        MCItem("q", ["aaaa", "b"], 1),
    ]
    got = mc_metrics(m, items, _char_encode, batch=3)
    hits = hits_norm = 0
    for it in items:
        ctx = it.question.rstrip()
        lls = []
        for c in it.choices:
            seq = _char_encode(ctx + it.question[len(ctx) :] + " " + c)
            n_cont = len(seq) - len(ctx)
            lls.append(sum(_logp(m.table, seq[t - 1], seq[t]) for t in range(len(seq) - n_cont, len(seq))))
        hits += int(np.argmax(lls)) == it.answer
        hits_norm += int(np.argmax([s / len(c) for s, c in zip(lls, it.choices, strict=True)])) == it.answer
        assert got.loglikelihoods[items.index(it)] == pytest.approx(lls, rel=1e-9)
    assert got.acc == pytest.approx(hits / 3) and got.acc_norm == pytest.approx(hits_norm / 3)


def test_encode_pair_moves_trailing_spaces() -> None:
    ctx, cont = encode_pair(_char_encode, "Q:  ", " A")
    assert ctx == _char_encode("Q:") and cont == _char_encode("   A")


# ---- bad inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"question": "", "choices": ["a", "b"], "answer": 0}', "'question'"),
        ('{"question": "q", "choices": ["a"], "answer": 0}', "'choices'"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "out of range"),
        ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "not one of the choices"),
        ('{"question": "q", "choices": ["a", "b"]}', "'answer'"),
        ("\n\n", "no items"),
    ],
)
def test_malformed_jsonl(tmp_path: Path, content: str, needle: str) -> None:
    p = tmp_path / "mc.jsonl"
    p.write_text('{"question": "ok", "choices": ["a", "b"], "answer": "b"}\n' * ("no items" not in needle) + content)
    with pytest.raises(InputError, match=needle) as e:
        read_mc(p)
    assert "\n" not in str(e.value)


def test_jsonl_answer_by_text(tmp_path: Path) -> None:
    p = tmp_path / "mc.jsonl"
    p.write_text('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n')
    assert read_mc(p) == [MCItem("q", ["a", "b"], 1)]


def test_text_too_short_or_empty() -> None:
    with pytest.raises(InputError, match="empty"):
        windows_from_tokens([], 512, None)
    with pytest.raises(InputError, match="shorter than one window"):
        windows_from_tokens(list(range(100)), 512, None)
    with pytest.raises(InputError, match="shorter than one window"):
        windows_from_tokens(list(range(2000)), 512, 100)


def test_held_out_split_is_disjoint() -> None:
    toks = list(range(10 * 8))
    ev, cal = split_held_out(toks, 8, 40, 24)
    assert set(ev.flatten().tolist()).isdisjoint(cal.flatten().tolist())
    assert cal.flatten().tolist() == toks[-24:]
    with pytest.raises(InputError, match="overlap"):
        split_held_out(toks, 8, 64, 24)


def test_default_text_is_pydoc_prose() -> None:
    text = default_text()
    assert len(text) > 100_000 and "assert" in text
