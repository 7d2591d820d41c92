"""CPU throughput: original vs LP unmerged vs LP merged, PyTorch eager and ONNX Runtime, one process.

    python -m benchmarks.throughput [--tiny] [--out DIR] [--runtimes torch,ort] [--threads N]

Writes DIR/throughput.json and DIR/*.png (DIR defaults to benchmarks/results/throughput-cpu[-tiny]).

Variants (random weights, same weights in every variant of one model — speed does not depend on values; norm
scales are U(0.5, 1.5), not ones, so the ONNX merge really folds them):

* ``original``        — ``Decoder(arch)``: the reference decoder, every layer in sequence.
* ``lp_unmerged``     — ``Decoder(arch, pairs)``: each pair as two branches reading the same input.
* ``original_fused``  — ``WideDecoder(dec, ())`` (PyTorch only): norm scales folded, q/k/v and gate/up fused.
* ``lp_merged``       — PyTorch: ``WideDecoder(dec, pairs)``, the pair merged into one wide layer, compared
  against ``original_fused`` so the ratio measures pairing only. ONNX Runtime: the exported LP graph after
  ``layerpair.graph_passes``' merge (issue 3), when that package exposes one; else the row says "not available".

Each measurement: decode = ``steps`` greedy tokens from a cache of ``past`` tokens (growing cache, presents
fed back; batch 1); prefill = one forward of ``seq`` tokens on an empty cache. Variants run round-robin
(rotated start), ``warmup`` rounds discarded, then ``repeats`` rounds: median and IQR of tokens/s. Each LP
row carries ``ratio`` (median / baseline median), ``paired_ratio`` (per-round ratios), the latency-bound
``limit`` L / (L - pairs) and ``gain_fraction`` = (ratio - 1) / (limit - 1).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    SCHEMA_THROUGHPUT,
    Variant,
    interleaved,
    machine,
    now_utc,
    rows_from,
    unavailable_row,
    write_json,
)
from benchmarks.shapes import SHAPES, default_pairs, random_decoder, with_pairs
from benchmarks.wide import WideDecoder, wide_pair
from layerpair.arch import ArchSpec
from layerpair.errors import InputError, LayerpairError
from layerpair.iospec import IOSpec
from layerpair.outdir import staged_output

Pairs = tuple[tuple[int, int], ...]
REPO = Path(__file__).resolve().parents[1]


# ---- settings ----------------------------------------------------------------------------------
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


# ---- measurements ------------------------------------------------------------------------------
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, list[Any]], tuple[Any, list[Any]]]


def _torch_step(model: torch.nn.Module) -> tuple[StepFn, Callable[[IOSpec, int], list[Any]]]:
    def step(ids: Any, mask: Any, pos: Any, past: list[Any]) -> tuple[Any, list[Any]]:
        out = model(ids, mask, pos, *past)
        return out[0], list(out[1:])

    def empty(spec: IOSpec, batch: int) -> list[Any]:
        dt = next(model.parameters()).dtype
        return [torch.zeros(batch, s.num_kv_heads, 0, spec.arch.head_dim, dtype=dt) for s in spec.slots for _ in "kv"]

    return step, empty


def _ort_step(path: Path, spec: IOSpec, threads: int) -> tuple[StepFn, Callable[[IOSpec, int], list[Any]]]:
    from layerpair.exporter.validate import OrtRunner, empty_past

    runner = OrtRunner(path, spec, threads=threads)
    return runner.step, empty_past


def decode_fn(
    step: StepFn, empty: Callable[[IOSpec, int], list[Any]], spec: IOSpec, s: Settings, steps: int, as_torch: bool
) -> Callable[[], float]:
    """Prefill ``past`` tokens once (untimed); each call times ``steps`` greedy decode tokens from that cache."""
    B, P, V = s.batch, s.past, spec.arch.vocab_size
    rng = np.random.default_rng(0)
    conv: Callable[[np.ndarray], Any] = torch.from_numpy if as_torch else (lambda a: a)
    ids = conv(rng.integers(0, V, (B, P)).astype(np.int64))
    with torch.no_grad():
        logits, past = step(ids, conv(np.ones((B, P), np.int64)), conv(np.tile(np.arange(P), (B, 1))), empty(spec, B))
    masks = [conv(np.ones((B, P + i + 1), np.int64)) for i in range(steps)]
    poss = [conv(np.full((B, 1), P + i, np.int64)) for i in range(steps)]
    first = logits[:, -1:].argmax(-1)

    def run() -> float:
        nxt, cache = first, past
        with torch.no_grad():
            t0 = time.perf_counter()
            for i in range(steps):
                out, cache = step(nxt, masks[i], poss[i], cache)
                nxt = out[:, -1:].argmax(-1)  # greedy: the next step depends on this one, as in real decoding
            dt = time.perf_counter() - t0
        return B * steps / dt

    return run


def prefill_fn(
    step: StepFn, empty: Callable[[IOSpec, int], list[Any]], spec: IOSpec, batch: int, seq: int, as_torch: bool
) -> Callable[[], float]:
    rng = np.random.default_rng(1)
    conv: Callable[[np.ndarray], Any] = torch.from_numpy if as_torch else (lambda a: a)
    ids = conv(rng.integers(0, spec.arch.vocab_size, (batch, seq)).astype(np.int64))
    mask = conv(np.ones((batch, seq), np.int64))
    pos = conv(np.tile(np.arange(seq), (batch, 1)))

    def run() -> float:
        past = empty(spec, batch)
        with torch.no_grad():
            t0 = time.perf_counter()
            step(ids, mask, pos, past)
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


# ---- ONNX: export cache and the merge hook -----------------------------------------------------
def _arch_key(arch: ArchSpec, pairs: Pairs) -> str:
    key = [asdict(arch), [list(p) for p in pairs], WEIGHTS]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def exported(dec: Any, cache: Path, say: Callable[[str], None]) -> tuple[Path, float | None]:
    """``dec`` exported with the project's exporter, cached by (shapes, pairs); returns (path, export seconds)."""
    from layerpair.exporter.onnx_export import export_onnx

    d = cache / f"{_arch_key(dec.arch, dec.pairs)}"
    path = d / "model.onnx"
    if path.is_file():
        return path, None
    say(f"exporting ONNX (layers {dec.arch.num_layers}, pairs {list(dec.pairs) or 'none'}) to {d}")
    t0 = time.perf_counter()
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    export_onnx(dec, tmp / "model.onnx")
    tmp.rename(d)  # only complete exports enter the cache
    return path, time.perf_counter() - t0


