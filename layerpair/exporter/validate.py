"""``AgreementFromOnnx``: run ONNX Runtime and the PyTorch reference on the same inputs and measure how far
apart they are. Runs on every export; the caller fails hard above tolerance.

Three cases, each through the *returned* cache of its own runtime (ONNX Runtime's presents are fed back into
ONNX Runtime, PyTorch's into PyTorch), so a cache bug accumulates instead of hiding:

* ``prefill`` — one prompt of >= 16 tokens, empty cache.
* ``decode``  — 4 greedy steps after that prefill (both runtimes are fed PyTorch's argmax token, so they stay
  on the same path even if a near-tie flips).
* ``padded``  — a batch of 2 prompts of different lengths, left-padded, then 2 decode steps.

Metrics on logits: ``max_abs``; ``max_rel`` = max_abs / max|reference| (normwise — elementwise relative error
is meaningless for logits near zero); ``top1`` = fraction of positions whose argmax agrees. Logits at pad
positions are excluded (they are well-defined but meaningless). ``present_max_abs`` covers every present
tensor at every position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerpair.iospec import IOSpec

VALIDATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "far faster than any scribe."
)
SHORT_TEXT = "Rain is expected across the coast tomorrow afternoon."


@dataclass
class Agreement:
    max_abs: float = 0.0
    max_rel: float = 0.0
    top1: float = 1.0
    present_max_abs: float = 0.0
    positions: int = 0
    _agree: int = field(default=0, repr=False)

    def update(self, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray) -> None:
        """ours/ref: logits [B,S,V]; valid: bool [B,S]."""
        o, r = ours[valid], ref[valid]
        err = float(np.abs(o - r).max()) if o.size else 0.0
        self.max_abs = max(self.max_abs, err)
        self.max_rel = max(self.max_rel, err / max(float(np.abs(r).max()), 1e-30))
        self._agree += int((o.argmax(-1) == r.argmax(-1)).sum())
        self.positions += int(valid.sum())
        self.top1 = self._agree / max(self.positions, 1)

    def update_present(self, ours: Sequence[np.ndarray], ref: Sequence[np.ndarray]) -> None:
        for o, r in zip(ours, ref, strict=True):
            self.present_max_abs = max(self.present_max_abs, float(np.abs(o - r).max()) if o.size else 0.0)

    def to_json(self) -> dict[str, float | int]:
        d = asdict(self)
        d.pop("_agree")
        return d


class Runner:
    """One decoder behind ``step(ids, mask, pos, past) -> (logits, presents)``, numpy in and out."""

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError


class TorchRunner(Runner):
    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        with torch.no_grad():
            out = self.module(
                torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), *map(torch.from_numpy, past)
            )
        return out[0].float().numpy(), [t.numpy() for t in out[1:]]


class OrtRunner(Runner):
    def __init__(self, path: Path | str, spec: IOSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.spec = spec

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = dict(zip(self.spec.input_names, [ids, mask, pos, *past], strict=True))
        out = self.session.run(self.spec.output_names, feeds)
        return out[0], list(out[1:])


def empty_past(spec: IOSpec, batch: int, dtype: Any = None) -> list[np.ndarray]:
    """Zero-length K/V for every slot, in the spec's cache dtype unless ``dtype`` is given."""
    if dtype is None:
        import ml_dtypes  # numpy has no bfloat16; ml_dtypes (an onnx dependency) provides it

        dtype = ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype)
    d = spec.arch.head_dim
    return [np.zeros((batch, s.num_kv_heads, 0, d), dtype) for s in spec.slots for _ in (0, 1)]


def _tokens(tokenizer: Any, text: str, n_min: int, vocab: int, seed: int) -> list[int]:
    if tokenizer is not None:
        ids = list(tokenizer(text)["input_ids"])
        if len(ids) >= n_min:
            return ids
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=max(n_min, 16)).tolist()


