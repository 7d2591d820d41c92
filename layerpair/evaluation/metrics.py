"""Accuracy metrics of a (layer-parallel) decoder, identical on PyTorch and ONNX Runtime.

Perplexity: the text is cut into non-overlapping windows of ``window`` tokens (default 512; a trailing partial
window is dropped). Each window is scored independently from an empty cache: position t predicts token t+1,
so the first token of every window is context only and a window scores ``window - 1`` tokens.
``ppl = exp(total NLL / scored tokens)``.

Agreement with the original (no pairs) model, on the same scored positions: ``top1`` = fraction whose argmax
agrees, ``kl`` = mean KL(P_original || P_lp) in nats.

Multiple choice, as lm-evaluation-harness scores ``multiple_choice`` tasks: the continuation of each choice is
``" " + choice``; context/continuation tokens are split the harness's way (trailing spaces of the question move
into the continuation; continuation tokens = tokens(question + continuation)[len(tokens(question)):]); the
score is the summed log-likelihood of the continuation tokens. ``acc``: the argmax score is the answer;
``acc_norm``: the argmax of score / len(choice in characters).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from layerpair.decode import session
from layerpair.errors import InputError
from layerpair.evaluation.data import Encode, MCItem
from layerpair.evaluation.forward import hidden_until, logits_from_hidden, logits_from_ids, window_context
from layerpair.exporter.model import Decoder

DEFAULT_BATCH = 4


class LogitsBackend(Protocol):
    name: str

    def logits(self, ids_BW: Tensor) -> Tensor:
        """fp32 logits [B,W,V] of full sequences starting at position 0 (empty cache, no padding)."""
        ...


class TorchBackend:
    """The PyTorch Decoder; ``pairs`` overrides the Decoder's own plan (``()`` = the original model)."""

    def __init__(self, dec: Decoder, pairs: Sequence[tuple[int, int]] | None = None, name: str = "pytorch") -> None:
        self.dec = dec
        self.pairs = tuple(dec.pairs if pairs is None else pairs)
        self.name = name
        # (id of a reference Decoder, first pair) -> (that Decoder, layers shared with it)
        self.prefix_cache: dict[tuple[int, int], tuple[Decoder, int]] = {}

    def logits(self, ids_BW: Tensor) -> Tensor:
        with torch.no_grad():
            return logits_from_ids(self.dec, ids_BW, self.pairs)


class OnnxBackend:
    """An exported ``model.onnx`` (any cache layout: the empty pasts are built from the graph's own inputs)."""

    def __init__(self, path: Path | str, threads: int | None = None, name: str = "onnx") -> None:
        self.session = session(path, threads or torch.get_num_threads())
        self.inputs = self.session.get_inputs()
        self.name = name
        self.seconds = 0.0  # time spent in session.run, summed over calls

    def logits(self, ids_BW: Tensor) -> Tensor:
        B, W = ids_BW.shape
        ids = ids_BW.numpy().astype(np.int64)
        feeds: dict[str, np.ndarray] = {
            "input_ids": ids,
            "attention_mask": np.ones((B, W), np.int64),
            "position_ids": np.broadcast_to(np.arange(W, dtype=np.int64), (B, W)).copy(),
        }
        for inp in self.inputs:
            if inp.name.startswith("past_key_values."):
                _, heads, _, d = inp.shape  # [batch, heads, past_sequence, head_dim]; heads/head_dim static
                dtype = np.float16 if "float16" in inp.type else np.float32
                feeds[inp.name] = np.zeros((B, int(heads), 0, int(d)), dtype)
        t = time.perf_counter()
        out = self.session.run([self.session.get_outputs()[0].name], feeds)[0]
        self.seconds += time.perf_counter() - t
        return torch.from_numpy(np.asarray(out, dtype=np.float32))


@dataclass
class TextMetrics:
    ppl: float
    nll: float  # mean NLL per scored token (nats)
    scored_tokens: int
    windows: int
    window: int
    ref_ppl: float | None = None
    ppl_ratio: float | None = None
    top1: float | None = None
    kl: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _shared_prefix(model: LogitsBackend, ref: LogitsBackend | None) -> int:
    """Layers both backends compute identically: 0 if none. Both must be PyTorch Decoders whose plans agree up
    to the first pair of either and whose embedding and layers before it hold equal weights (the same Decoder,
    or a healed copy: healing only rewrites the pairs' own projections)."""
    if not (isinstance(model, TorchBackend) and isinstance(ref, TorchBackend)):
        return 0
    a, b = model.dec, ref.dec
    start = min((p for p, _ in (*model.pairs, *ref.pairs)), default=a.arch.num_layers)
    if a is b:
        return start
    if a.arch != b.arch:
        return 0
    key = (id(b), start)
    if key not in model.prefix_cache or model.prefix_cache[key][0] is not b:
        la: Any = a.layers
        lb: Any = b.layers
        same = torch.equal(a.embed_tokens, b.embed_tokens) and all(
            all(torch.equal(x, y) for x, y in zip(la[i].parameters(), lb[i].parameters(), strict=True))
            for i in range(start)
        )
        model.prefix_cache[key] = (b, start if same else 0)
    return model.prefix_cache[key][1]


