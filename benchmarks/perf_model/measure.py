"""ONNX Runtime CPU decode time per token, measured: one generic runner for our exports and the genai model.

Both name their caches ``past_key_values.<slot>.key/value`` in and ``present.<slot>.key/value`` out, so one
loop serves both: prefill ``prompt`` tokens once (untimed), then each measurement times ``steps`` greedy decode
steps from that cache (argmax fed back, cache grows) through the one decode loop (``layerpair.decode``). Models
and the micro-benchmarks are timed round-robin (start rotated each round) so load drift hits all alike; the first
round is discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf_model.micro import Micro
from layerpair.decode import StepFn, decode_n_tokens, greedy, prefill, session


def _feeds(sess: Any, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict[str, Any]) -> dict[str, Any]:
    """The step's ids [B, S], mask [B, T], positions [B, S] and caches under the graph's own input names."""
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = mask
        elif i.name == "position_ids":
            feeds[i.name] = pos
        elif i.name in past:
            feeds[i.name] = past[i.name]
        else:
            raise ValueError(f"unknown model input '{i.name}'")
    return feeds


def _empty_past(sess: Any, batch: int, fixed: dict[str, int]) -> dict[str, np.ndarray]:
    """Zero-length caches [B, KVH, 0, D] (dims from the graph input; symbolic constants from ``fixed``)."""
    out = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, kvh, _, d = (fixed.get(x, x) if isinstance(x, str) else x for x in i.shape)
            out[i.name] = np.zeros((batch, int(kvh), 0, int(d)), np.float32)
    return out


def _step(sess: Any) -> StepFn:
    """One forward of ``sess`` as a step of the decode loop: caches in as ``past_key_values.*``, out as
    ``present.*``, fed back under the past name."""
    outs = [o.name for o in sess.get_outputs()]
    presents = [(i, "past_key_values." + n[len("present.") :]) for i, n in enumerate(outs) if n.startswith("present.")]
    logits = outs.index("logits")

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        r = sess.run(outs, _feeds(sess, ids, mask, pos, past))
        return r[logits], {name: r[i] for i, name in presents}

    return step


def decode_timer(
    path: Path, threads: int, prompt: int, steps: int, vocab: int, fixed: dict[str, int] | None = None
) -> Callable[[], float]:
    """A closure timing ``steps`` decode tokens after a fixed ``prompt``-token prefill; returns seconds/token."""
    sess = session(path, threads)
    step = _step(sess)
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt)).astype(np.int64)
    logits, cursor = prefill(step, ids, _empty_past(sess, 1, fixed or {}))
    first = greedy(logits[:, -1])

    def run() -> float:
        t0 = time.perf_counter()
        for _ in decode_n_tokens(step, first, cursor, steps, greedy):  # greedy: each step depends on the last
            pass
        return (time.perf_counter() - t0) / steps

    return run


def measure_rounds(
    timers: dict[str, Callable[[], float]], micro: Micro, rounds: int, warmup: int = 1
) -> list[dict[str, Any]]:
    """Round-robin over the models (start rotated each round), each timing bracketed by ``micro.quick()``.

    Returns one record per kept round: {"peak_flops": x, "models": {name: {"seconds_per_token": s, "micro": mean
    of the two brackets}}}. The first ``warmup`` rounds are discarded.
    """
    names = list(timers)
    out = []
    for r in range(warmup + rounds):
        rec: dict[str, Any] = {"peak_flops": micro.peak(), "models": {}}
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            before = micro.quick()
            s = timers[name]()
            after = micro.quick()
            mean = {k: (before[k] + after[k]) / 2 for k in before}
            rec["models"][name] = {"seconds_per_token": s, "micro": mean, "micro_before": before, "micro_after": after}
        if r >= warmup:
            out.append(rec)
    return out