# Names the pair-merge pass module may expose (issue 3); the first callable found is used.
MERGE_HOOK_NAMES = ("merge_pairs",)


def find_merge_hook() -> tuple[Callable[..., Any] | None, str]:
    """(function, name) from ``layerpair.graph_passes``, or (None, why not)."""
    try:
        gp = importlib.import_module("layerpair.graph_passes")
    except ImportError as e:
        return None, f"layerpair.graph_passes cannot be imported ({e})"
    for name in MERGE_HOOK_NAMES:
        fn = getattr(gp, name, None)
        if callable(fn):
            return fn, name
    return None, f"layerpair.graph_passes exposes no pair-merge function ({', '.join(MERGE_HOOK_NAMES)}; issue 3)"


def merged_onnx(
    fn: Callable[..., Any], src: Path, dst: Path, arch: ArchSpec, pairs: Pairs
) -> tuple[IOSpec, dict[str, Any]]:
    """Merge ``src`` into ``dst`` with issue 3's ``merge_pairs(model_or_path, arch, pairs) -> (ir.Model, report)``.

    ``merge_pairs`` itself checks the result's I/O against ``IOSpec.for_model(arch, pairs, merged=True)``.
    Returns that spec and the pass report (passes fired, node and MatMul counts).
    """
    gp = importlib.import_module("layerpair.graph_passes")
    model, report = fn(src, arch, pairs)
    check_fully_merged(model, arch, pairs, report)
    gp.save_model(model, dst)
    return IOSpec.for_model(arch, pairs, merged=True), report


#: Passes that must fire for every merged pair (cleanup aside): anything less is not the graph to time.
MERGE_PASSES = (
    "share_rmsnorm",
    "fold_norm_scales",
    "merge_attention",
    "merge_sibling_matmuls",
    "merge_reducing_matmuls",
)


