"""The prediction grids: one GPU from the real artifacts, and two GPUs in tensor parallel (the paper's regime).

Every figure here is a *prediction* of the roofline model; nothing is measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.common import latency_limit
from benchmarks.perf_model.costs import Cost
from benchmarks.perf_model.devices import GPUS
from benchmarks.perf_model.predict import PAPER_MODELS, TPParams, step_time, tp2_step
from benchmarks.perf_model.units import LayerSplit

BATCHES = (1, 8)
CONTEXTS = (128, 512, 1024, 2048, 4096)
LINK_LATENCIES_S = (5e-6, 10e-6, 20e-6)
PAPER_CONTEXT = 2048  # mean context while generating 4096 tokens from a short prompt (the paper's Figure 1 setup)


def single_gpu(
    orig: Callable[[int, int], Sequence[Cost]], lp: Callable[[int, int], Sequence[Cost]], layers: int, pairs: int
) -> list[dict[str, Any]]:
    """Per device x batch x context x CUDA graphs: predicted ms/token of the original and LP exports, from each
    export's GPU kernel list (``orig(batch, past)``: per-kernel costs of one decode step)."""
    rows = []
    for b in BATCHES:
        for t in CONTEXTS:
            co, cl = orig(b, t), lp(b, t)
            for dev in GPUS.values():
                for graphs in (False, True):
                    to, tl = step_time(co, dev, graphs), step_time(cl, dev, graphs)
                    rows.append(
                        {
                            "device": dev.name,
                            "batch": b,
                            "context": t,
                            "cuda_graphs": graphs,
                            "orig_ms": 1e3 * to,
                            "lp_ms": 1e3 * tl,
                            "ratio": to / tl,
                            "limit": latency_limit(layers, pairs),
                            "pairs": pairs,
                        }
                    )
    return rows


def tp2_rows(split: LayerSplit, max_pairs: int = 15) -> list[dict[str, Any]]:
    """Two GPUs, tensor parallel: speed-up vs pairs for the paper's models, per link latency and launch mode."""
    rows = []
    for name, m in PAPER_MODELS.items():
        for dev_name in ("A100-SXM4-80GB", "H100-SXM", "H200-SXM"):
            dev = GPUS[dev_name]
            for lat in LINK_LATENCIES_S:
                for graphs in (False, True):
                    prm = TPParams(split.gpu_kernels_per_layer, split.gpu_kernels_outside, lat, graphs)
                    for b in BATCHES:
                        base = tp2_step(m, dev, b, PAPER_CONTEXT, 0, prm)
                        for p in range(0, max_pairs + 1):
                            t = tp2_step(m, dev, b, PAPER_CONTEXT, p, prm)
                            rows.append(
                                {
                                    "model": name,
                                    "device": dev_name,
                                    "link_latency_us": lat * 1e6,
                                    "cuda_graphs": graphs,
                                    "batch": b,
                                    "context": PAPER_CONTEXT,
                                    "pairs": p,
                                    "paired_layers": 2 * p,
                                    "orig_ms": 1e3 * base,
                                    "lp_ms": 1e3 * t,
                                    "speedup": base / t,
                                    "limit": latency_limit(m.layers, p),
                                }
                            )
    return rows
