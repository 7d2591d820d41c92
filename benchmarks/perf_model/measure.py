"""ONNX Runtime CPU decode time per token, measured: one generic runner for our exports and the genai model.

Both name their caches ``past_key_values.<slot>.key/value`` in and ``present.<slot>.key/value`` out, so one
loop serves both: prefill ``prompt`` tokens once (untimed), then each measurement times ``steps`` greedy decode
steps from that cache (argmax fed back, cache grows). Models and the micro-benchmarks are timed round-robin
(start rotated each round) so load drift hits all alike; the first round is discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.perf_model.micro import Micro


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(sess: Any, ids: np.ndarray, past: dict[str, np.ndarray], total: int) -> dict[str, np.ndarray]:
    """ids [B, S]; mask [B, total]; positions [B, S] = total-S .. total-1; caches as given."""
    b, s = ids.shape
    feeds: dict[str, np.ndarray] = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((b, total), np.int64)
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(total - s, total, dtype=np.int64), (b, 1))
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


def decode_timer(
    path: Path, threads: int, prompt: int, steps: int, vocab: int, fixed: dict[str, int] | None = None
) -> Callable[[], float]:
    """A closure timing ``steps`` decode tokens after a fixed ``prompt``-token prefill; returns seconds/token."""
    sess = _session(path, threads)
    outs = [o.name for o in sess.get_outputs()]
    presents = [o for o in outs if o.startswith("present.")]
    ids = np.random.default_rng(0).integers(0, vocab, (1, prompt)).astype(np.int64)
    res = sess.run(outs, _feeds(sess, ids, _empty_past(sess, 1, fixed or {}), prompt))
    cache0 = {"past_key_values." + n[len("present.") :]: v for n, v in zip(outs, res, strict=True) if n in presents}
    first = res[outs.index("logits")][:, -1:].argmax(-1).astype(np.int64)

    def run() -> float:
        nxt, cache = first, cache0
        t0 = time.perf_counter()
        for i in range(steps):
            r = sess.run(outs, _feeds(sess, nxt, cache, prompt + i + 1))
            cache = {"past_key_values." + n[len("present.") :]: r[outs.index(n)] for n in presents}
            nxt = r[outs.index("logits")][:, -1:].argmax(-1).astype(np.int64)  # greedy: next step depends on it
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