def check_fully_merged(model: Any, arch: ArchSpec, pairs: Pairs, report: dict[str, Any]) -> None:
    """GraphPassError unless every pair is one wide layer (``wide_pair_problems``, read from the graph itself),
    the MatMul count is ``MATMULS_SAVED_PER_PAIR`` per pair lower, and every merge pass fired."""
    from layerpair.graph_passes import MATMULS_SAVED_PER_PAIR, GraphPassError
    from layerpair.graph_passes.merge import count_ops
    from layerpair.graph_passes.verify import wide_pair_problems

    problems = [f"pair {a}-{b}: {p}" for a, b in pairs for p in wide_pair_problems(model.graph, arch, (a, b))]
    expected = report["matmuls_before"] - MATMULS_SAVED_PER_PAIR * len(pairs)
    if count_ops(model.graph, "MatMul") != expected:
        problems.append(f"{count_ops(model.graph, 'MatMul')} MatMuls, expected {expected}")
    idle = [name for name in MERGE_PASSES if not report["passes"].get(name)]
    if idle:
        problems.append(f"passes that did not fire: {', '.join(idle)}")
    if problems or not pairs:
        raise GraphPassError(
            "the benchmark's merged ONNX graph is not fully merged: " + ("; ".join(problems) or "no pairs"),
            "its lp_merged rows would time another graph; fix the merge (or the benchmark weights) first",
        )


def merged_agreement(paths: dict[str, tuple[Path, IOSpec, int, str | None]], threads: int) -> dict[str, Any]:
    """ONNX Runtime: merged graph vs unmerged graph (same weights) — the merged speed is of the same function."""
    from layerpair.exporter.validate import OrtRunner, compare_runners

    m, u = paths["lp_merged"], paths["lp_unmerged"]
    res = compare_runners(OrtRunner(m[0], m[1], threads), m[1], OrtRunner(u[0], u[1], threads), u[1])
    return {k: a.to_json() for k, a in res.items()}


# ---- sections ----------------------------------------------------------------------------------
@dataclass
class Ctx:
    s: Settings
    threads: int
    cache: Path
    say: Callable[[str], None]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    export_s: dict[str, float] = field(default_factory=dict)
    merge: dict[str, Any] | None = None


def _common(section: str, runtime: str, model: str, phase: str, s: Settings, **kw: Any) -> dict[str, Any]:
    shape = {"batch": s.batch, "past": s.past, "steps": s.steps} if phase == "decode" else {"batch": s.batch}
    return {"section": section, "runtime": runtime, "model": model, "phase": phase, **shape, **kw}


def _bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def _four_models(dec: Any, pairs: Pairs) -> list[tuple[str, torch.nn.Module, int, str | None]]:
    """(name, module, pairs, baseline) of the four compared forms: the original, LP unmerged, the original with
    single layers fused, and LP merged (whose baseline is the fused original, so the ratio isolates pairing)."""
    fused, merged = wide_pair(dec, pairs)
    k = len(pairs)
    return [
        ("original", dec, 0, None),
        ("lp_unmerged", with_pairs(dec, pairs), k, "original"),
        ("original_fused", fused, 0, None),
        ("lp_merged", merged, k, "original_fused"),
    ]


def _torch_variants(
    models: Sequence[tuple[str, torch.nn.Module, int, str | None]], phase: str, s: Settings, steps: int, seq: int
) -> list[Variant]:
    """One timed closure per model: ``steps`` greedy decode steps, or a prefill of ``seq`` tokens."""
    vs = []
    for name, m, n, base in models:
        step, empty = _torch_step(m)
        io: Any = m.io
        run = (
            decode_fn(step, empty, io, s, steps, True)
            if phase == "decode"
            else prefill_fn(step, empty, io, s.batch, seq, True)
        )
        vs.append(Variant(name, run, n, base))
    return vs


