"""Shared measurement helpers: interleaved repeats, robust summaries, rows with ratios and limits, machine facts."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_THROUGHPUT = "layerpair-bench/throughput/1"
SCHEMA_GPU = "layerpair-bench/gpu/1"
SCHEMA_ANCHORS = "layerpair-bench/anchors/1"


@dataclass
class Variant:
    """One model configuration to time. ``run()`` does one measurement and returns tokens/s."""

    name: str
    run: Callable[[], float]
    num_pairs: int = 0
    baseline: str | None = None  # the variant this one's ratio is taken against
    extra: dict[str, Any] | None = None


def quantiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(q25, median, q75) with linear interpolation (numpy's default), defined for any n >= 1."""
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")

    def q(p: float) -> float:
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return q(0.25), statistics.median(s), q(0.75)


def summary(samples: Sequence[float]) -> dict[str, Any]:
    q25, med, q75 = quantiles(samples)
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "n": len(samples), "samples": list(samples)}


def interleaved(variants: Sequence[Variant], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Round-robin over variants, rotating the start each round, so load drift hits every variant alike.

    The first ``warmup`` rounds are discarded (allocator, caches, ONNX Runtime's first-run planning).
    """
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    n = len(variants)
    for r in range(warmup + repeats):
        for j in range(n):
            v = variants[(r + j) % n]
            tps = v.run()
            if r >= warmup:
                samples[v.name].append(tps)
    return samples


def latency_limit(num_layers: int, num_pairs: int) -> float:
    """Speed-up if time were proportional to sequential depth: L / (L - pairs)."""
    return num_layers / (num_layers - num_pairs)


def rows_from(
    variants: Sequence[Variant], samples: dict[str, list[float]], num_layers: int, common: dict[str, Any]
) -> list[dict[str, Any]]:
    """One row per variant: tokens/s summary, ratio against its baseline (from the medians and per round),
    the latency-bound limit and the fraction of the ideal gain that was reached."""
    rows = []
    for v in variants:
        s = samples[v.name]
        row: dict[str, Any] = {
            **common,
            "variant": v.name,
            "status": "ok",
            "num_layers": num_layers,
            "num_pairs": v.num_pairs,
            "baseline": v.baseline,
            "tokens_per_s": summary(s),
            "limit": latency_limit(num_layers, v.num_pairs),
            **(v.extra or {}),
        }
        if v.baseline is not None:
            b = samples[v.baseline]
            row["ratio"] = statistics.median(s) / statistics.median(b)
            # Per-round ratio: the variants of one round ran back to back, so this cancels slow drift.
            row["paired_ratio"] = summary([x / y for x, y in zip(s, b, strict=True)])
            gain = row["limit"] - 1.0
            row["gain_fraction"] = (row["ratio"] - 1.0) / gain if gain > 0 else None
        rows.append(row)
    return rows


def unavailable_row(
    variant: str, reason: str, num_layers: int, num_pairs: int, common: dict[str, Any]
) -> dict[str, Any]:
    """A row that says why it has no numbers (never a made-up figure)."""
    return {
        **common,
        "variant": variant,
        "status": "not available",
        "reason": reason,
        "num_layers": num_layers,
        "num_pairs": num_pairs,
        "limit": latency_limit(num_layers, num_pairs),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
