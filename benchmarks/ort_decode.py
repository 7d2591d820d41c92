"""Decode speed of ONNX decoders on ONNX Runtime CPU, side by side (issue 16): ours (portable and ``--target ort``,
original and LP-merged) against onnxruntime-genai's builder output, in one run, interleaved.

    python -m benchmarks.ort_decode NAME=DIR [NAME=DIR ...] [--threads 2] [--prompt 128] [--steps 32]
        [--rounds 7] [--warmup 1] [--out benchmarks/results/ort_decode/ort_decode.json]

``DIR`` is an export directory holding ``model.onnx`` (ours, or the genai builder's ``-o`` directory). Every model
runs through the same loop, whatever its I/O: the session's own inputs decide the feeds (``input_ids``,
``attention_mask``, ``position_ids`` when the graph has it, ``past_key_values.*`` fed from the matching
``present.*``). One round of one model: a fresh batch-1 prompt of ``--prompt`` random tokens (seeded, the same for
every model), prefilled (untimed), then ``--steps`` greedy decode steps, each fed its argmax; the round's figure is
its decode wall time / steps (ms per token: the forward, the feeds and the argmax). Rounds rotate the start model
(``benchmarks.common.interleaved``) so load drift hits every model alike; the first ``--warmup`` rounds are dropped.
The JSON has per model the median and quartiles of its rounds, its node count, the machine's facts and the load
average at start and end (the figures are only comparable within one run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import Variant, interleaved, machine, now_utc, summary, write_json

DEFAULT_OUT = Path("benchmarks/results/ort_decode/ort_decode.json")
SCHEMA = "layerpair-bench/ort-decode/1"


class SessionDecoder:
    """One ONNX decoder session behind a generic batch-1 greedy loop (I/O read from the session)."""

    def __init__(self, path: Path, threads: int) -> None:
        from layerpair.decode import session

        self.session = session(path, threads)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.pasts = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = ["logits", *(n.replace("past_key_values.", "present.", 1) for n in self.pasts)]
        self.nodes = _node_count(path)

        self.head_size = _genai_head_size(path.parent)

    def empty_past(self) -> dict[str, np.ndarray]:
        out = {}
        for n in self.pasts:
            _, heads, _, dim = self.inputs[n].shape  # [batch, heads, past, head_dim]
            dim = dim if isinstance(dim, int) else self.head_size  # the genai builder names it "kv_cache_dim"
            out[n] = np.zeros((1, int(heads), 0, int(dim)), np.float32)
        return out

    def step(self, ids: np.ndarray, total: int, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, Any]]:
        S = ids.shape[1]
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past}
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(total - S, total, dtype=np.int64)[None]
        out = self.session.run(self.outputs, feeds)
        return out[0], dict(zip(self.pasts, out[1:], strict=True))

    def decode_ms_per_token(self, prompt: np.ndarray, steps: int) -> float:
        """Prefill ``prompt`` (untimed), then ``steps`` greedy tokens; wall ms per decode token."""
        logits, past = self.step(prompt, prompt.shape[1], self.empty_past())
        total = prompt.shape[1]
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
            total += 1
            logits, past = self.step(tok, total, past)
        return 1000 * (time.perf_counter() - t0) / steps


def _genai_head_size(d: Path) -> int | None:
    """``head_size`` from the genai builder's ``genai_config.json`` (its graph leaves the cache's last dim
    symbolic); None for our exports."""
    cfg = d / "genai_config.json"
    return int(json.loads(cfg.read_text())["model"]["decoder"]["head_size"]) if cfg.is_file() else None


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)


def run(models: dict[str, Path], threads: int, prompt_len: int, steps: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Time every model in interleaved rounds; the JSON document."""
    load_start = list(os.getloadavg())
    decoders = {name: SessionDecoder(d / "model.onnx", threads) for name, d in models.items()}
    vocab = min(int(d.session.get_outputs()[0].shape[-1]) for d in decoders.values())
    prompt = np.random.default_rng(0).integers(0, vocab, (1, prompt_len)).astype(np.int64)
    variants = [Variant(name, lambda d=d: d.decode_ms_per_token(prompt, steps)) for name, d in decoders.items()]
    samples = interleaved(variants, rounds, warmup)
    rows = {
        name: {"dir": str(models[name]), "nodes": decoders[name].nodes, "ms_per_token": summary(samples[name])}
        for name in models
    }
    return {
        "schema": SCHEMA,
        "date": now_utc(),
        "settings": {"threads": threads, "batch": 1, "prompt": prompt_len, "steps": steps, "rounds": rounds},
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "models": rows,
    }