def _logits_both(model: LogitsBackend, ref: LogitsBackend | None, ids: Tensor) -> tuple[Tensor, Tensor | None]:
    start = _shared_prefix(model, ref)
    if start == 0 or ref is None:
        return model.logits(ids), (ref.logits(ids) if ref is not None else None)
    # Equal weights up to ``start``: run that prefix once (an LP model with late pairs saves most of the
    # reference's cost), then each model its own remaining blocks and head.
    assert isinstance(model, TorchBackend) and isinstance(ref, TorchBackend)
    c = window_context(model.dec, *ids.shape)
    x = hidden_until(model.dec, ids, start, (), c)
    return logits_from_hidden(model.dec, x, start, model.pairs, c), logits_from_hidden(ref.dec, x, start, ref.pairs, c)


def text_metrics(
    model: LogitsBackend, windows: Tensor, ref: LogitsBackend | None = None, batch: int = DEFAULT_BATCH
) -> TextMetrics:
    """Perplexity of ``model`` over ``windows`` [N,W]; with ``ref``, also its perplexity, top-1 and KL."""
    return text_metrics_many([model], windows, ref, batch)[0]


def text_metrics_many(
    models: Sequence[LogitsBackend], windows: Tensor, ref: LogitsBackend | None = None, batch: int = DEFAULT_BATCH
) -> list[TextMetrics]:
    """``text_metrics`` of several backends in one pass: the reference runs once per batch for all of them
    (``eval --onnx`` scores the PyTorch and the ONNX model against one reference forward)."""
    N, W = windows.shape
    k = len(models)
    nll_sum, kl_sum, agree = [0.0] * k, [0.0] * k, [0] * k
    ref_nll_sum = 0.0
    for i in range(0, N, batch):
        ids = windows[i : i + batch]
        tgt = ids[:, 1:].unsqueeze(-1)  # position t predicts token t+1
        rlp: Tensor | None = None
        ref_top: Tensor | None = None
        for j, model in enumerate(models):
            if j == 0:
                logits, ref_logits = _logits_both(model, ref, ids)
                if ref_logits is not None:
                    # fp32 log-softmax (the logits are fp32 on every backend), sums accumulated in fp64.
                    rlp = torch.log_softmax(ref_logits[:, :-1], dim=-1)  # [b,W-1,V]
                    ref_top = ref_logits[:, :-1].argmax(-1)
                    ref_nll_sum -= float(rlp.gather(-1, tgt).sum(dtype=torch.float64))
                del ref_logits
            else:
                logits = model.logits(ids)
            lp = torch.log_softmax(logits[:, :-1], dim=-1)  # [b,W-1,V]
            nll_sum[j] -= float(lp.gather(-1, tgt).sum(dtype=torch.float64))
            if rlp is not None and ref_top is not None:
                # KL(P_ref || P) per position in one fused kernel, summed over the vocabulary in fp32 (49k terms,
                # ~1e-7 relative), then across positions in fp64.
                kl_rows = F.kl_div(lp, rlp, reduction="none", log_target=True).sum(-1)
                kl_sum[j] += float(kl_rows.sum(dtype=torch.float64))
                agree[j] += int((ref_top == logits[:, :-1].argmax(-1)).sum())
            del lp, logits
        del rlp
    n = N * (W - 1)
    out = []
    for j in range(k):
        m = TextMetrics(ppl=math.exp(nll_sum[j] / n), nll=nll_sum[j] / n, scored_tokens=n, windows=N, window=W)
        if ref is not None:
            m.ref_ppl = math.exp(ref_nll_sum / n)
            m.ppl_ratio = m.ppl / m.ref_ppl
            m.top1 = agree[j] / n
            m.kl = kl_sum[j] / n
        out.append(m)
    return out


