"""What one throughput run measures (``Settings``) and the timed closures: ``decode_fn`` / ``prefill_fn`` over a
step function of PyTorch eager or ONNX Runtime, through the one decode loop (``layerpair.decode``), and
``bench_decoder``'s weights."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.shapes import random_decoder
from layerpair.arch import ArchSpec
from layerpair.decode import StepFn, decode_n_tokens, greedy, prefill
from layerpair.iospec import IOSpec

Pairs = tuple[tuple[int, int], ...]


@dataclass
class Settings:
    """What one run measures. ``full()`` is the < 10 min CPU run, ``tiny()`` the CI smoke (< 1 min)."""

    mode: str
    main_model: str
    main_pairs: int  # number of pairs in the main comparison
    pair_counts: list[int]  # scaling with the number of pairs (PyTorch eager decode)
    size_models: list[str]  # scaling with model size (PyTorch eager)
    past: int = 128
    steps: int = 16
    prefill_seq: int = 128
    size_prefill_seq: int = 32
    size_steps: int = 4
    repeats: int = 5
    warmup: int = 1
    batch: int = 1
    runtimes: list[str] = field(default_factory=lambda: ["torch", "ort"])
    ort_exports: list[str] | None = None  # existing (original, LP) export dirs instead of fresh exports

    @classmethod
    def full(cls) -> Settings:
        return cls("full", "smollm2-135m", 2, [1, 2, 4, 7, 10, 14], ["smollm2-135m", "llama-3.2-1b"])

    @classmethod
    def tiny(cls) -> Settings:
        return cls(
            "tiny",
            "tiny",
            1,
            [1, 2],
            ["tiny", "tiny-wide"],
            past=8,
            steps=4,
            prefill_seq=8,
            size_prefill_seq=8,
            size_steps=2,
            repeats=3,
            warmup=1,
        )


def torch_step(model: torch.nn.Module) -> tuple[StepFn, Callable[[IOSpec, int], list[Any]]]:
    """PyTorch eager as a step of the decode loop: numpy ids/mask/positions in (wrapped, not copied), torch
    logits and cache out (the cache never leaves torch)."""

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any]) -> tuple[Any, list[Any]]:
        out = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), *past)
        return out[0], list(out[1:])

    def empty(spec: IOSpec, batch: int) -> list[Any]:
        dt = next(model.parameters()).dtype
        return [torch.zeros(batch, s.num_kv_heads, 0, spec.arch.head_dim, dtype=dt) for s in spec.slots for _ in "kv"]

    return step, empty


def ort_step(path: Path, spec: IOSpec, threads: int) -> tuple[StepFn, Callable[[IOSpec, int], list[Any]]]:
    from layerpair.exporter.validate import OrtRunner, empty_past

    runner = OrtRunner(path, spec, threads=threads)
    return runner.step, empty_past


def decode_fn(
    step: StepFn, empty: Callable[[IOSpec, int], list[Any]], spec: IOSpec, s: Settings, steps: int
) -> Callable[[], float]:
    """Prefill ``past`` tokens once (untimed); each call times ``steps`` greedy decode tokens from that cache
    (``decode_n_tokens``: the argmax is fed back, so each step depends on the one before, as in real decoding)."""
    B, P, V = s.batch, s.past, spec.arch.vocab_size
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (B, P)).astype(np.int64)
    with torch.no_grad():
        logits, cursor = prefill(step, ids, empty(spec, B))
    first = greedy(logits[:, -1])

    def run() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for _ in decode_n_tokens(step, first, cursor, steps, greedy):
                pass
            dt = time.perf_counter() - t0
        return B * steps / dt

    return run


def prefill_fn(
    step: StepFn, empty: Callable[[IOSpec, int], list[Any]], spec: IOSpec, batch: int, seq: int
) -> Callable[[], float]:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, spec.arch.vocab_size, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    pos = np.tile(np.arange(seq), (batch, 1))

    def run() -> float:
        past = empty(spec, batch)
        with torch.no_grad():
            t0 = time.perf_counter()
            prefill(step, ids, past, mask, pos)
            dt = time.perf_counter() - t0
        return batch * seq / dt

    return run


#: What ``bench_decoder`` draws; part of the export cache key, so a cached export always has these weights.
WEIGHTS = "random N(0, 0.02), norm scales U(0.5, 1.5) (speed does not depend on values)"


def bench_decoder(arch: ArchSpec) -> Any:
    """``random_decoder`` with non-unit norm scales, so the ONNX merge's ``fold_norm_scales`` does real work
    (the committed figures before this were timed on a graph where it had fired 0 times, all-ones scales)."""
    dec = random_decoder(arch)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    return dec