def paired_ratios(doc: dict[str, Any], pairs: Sequence[str]) -> dict[str, dict[str, float]]:
    """``A/B`` -> B's time over A's, round by round (the rounds are interleaved, so each ratio compares the two
    under the same machine state): how much faster A decodes than B. Median and quartiles of those ratios, and
    the ratio of the two medians for comparison. NaN-keeping (numpy), so a NaN sample shows."""
    out = {}
    for p in pairs:
        a, _, b = p.partition("/")
        sa, sb = (np.asarray(doc["models"][n]["ms_per_token"]["samples"], np.float64) for n in (a, b))
        r = sb / sa
        out[p] = {
            "median": float(np.median(r)),
            "q25": float(np.quantile(r, 0.25)),
            "q75": float(np.quantile(r, 0.75)),
            "ratio_of_medians": float(np.median(sb) / np.median(sa)),
            "rounds": int(r.size),
        }
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = ["| graph | nodes | ms per decode token (median) | q25–q75 |", "|---|---:|---:|---:|"]
    for name, r in doc["models"].items():
        ms = r["ms_per_token"]
        lines.append(f"| {name} | {r['nodes']} | {ms['median']:.1f} | {ms['q25']:.1f}–{ms['q75']:.1f} |")
    if doc.get("speedups"):
        lines += ["", "| A vs B | B/A per round, median | q25–q75 | median B / median A |", "|---|---:|---:|---:|"]
        for p, s in doc["speedups"].items():
            lines.append(f"| {p} | {s['median']:.3f}x | {s['q25']:.3f}–{s['q75']:.3f} | {s['ratio_of_medians']:.3f}x |")
    return "\n".join(lines)


def plot(docs: Sequence[dict[str, Any]], out: Path) -> None:
    """Median ms per decode token per model (IQR as error bars), one panel per run (``docs``: its JSON files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(docs), figsize=(5.2 * len(docs), 3.8), squeeze=False)
    for ax, doc in zip(axes[0], docs, strict=True):
        names = list(doc["models"])
        ms = [doc["models"][n]["ms_per_token"] for n in names]
        med = [m["median"] for m in ms]
        err = [
            [x - m["q25"] for x, m in zip(med, ms, strict=True)],
            [m["q75"] - x for x, m in zip(med, ms, strict=True)],
        ]
        colors = ["#c84" if n.startswith("genai") else "#2a7" if "lp" in n else "#888" for n in names]
        ax.bar(range(len(names)), med, yerr=err, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        load = doc["load_average_start"][0]
        ax.set_title(
            f"{doc['settings']['threads']} thread(s), batch 1, {doc['date'][:16]} (load {load:.2f})", fontsize=9
        )
        ax.set_ylabel("ms per decode token (median, IQR)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("models", nargs="+", help="NAME=DIR: a directory with model.onnx")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--plot", type=Path, default=None, help="also draw OUT.png; with --replot, the JSON files given")
    p.add_argument("--replot", action="store_true", help="MODELS are JSON files of earlier runs: only draw --plot")
    p.add_argument(
        "--speedup",
        action="append",
        default=[],
        metavar="A/B",
        help="also report how much faster A decodes than B, round by round (repeatable), e.g. ort-lp/genai",
    )
    return p.parse_args(argv)


def models_from_args(specs: Sequence[str]) -> dict[str, Path]:
    """``NAME=DIR`` arguments -> {NAME: DIR}, each DIR holding a model.onnx (else exit with the offending one)."""
    models = {}
    for m in specs:
        name, _, d = m.partition("=")
        if not d or not (Path(d) / "model.onnx").is_file():
            raise SystemExit(f"'{m}' is not NAME=DIR with DIR/model.onnx")
        models[name] = Path(d)
    return models


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot([json.loads(Path(f).read_text()) for f in args.models], args.plot or args.out.with_suffix(".png"))
        return 0
    models = models_from_args(args.models)
    for p in args.speedup:
        if p.count("/") != 1 or not set(p.split("/")) <= set(models):
            raise SystemExit(f"--speedup '{p}' is not A/B with A and B among the models {sorted(models)}")
    doc = run(models, args.threads, args.prompt, args.steps, args.rounds, args.warmup)
    doc["speedups"] = paired_ratios(doc, args.speedup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, doc)
    if args.plot is not None:
        plot([doc], args.plot)
    print(markdown(doc))
    print(f"load average at start {doc['load_average_start']}, at end {doc['load_average_end']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