def compare_runners(
    ours: Runner, ours_spec: IOSpec, ref: Runner, ref_spec: IOSpec, tokenizer: Any = None, decode_steps: int = 4
) -> dict[str, Agreement]:
    """Agreement of ``ours`` against ``ref`` on prefill, decode and padded batch.

    The two may have different cache layouts (unmerged vs merged pairs): caches are never exchanged, and
    presents are compared after mapping both to per-layer slices (see ``per_layer``).
    """
    vocab = ours_spec.arch.vocab_size
    res = {k: Agreement() for k in ("prefill", "decode", "padded")}

    # prefill + decode, batch 1
    ids = np.array([_tokens(tokenizer, VALIDATION_TEXT, 16, vocab, 0)], dtype=np.int64)
    S = ids.shape[1]
    mask = np.ones_like(ids)
    pos = np.arange(S, dtype=np.int64)[None]
    lo, po = ours.step(ids, mask, pos, empty_past(ours_spec, 1))
    lr, pr = ref.step(ids, mask, pos, empty_past(ref_spec, 1))
    res["prefill"].update(lo, lr, np.ones(ids.shape, bool))
    res["prefill"].update_present(per_layer(po, ours_spec), per_layer(pr, ref_spec))
    for step in range(decode_steps):
        nxt = lr[:, -1:].argmax(-1).astype(np.int64)
        mask = np.ones((1, S + step + 1), np.int64)
        p = np.array([[S + step]], np.int64)
        lo, po = ours.step(nxt, mask, p, po)
        lr, pr = ref.step(nxt, mask, p, pr)
        res["decode"].update(lo, lr, np.ones(nxt.shape, bool))
        res["decode"].update_present(per_layer(po, ours_spec), per_layer(pr, ref_spec))

    # padded batch of 2, left padding, then 2 decode steps
    a = _tokens(tokenizer, VALIDATION_TEXT, 16, vocab, 1)
    b = _tokens(tokenizer, SHORT_TEXT, 8, vocab, 2)
    b = b[: max(len(a) - 5, 1)] if len(b) >= len(a) else b
    S = len(a)
    ids = np.zeros((2, S), np.int64)
    mask = np.zeros((2, S), np.int64)
    ids[0], mask[0] = a, 1
    ids[1, S - len(b) :], mask[1, S - len(b) :] = b, 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None).astype(np.int64)
    lo, po = ours.step(ids, mask, pos, empty_past(ours_spec, 2))
    lr, pr = ref.step(ids, mask, pos, empty_past(ref_spec, 2))
    res["padded"].update(lo, lr, mask.astype(bool))
    res["padded"].update_present(per_layer(po, ours_spec), per_layer(pr, ref_spec))
    for _ in range(2):
        nxt = lr[:, -1:].argmax(-1).astype(np.int64)
        p = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = np.concatenate([pos, p], axis=1)
        lo, po = ours.step(nxt, mask, p, po)
        lr, pr = ref.step(nxt, mask, p, pr)
        res["padded"].update(lo, lr, np.ones(nxt.shape, bool))
        res["padded"].update_present(per_layer(po, ours_spec), per_layer(pr, ref_spec))
    return res


def per_layer(presents: list[np.ndarray], spec: IOSpec) -> list[np.ndarray]:
    """Split presents into per-layer K, V ([B,KVH,T,D] each), in layer order, whatever the slot layout.

    A merged slot with 2·KVH heads holds layer a's heads first, then layer b's.
    """
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    kvh = spec.arch.num_kv_heads
    for i, s in enumerate(spec.slots):
        k, v = presents[2 * i], presents[2 * i + 1]
        for j, layer in enumerate(s.layers):
            out[layer] = (k[:, j * kvh : (j + 1) * kvh], v[:, j * kvh : (j + 1) * kvh])
    return [t for layer in sorted(out) for t in out[layer]]


def within_tolerance(res: dict[str, Agreement], atol: float) -> list[str]:
    """The failing checks (empty if all pass): logits and every present within ``atol`` max abs.

    Top-1 agreement is reported, not enforced: within ``atol`` a flip can only come from a near-tie.
    """
    bad = []
    for name, a in res.items():
        if not a.max_abs <= atol:  # NaN fails too
            bad.append(f"{name}: logits max_abs {a.max_abs:.3g} > {atol:g}")
        if not a.present_max_abs <= atol:
            bad.append(f"{name}: KV cache max_abs {a.present_max_abs:.3g} > {atol:g}")
    return bad