def onnx_disagreement(onnx: TextMetrics, pytorch: TextMetrics, rel_tol: float) -> str | None:
    """Why ONNX Runtime's figures do not match PyTorch's on the same windows (None when they do).

    A non-finite figure on either side (a NaN or inf logit makes its window's perplexity and KL NaN) is a
    disagreement, never a pass: the relative perplexity difference is compared with ``not <=``, so NaN fails.
    """
    for name, m in (("ONNX Runtime", onnx), ("PyTorch", pytorch)):
        for key in ("ppl", "nll", "kl", "top1"):
            v = getattr(m, key)
            if v is not None and not math.isfinite(v):
                return f"{name} {key} is {v} (a NaN or inf in its logits)"
    rel = ppl_rel_diff(onnx, pytorch)
    if not rel <= rel_tol:
        return f"ONNX perplexity differs from PyTorch by {rel:.2e} (relative, tolerance {rel_tol:g})"
    return None


def ppl_rel_diff(onnx: TextMetrics, pytorch: TextMetrics) -> float:
    """|ppl_onnx - ppl_pytorch| / ppl_pytorch, NaN if either is NaN (numpy's maximum propagates it)."""
    return abs(onnx.ppl - pytorch.ppl) / float(np.maximum(abs(pytorch.ppl), 1e-30))


def nll_of_logits(logits: Tensor, ids: Tensor) -> float:
    """Mean NLL (nats) of ``ids[:,1:]`` under ``logits[:, :-1]`` — the perplexity rule, for the search."""
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    return -float(lp.gather(-1, ids[:, 1:].unsqueeze(-1)).mean(dtype=torch.float64))


# ---- multiple choice -------------------------------------------------------------------------------------


@dataclass
class MCMetrics:
    acc: float
    acc_norm: float
    items: int
    predictions: list[int] = field(default_factory=list)
    predictions_norm: list[int] = field(default_factory=list)
    loglikelihoods: list[list[float]] = field(default_factory=list)

    def to_json(self, full: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not full:
            for k in ("predictions", "predictions_norm", "loglikelihoods"):
                d.pop(k)
        return d


def encode_pair(encode: Encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness ``_encode_pair``: trailing context spaces move to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


def continuation_logprobs(
    backend: LogitsBackend, reqs: Sequence[tuple[list[int], int]], batch: int = 8
) -> list[tuple[float, bool]]:
    """For each (tokens, n): summed log-probability of the last n tokens given the ones before, and whether
    each of them is the argmax (the harness's ``is_greedy``). Right padding needs no mask: causal attention
    never lets a real position see a later pad token."""
    out: list[tuple[float, bool]] = []
    for i in range(0, len(reqs), batch):
        chunk = reqs[i : i + batch]
        L = max(len(f) for f, _ in chunk)
        ids = torch.zeros(len(chunk), L, dtype=torch.long)
        for j, (f, _) in enumerate(chunk):
            ids[j, : len(f)] = torch.tensor(f)
        lp = torch.log_softmax(backend.logits(ids).double(), dim=-1)  # [b,L,V]
        for j, (f, n) in enumerate(chunk):
            pos = torch.arange(len(f) - 1 - n, len(f) - 1)  # logits at t predict token t+1
            tgt = torch.tensor(f[len(f) - n :])
            rows = lp[j, pos]  # [n,V]
            out.append((float(rows[torch.arange(n), tgt].sum()), bool((rows.argmax(-1) == tgt).all())))
    return out


def mc_metrics(
    model: LogitsBackend, items: Sequence[MCItem], encode: Encode, batch: int = 8, max_length: int = 2048
) -> MCMetrics:
    """acc / acc_norm of ``items`` (see the module docstring for the scoring rule)."""
    reqs: list[tuple[list[int], int]] = []  # (input tokens, number of continuation tokens at its end)
    for it in items:
        for choice in it.choices:
            ctx, cont = encode_pair(encode, it.question, " " + choice)
            if not cont:
                raise InputError(f"choice {choice!r} encodes to no tokens", "use non-empty choice texts")
            full = (ctx + cont)[-(max_length + 1) :]  # left-truncate like the harness
            reqs.append((full, len(cont)))
    lls = [ll for ll, _ in continuation_logprobs(model, reqs, batch)]
    out = MCMetrics(acc=0.0, acc_norm=0.0, items=len(items))
    k = 0
    hit = hit_norm = 0
    for it in items:
        ll = lls[k : k + len(it.choices)]
        k += len(it.choices)
        pred = int(np.argmax(ll))
        pred_norm = int(np.argmax([s / len(c) for s, c in zip(ll, it.choices, strict=True)]))
        hit += pred == it.answer
        hit_norm += pred_norm == it.answer
        out.predictions.append(pred)
        out.predictions_norm.append(pred_norm)
        out.loglikelihoods.append(ll)
    out.acc, out.acc_norm = hit / len(items), hit_norm / len(items)
    return out
