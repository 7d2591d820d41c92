"""Generation of any decoder ``Runner`` (ONNX Runtime, PyTorch, TensorRT) through the one decode loop
(``layerpair/decode.py``: prefill, decode_one_token, decode_n_tokens), with one KV-cache handling.

The runner contract is validate.py's: ``step(ids [B,S], mask [B,T], pos [B,S], past) -> (logits [B,S,V],
presents)`` with ``past``/``presents`` in the I/O spec's slot order. So the same loop drives the unmerged and
the merged cache layout (``past_key_values.{a}_{b}.key`` with 2·KVH heads): it only ever feeds each step's
presents back as the next step's past.

Batching: prompts are left-padded; the mask marks padding, positions count real tokens only (pads get 0),
exactly as ``compare_runners``'s padded case. Decoding is greedy, or teacher-forced (``forced``) to compare
two runtimes position by position along the same tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from layerpair.decode import decode
from layerpair.exporter.validate import Runner, empty_past
from layerpair.iospec import IOSpec


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per sequence (up to and including a stop token)
    step_logits: list[np.ndarray] = field(default_factory=list)  # per step: [B,V] float32 logits that chose it
    prompt_lengths: list[int] = field(default_factory=list)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask, positions [B,S] for left-padded prompts."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    S = max(len(p) for p in prompts)
    ids = np.full((len(prompts), S), pad_id, np.int64)
    mask = np.zeros((len(prompts), S), np.int64)
    for b, p in enumerate(prompts):
        ids[b, S - len(p) :], mask[b, S - len(p) :] = p, 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None).astype(np.int64)
    return ids, mask, pos


class Generator:
    """Batched greedy generation of any ``Runner`` through the one decode loop (``layerpair.decode.decode``):
    prefill, then one token per step, feeding presents back as past."""

    def __init__(self, runner: Runner, spec: IOSpec, pad_id: int = 0) -> None:
        self.runner = runner
        self.spec = spec
        self.pad_id = pad_id

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_ids: Collection[int] = (),
        forced: Sequence[Sequence[int]] | None = None,
        keep_logits: bool = False,
    ) -> Generation:
        """Greedy generation; with ``forced`` ([B][N] tokens) feed those instead of the argmax (teacher forcing),
        stopping after N steps, and return what this runner *would* have chosen in ``tokens``."""
        ids, mask, pos = left_pad(prompts, self.pad_id)
        B = ids.shape[0]
        steps = max_new_tokens if forced is None else min(max_new_tokens, min(len(f) for f in forced))
        out = Generation([[] for _ in range(B)], [], [len(p) for p in prompts])
        done = np.zeros(B, bool)
        past = empty_past(self.spec, B)
        for chosen, last in decode(self.runner.step, ids, past, steps, _argmax_fp32, mask, pos, _teacher(forced)):
            if keep_logits:
                out.step_logits.append(np.asarray(last, np.float32))
            for b in range(B):
                if not done[b]:
                    out.tokens[b].append(int(chosen[b]))
                    done[b] = forced is None and int(chosen[b]) in stop_ids
            if done.all():
                break
        return out


def _argmax_fp32(logits_BV: np.ndarray) -> np.ndarray:
    """Greedy on float32 logits (16-bit runners return fp16 or bfloat16)."""
    return np.asarray(logits_BV, np.float32).argmax(-1)


def _teacher(forced: Sequence[Sequence[int]] | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """Teacher forcing: after step k, feed ``forced[b][k]`` whatever was chosen (None: feed the choice)."""
    if forced is None:
        return None
    columns = (np.array([f[k] for f in forced]) for k in itertools.count())
    return lambda _chosen: next(columns)


def mean_kl(ref_logits: Sequence[np.ndarray], ours_logits: Sequence[np.ndarray]) -> float:
    """Mean KL(ref || ours) over steps and batch, from [B,V] logits per step (float64, log-sum-exp stable)."""
    kls = []
    for r, o in zip(ref_logits, ours_logits, strict=False):
        lr = _log_softmax(np.asarray(r, np.float64))
        lo = _log_softmax(np.asarray(o, np.float64))
        kls.append((np.exp(lr) * (lr - lo)).sum(-1))
    return float(np.mean(np.concatenate(kls))) if kls else 0.0


def top1_agreement(ref_logits: Sequence[np.ndarray], ours_logits: Sequence[np.ndarray]) -> float:
    agree = [
        np.asarray(r).argmax(-1) == np.asarray(o).argmax(-1) for r, o in zip(ref_logits, ours_logits, strict=False)
    ]
    return float(np.mean(np.concatenate(agree))) if agree else 1.0


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
