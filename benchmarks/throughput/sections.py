"""The measured sections, each appending rows to ``Ctx.rows``: the main comparison of the four forms on PyTorch
eager (``main_torch``) and ONNX Runtime (``main_ort``), decode speed against the number of pairs
(``scaling_pairs``) and both phases against model size (``scaling_size``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Variant, interleaved, rows_from, unavailable_row
from benchmarks.shapes import SHAPES, default_pairs, with_pairs
from benchmarks.throughput.exports import exported, find_merge_hook, given_exports, merged_agreement, merged_onnx
from benchmarks.throughput.measure import Pairs, Settings, bench_decoder, decode_fn, ort_step, prefill_fn, torch_step
from benchmarks.wide import WideDecoder, wide_pair
from layerpair.arch import ArchSpec
from layerpair.iospec import IOSpec


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
        step, empty = torch_step(m)
        io: Any = m.io
        run = decode_fn(step, empty, io, s, steps) if phase == "decode" else prefill_fn(step, empty, io, s.batch, seq)
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
            step, empty = ort_step(path, spec, c.threads)
            run = (
                decode_fn(step, empty, spec, s, s.steps)
                if phase == "decode"
                else prefill_fn(step, empty, spec, s.batch, s.prefill_seq)
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
        Variant("original", decode_fn(*torch_step(dec), dec.io, s, s.steps)),
        Variant("original_fused", decode_fn(*torch_step(fused), fused.io, s, s.steps)),
    ]
    for k in c.s.pair_counts:
        pairs = default_pairs(arch, k)
        lp = with_pairs(dec, pairs)
        merged = WideDecoder(dec, pairs, share_from=fused)
        vs.append(
            Variant(
                f"lp_unmerged_k{k}",
                decode_fn(*torch_step(lp), lp.io, s, s.steps),
                k,
                "original",
                {"pairs": [list(p) for p in pairs], "form": "unmerged"},
            )
        )
        vs.append(
            Variant(
                f"lp_merged_k{k}",
                decode_fn(*torch_step(merged), merged.io, s, s.steps),
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