def main_torch(c: Ctx, model: str, arch: ArchSpec, pairs: Pairs) -> None:
    s = c.s
    forms = _four_models(bench_decoder(arch), pairs)
    for phase in ("decode", "prefill"):
        vs = _torch_variants(forms, phase, s, s.steps, s.prefill_seq)
        c.say(f"torch eager {phase}: {model}, pairs {list(pairs)}")
        samples = interleaved(vs, s.repeats, s.warmup)
        extra = {"seq": s.prefill_seq} if phase == "prefill" else {}
        c.rows += rows_from(
            vs,
            samples,
            arch.num_layers,
            _common("main", "torch-eager", model, phase, s, pairs=[list(p) for p in pairs], **extra),
        )


def given_exports(
    dirs: Sequence[Path], arch: ArchSpec
) -> tuple[Pairs, dict[str, tuple[Path, IOSpec, int, str | None]]]:
    """Existing ``layerpair-export`` outputs (original, LP unmerged) instead of fresh random-weight exports.

    Their ``report.json`` gives the pairs; the graphs' inputs must match the I/O spec of ``arch`` with those pairs.
    """
    import onnx

    paths: dict[str, tuple[Path, IOSpec, int, str | None]] = {}
    pairs: Pairs = ()
    for name, d, base in (("original", dirs[0], None), ("lp_unmerged", dirs[1], "original")):
        try:
            report = json.loads((d / "report.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(
                f"cannot read {d}/report.json ({e})", "pass directories written by layerpair-export"
            ) from None
        p = tuple((int(a), int(b)) for a, b in report.get("pairs", []))
        if (name == "original") != (not p):
            raise InputError(f"{d} has pairs {list(p)}", "pass the unpaired export first, then the paired one")
        spec = IOSpec.for_model(arch, p, merged=False)
        got = [i.name for i in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.input]
        if got != spec.input_names or report.get("num_layers") != arch.num_layers:
            raise InputError(
                f"{d}/model.onnx does not have the I/O of the {arch.num_layers}-layer main model",
                "pass exports of the same model shape as the benchmark's main model",
            )
        paths[name] = (d / "model.onnx", spec, len(p), base)
        pairs = p or pairs
    return pairs, paths


def main_ort(c: Ctx, model: str, arch: ArchSpec, pairs: Pairs, given: Sequence[Path] | None = None) -> None:
    s = c.s
    paths: dict[str, tuple[Path, IOSpec, int, str | None]] = {}
    if given:
        pairs, paths = given_exports(given, arch)
        c.notes.append(f"onnxruntime: existing exports {[str(g) for g in given]} (their weights, their pairs)")
    else:
        dec = bench_decoder(arch)
        lp = with_pairs(dec, pairs)
        for name, m, base in (("original", dec, None), ("lp_unmerged", lp, "original")):
            path, secs = exported(m, c.cache, c.say)
            if secs is not None:
                c.export_s[f"{model}/{name}"] = round(secs, 1)
            paths[name] = (path, m.io, len(m.pairs), base)
        del dec, lp
        gc.collect()
    fn, why = find_merge_hook()
    if fn is not None:
        src = paths["lp_unmerged"][0]
        dst = (c.cache / "given-merged" if given else src.parent.with_name(src.parent.name + "-merged")) / "model.onnx"
        t0 = time.perf_counter()  # an incomplete merge fails the benchmark (check_fully_merged)
        spec, report = merged_onnx(fn, src, dst, arch, pairs)
        c.export_s[f"{model}/lp_merged_passes"] = round(time.perf_counter() - t0, 1)
        paths["lp_merged"] = (dst, spec, len(pairs), "original")
        c.merge = {
            "function": f"layerpair.graph_passes.{why}",
            "report": report,
            "agreement_vs_unmerged": merged_agreement(paths, c.threads),
        }
    for phase in ("decode", "prefill"):
        vs = []
        for name, (path, spec, n, base) in paths.items():
            step, empty = _ort_step(path, spec, c.threads)
            run = (
                decode_fn(step, empty, spec, s, s.steps, False)
                if phase == "decode"
                else prefill_fn(step, empty, spec, s.batch, s.prefill_seq, False)
            )
            vs.append(Variant(name, run, n, base))
        c.say(f"onnxruntime cpu {phase}: {model}, pairs {list(pairs)}")
        samples = interleaved(vs, s.repeats, s.warmup)
        extra = {"seq": s.prefill_seq} if phase == "prefill" else {}
        common = _common("main", "onnxruntime-cpu", model, phase, s, pairs=[list(p) for p in pairs], **extra)
        c.rows += rows_from(vs, samples, arch.num_layers, common)
        if "lp_merged" not in paths:
            c.rows.append(unavailable_row("lp_merged", why, arch.num_layers, len(pairs), common))


def scaling_pairs(c: Ctx, model: str, arch: ArchSpec) -> None:
    s = c.s
    dec = bench_decoder(arch)
    fused, _ = wide_pair(dec, ())
    vs = [
        Variant("original", decode_fn(*_torch_step(dec), dec.io, s, s.steps, True)),
        Variant("original_fused", decode_fn(*_torch_step(fused), fused.io, s, s.steps, True)),
    ]
    for k in c.s.pair_counts:
        pairs = default_pairs(arch, k)
        lp = with_pairs(dec, pairs)
        merged = WideDecoder(dec, pairs, share_from=fused)
        vs.append(
            Variant(
                f"lp_unmerged_k{k}",
                decode_fn(*_torch_step(lp), lp.io, s, s.steps, True),
                k,
                "original",
                {"pairs": [list(p) for p in pairs], "form": "unmerged"},
            )
        )
        vs.append(
            Variant(
                f"lp_merged_k{k}",
                decode_fn(*_torch_step(merged), merged.io, s, s.steps, True),
                k,
                "original_fused",
                {"pairs": [list(p) for p in pairs], "form": "merged"},
            )
        )
    c.say(f"torch eager decode, scaling with pairs {c.s.pair_counts}: {model}")
    samples = interleaved(vs, s.repeats, s.warmup)
    c.rows += rows_from(vs, samples, arch.num_layers, _common("scaling_pairs", "torch-eager", model, "decode", s))


def scaling_size(c: Ctx, models: Sequence[str]) -> None:
    import psutil

    s = c.s
    for model in models:
        arch = SHAPES[model]
        k = max(1, arch.num_layers // 8)  # the same share of depth for every size
        pairs = default_pairs(arch, k)
        need = 2.2 * arch.num_parameters() * 4  # Decoder + fused copy (embedding shared) + pair blocks, fp32
        avail = psutil.virtual_memory().available
        for phase in ("decode", "prefill"):
            common = _common(
                "scaling_size",
                "torch-eager",
                model,
                phase,
                s,
                pairs=[list(p) for p in pairs],
                parameters=arch.num_parameters(),
            )
            if phase == "decode":
                common["steps"] = s.size_steps
            else:
                common["seq"] = s.size_prefill_seq
            if avail < need:
                for v, n in (("original", 0), ("lp_unmerged", k), ("original_fused", 0), ("lp_merged", k)):
                    c.rows.append(
                        unavailable_row(
                            v,
                            f"needs ~{need / 1e9:.1f} GB free memory, {avail / 1e9:.1f} GB available",
                            arch.num_layers,
                            n,
                            common,
                        )
                    )
                continue
            forms = _four_models(bench_decoder(arch), pairs)
            vs = _torch_variants(forms, phase, s, s.size_steps, s.size_prefill_seq)
            c.say(f"torch eager {phase}, scaling with size: {model} ({arch.num_parameters() / 1e6:.0f} M params)")
            samples = interleaved(vs, s.repeats, s.warmup)
            c.rows += rows_from(vs, samples, arch.num_layers, common)
            del forms, vs
            gc.collect()


# ---- plots ---------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    ok = [r for r in rows if r["status"] == "ok"]
    # 1) main: tokens/s per variant, per runtime and phase, IQR as error bars
    main = [r for r in ok if r["section"] == "main"]
    groups = sorted({(r["runtime"], r["phase"]) for r in main})
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
        for ax, (rt, ph) in zip(axes[0], groups, strict=True):
            rs = [r for r in main if r["runtime"] == rt and r["phase"] == ph]
            med = [r["tokens_per_s"]["median"] for r in rs]
            err = [
                [m - r["tokens_per_s"]["q25"] for m, r in zip(med, rs, strict=True)],
                [r["tokens_per_s"]["q75"] - m for m, r in zip(med, rs, strict=True)],
            ]
            ax.bar(range(len(rs)), med, yerr=err, color=["#888" if r["num_pairs"] == 0 else "#2a7" for r in rs])
            ax.set_xticks(range(len(rs)), [r["variant"] for r in rs], rotation=30, ha="right", fontsize=8)
            for i, r in enumerate(rs):
                if r.get("ratio") is not None:
                    ax.text(
                        i, med[i], f"x{r['ratio']:.3f}\n(lim {r['limit']:.3f})", ha="center", va="bottom", fontsize=7
                    )
            ax.set_title(f"{rs[0]['model']}: {rt} {ph}", fontsize=9)
            ax.set_ylabel("tokens/s (median, IQR)")
        fig.tight_layout()
        fig.savefig(out / "main.png", dpi=110)
        plt.close(fig)
        files.append("main.png")
    # 2) ratio vs number of pairs, against the limit
    sp = [r for r in ok if r["section"] == "scaling_pairs" and r.get("ratio") is not None]
    if sp:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        L = sp[0]["num_layers"]
        ks = sorted({r["num_pairs"] for r in sp})
        ax.plot(ks, [L / (L - k) for k in ks], "k--", label="limit L/(L-pairs)")
        for form, mk in (("unmerged", "o-"), ("merged", "s-")):
            rs = sorted((r for r in sp if r.get("form") == form), key=lambda r: r["num_pairs"])
            ax.errorbar(
                [r["num_pairs"] for r in rs],
                [r["ratio"] for r in rs],
                yerr=[
                    [max(0.0, r["ratio"] - r["paired_ratio"]["q25"]) for r in rs],
                    [max(0.0, r["paired_ratio"]["q75"] - r["ratio"]) for r in rs],
                ],
                fmt=mk,
                capsize=3,
                label=f"LP {form}",
            )
        ax.axhline(1.0, color="#bbb", lw=0.8)
        ax.set_xlabel(f"pairs (of {L} layers)")
        ax.set_ylabel("decode tokens/s ratio vs original")
        ax.set_title(f"{sp[0]['model']}: torch eager decode", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scaling_pairs.png", dpi=110)
        plt.close(fig)
        files.append("scaling_pairs.png")
    # 3) ratio vs model size
    ss = [r for r in ok if r["section"] == "scaling_size" and r.get("ratio") is not None]
    if ss:
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.6), squeeze=False)
        for ax, ph in zip(axes[0], ("decode", "prefill"), strict=True):
            for v, mk in (("lp_unmerged", "o-"), ("lp_merged", "s-")):
                rs = sorted((r for r in ss if r["phase"] == ph and r["variant"] == v), key=lambda r: r["parameters"])
                ax.plot([r["parameters"] / 1e6 for r in rs], [r["ratio"] for r in rs], mk, label=v)
            rs = sorted(
                (r for r in ss if r["phase"] == ph and r["variant"] == "lp_merged"), key=lambda r: r["parameters"]
            )
            ax.plot([r["parameters"] / 1e6 for r in rs], [r["limit"] for r in rs], "k--", label="limit")
            ax.set_xscale("log")
            ax.set_xlabel("parameters (M)")
            ax.set_ylabel("tokens/s ratio")
            ax.set_title(f"torch eager {ph}", fontsize=9)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scaling_size.png", dpi=110)
        plt.close(fig)
        files.append("scaling_size.png")
    return files


# ---- main --------------------------------------------------------------------------------------
def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (what docs/benchmarks.md and the README show)."""
    head = "| section | runtime | model | phase | variant | pairs | tokens/s median [IQR] | ratio | limit | gain |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['section']} | {r['runtime']} | {r['model']} | {r['phase']} | {r['variant']} | "
                f"{r['num_pairs']} | not available: {r['reason']} | | {r['limit']:.3f} | |"
            )
            continue
        t = r["tokens_per_s"]
        ratio = f"{r['ratio']:.3f}" if r.get("ratio") is not None else ""
        gain = f"{r['gain_fraction']:.2f}" if r.get("gain_fraction") is not None else ""
        lines.append(
            f"| {r['section']} | {r['runtime']} | {r['model']} | {r['phase']} | {r['variant']} | "
            f"{r['num_pairs']} | {t['median']:.1f} [{t['q25']:.1f}, {t['q75']:.1f}] | {ratio} | "
            f"{r['limit']:.3f} | {gain} |"
        )
    return head + "\n".join(lines) + "\n"


def run(s: Settings, out: Path, threads: int, cache: Path, say: Callable[[str], None]) -> dict[str, Any]:
    torch.set_num_threads(threads)
    c = Ctx(s, threads, cache, say)
    t0 = time.perf_counter()
    started = {"date": now_utc(), "machine": machine()}
    arch = SHAPES[s.main_model]
    pairs = default_pairs(arch, s.main_pairs)
    if "torch" in s.runtimes:
        main_torch(c, s.main_model, arch, pairs)
    if "ort" in s.runtimes:
        main_ort(c, s.main_model, arch, pairs, [Path(d) for d in s.ort_exports] if s.ort_exports else None)
    if "torch" in s.runtimes:
        pairs_model = s.main_model if s.mode == "full" else "tiny-6"  # tiny: 6 layers, room for 2 pairs
        scaling_pairs(c, pairs_model, SHAPES[pairs_model])
        scaling_size(c, s.size_models)
    import onnxruntime

    from layerpair.pipeline import versions

    result: dict[str, Any] = {
        "schema": SCHEMA_THROUGHPUT,
        **started,
        "load_average_end": list(os.getloadavg()),
        "mode": s.mode,
        "settings": asdict(s),
        "threads": threads,
        "dtype": "float32",
        "weights": WEIGHTS,
        "versions": {**versions(), "onnxruntime": onnxruntime.__version__},
        "export_seconds": c.export_s,
        "notes": c.notes,
        "onnx_merge": c.merge,
        "rows": c.rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    result["plots"] = plot(c.rows, out)
    write_json(out / "throughput.json", result)
    (out / "throughput.md").write_text(markdown_table(c.rows))
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI smoke sizes (hidden 64, few layers): < 1 min")
    p.add_argument("--out", type=Path, default=None, help="output directory (replaced atomically)")
    p.add_argument("--runtimes", default="torch,ort", help="comma list of torch, ort (default both)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per comparison (default 5; tiny 3)")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "layerpair-bench" / "onnx",
        help="ONNX export cache (exports are keyed by shapes and pairs)",
    )
    p.add_argument(
        "--ort-exports",
        default=None,
        metavar="ORIG_DIR,LP_DIR",
        help="time these layerpair-export outputs (unpaired, paired) in ONNX Runtime instead of exporting",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runtimes = [x.strip() for x in args.runtimes.split(",") if x.strip()]
        bad = [x for x in runtimes if x not in ("torch", "ort")]
        if bad or not runtimes:
            raise InputError(f"unknown runtime(s) {bad or runtimes} in --runtimes", "use torch, ort or torch,ort")
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}", "pass e.g. --threads 2")
        s = Settings.tiny() if args.tiny else Settings.full()
        s.runtimes = runtimes
        if args.ort_exports:
            dirs = [Path(x) for x in args.ort_exports.split(",")]
            if len(dirs) != 2 or not all((d / "model.onnx").is_file() for d in dirs):
                raise InputError(
                    f"--ort-exports '{args.ort_exports}' is not two export directories",
                    "pass ORIG_DIR,LP_DIR, each with model.onnx and report.json",
                )
            s.ort_exports = [str(d) for d in dirs]
        if args.repeats is not None:
            if args.repeats < 1:
                raise InputError(f"--repeats must be >= 1, got {args.repeats}", "pass e.g. --repeats 5")
            s.repeats = args.repeats
        out = args.out or REPO / "benchmarks" / "results" / ("throughput-cpu-tiny" if args.tiny else "throughput-cpu")

        def say(msg: str) -> None:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)

        with staged_output(out, force=True) as tmp:
            res = run(s, tmp, args.threads, args.cache, say)
        say(f"wrote {out}/throughput.json, {', '.join(res['plots'])} in {res['wall_s']} s")
        print(markdown_table(res["rows"]))
        return 0
    except LayerpairError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
