"""GPU decode throughput: original vs LP merged, PyTorch with CUDA graphs, one H200-sized run (< 8 min).

    python -m benchmarks.gpu [--out DIR] [--budget-s 420]     # on a CUDA machine
    python -m benchmarks.gpu --cpu [--out DIR]                # proves the same code path on CPU (CI smoke)

Models (random bf16 weights, shapes only): SmolLM2-135M, Llama-3.2-1B, Llama-3.2-3B, Llama-3.1-8B. For each,
``original`` = ``WideDecoder(dec, ())`` (norm scales folded, q/k/v and gate/up fused, every layer in
sequence) and ``lp_merged_k{K}`` = ``WideDecoder(dec, pairs)`` (K pairs merged into wide layers; the single
layers are the very same modules). So the ratio measures pairing only.

Decode uses a static KV cache ``[B, n·KVH, T_max, D]`` written in place, so one step has fixed shapes and is
captured once in a CUDA graph; the graph also feeds its argmax back as the next token and advances the cache
position, so N replays are N real greedy decode steps. Batches 1 and 8; variants run round-robin, warm-up
discarded, median and IQR of tokens/s; rows carry ``ratio``, ``limit`` = L / (L - pairs), ``gain_fraction``.
``cuda-eager`` rows run the same step without the graph (launch-bound: closest to the depth limit).

Before timing, ``equivalence`` checks on the run's device (fp32, tiny shapes) that ``WideDecoder`` matches the
reference pair-parallel ``Decoder`` — dynamic forward and static decode — so the speed is of the same function.
Needs only torch (+ numpy): nothing else has to travel with the run.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SCHEMA_GPU, Variant, interleaved, machine, now_utc, rows_from, unavailable_row, write_json
from benchmarks.shapes import SHAPES, default_pairs, random_decoder, with_pairs
from benchmarks.wide import WideDecoder
from layerpair.arch import ArchSpec

REPO = Path(__file__).resolve().parents[1]
GPU_MODELS = ["smollm2-135m", "llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]
CPU_MODELS = ["tiny-6", "tiny-wide"]


def pair_counts(arch: ArchSpec) -> list[int]:
    """Two pairs (the CLI's usual 20:24 count) and a quarter of the depth, capped to what fits below the
    last two layers (tiny CI shapes get one pair)."""
    cap = max(1, (arch.num_layers - 2) // 2)
    return sorted({min(2, cap), min(max(2, arch.num_layers // 4), cap)})


class StaticDecode:
    """One variant at one batch size in the decode core's shape (``layerpair.decode``: ``prefill``,
    ``decode_one_token``, ``decode_n_tokens``) on static buffers: the core's numpy loop would sync the GPU on every
    token, so here the step, the greedy pick and the position advance all live on the device, inside one CUDA graph
    when ``use_graph``. ``run(steps) -> tokens/s``."""

    def __init__(self, model: WideDecoder, batch: int, t_max: int, start: int, use_graph: bool) -> None:
        self.model, self.batch, self.start = model, batch, start
        dev = model.embed_tokens.device
        self.caches = model.static_caches(batch, t_max)
        self.ids = self.prefill(torch.Generator(device=dev).manual_seed(0), dev)
        self.pos = torch.full((1,), start, dtype=torch.long, device=dev)
        self.graph: Any = None
        self.logits: torch.Tensor | None = None
        if use_graph:
            self._capture()

    def prefill(self, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
        """A "prefilled" cache of random values (values only change data, not cost) and the first token [B,1]."""
        for c in self.caches:
            c.normal_(0.0, 1.0, generator=gen)
        return torch.randint(0, self.model.arch.vocab_size, (self.batch, 1), device=dev, generator=gen)

    def decode_one_token(self) -> torch.Tensor:
        """One forward at ``pos``; its argmax becomes the next token and ``pos`` advances (all on the device)."""
        logits = self.model.decode_static(self.ids, self.pos, self.caches)
        self.ids.copy_(logits[:, -1:].argmax(-1))  # greedy feedback inside the graph
        self.pos.add_(1)
        return logits

    def decode_n_tokens(self, n: int) -> None:
        """``n`` greedy tokens from the current position: graph replays, or eager ``decode_one_token`` calls."""
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.decode_one_token()

    @torch.no_grad()
    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy init), as the docs ask
            for _ in range(3):
                self.decode_one_token()
        torch.cuda.current_stream().wait_stream(side)
        self.pos.fill_(self.start)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.decode_one_token()
        self.pos.fill_(self.start)

    @torch.no_grad()
    def run(self, steps: int) -> float:
        self.pos.fill_(self.start)
        cuda = self.ids.is_cuda
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        self.decode_n_tokens(steps)
        if cuda:
            torch.cuda.synchronize()
        return self.batch * steps / (time.perf_counter() - t0)


@torch.no_grad()
def equivalence(device: str) -> dict[str, Any]:
    """Max |logits| difference of WideDecoder (dynamic and static) against the reference Decoder, fp32."""
    from layerpair.exporter.validate import TorchRunner, compare_runners

    arch = SHAPES["tiny-6"]
    dec = random_decoder(arch, torch.float32, device, seed=1)
    for name, p in dec.named_parameters():  # non-unit norms, so the scale folding is really tested
        if name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
    pairs = ((1, 2), (3, 4))
    lp = with_pairs(dec, pairs)
    merged = WideDecoder(dec, pairs)
    out: dict[str, Any] = {"model": "tiny-6", "pairs": [list(p) for p in pairs], "device": device}
    if device == "cpu":  # compare_runners feeds numpy: CPU only
        res = compare_runners(TorchRunner(merged), merged.io, TorchRunner(lp), lp.io)
        out["dynamic_max_abs"] = max(a.max_abs for a in res.values())
        out["dynamic_present_max_abs"] = max(a.present_max_abs for a in res.values())
    # static decode vs the reference's growing cache, on the run's device
    B, P, steps = 2, 5, 4
    g = torch.Generator(device=device).manual_seed(2)
    ids = torch.randint(0, arch.vocab_size, (B, P), device=device, generator=g)
    mask = torch.ones(B, P, dtype=torch.long, device=device)
    pos = torch.arange(P, device=device).expand(B, P)
    ref = lp(ids, mask, pos, *[t.to(device) for t in lp.empty_past(B, torch.float32)])
    empty = [torch.zeros(B, s.num_kv_heads, 0, arch.head_dim, device=device) for s in merged.io.slots for _ in "kv"]
    mo = merged(ids, mask, pos, *empty)
    out["prefill_max_abs"] = float((mo[0] - ref[0]).abs().max())
    caches = merged.static_caches(B, P + steps)
    for c, t in zip(caches, mo[1:], strict=True):
        c[:, :, :P] = t
    past = list(ref[1:])
    nxt = ref[0][:, -1:].argmax(-1)
    worst = 0.0
    for i in range(steps):
        ls = merged.decode_static(nxt, torch.tensor([P + i], device=device), caches)
        m = torch.ones(B, P + i + 1, dtype=torch.long, device=device)
        o = lp(nxt, m, torch.full((B, 1), P + i, device=device), *past)
        past = list(o[1:])
        worst = max(worst, float((ls - o[0]).abs().max()))
        nxt = o[0][:, -1:].argmax(-1)
    out["static_decode_max_abs"] = worst
    return out


def bench_model(
    name: str,
    device: str,
    dtype: torch.dtype,
    batches: Sequence[int],
    past: int,
    steps: int,
    repeats: int,
    warmup: int,
    use_graph: bool,
    eager_steps: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    arch = SHAPES[name]
    t0 = time.perf_counter()
    dec = random_decoder(arch, dtype, device)
    base = WideDecoder(dec, ())
    lps = {k: WideDecoder(dec, default_pairs(arch, k), share_from=base) for k in pair_counts(arch)}
    del dec  # WideDecoder holds its own fused copies; drop the per-projection weights
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    say(f"{name}: built in {time.perf_counter() - t0:.1f} s; pairs {list(lps)}")
    rows: list[dict[str, Any]] = []
    modes = [("cuda-graph" if use_graph else "cpu-static", use_graph, steps)]
    if use_graph:
        modes.append(("cuda-eager", False, eager_steps))
    for runtime, graph, n in modes:
        for B in batches:
            runners = {"original": StaticDecode(base, B, past + n + 4, past, graph)}
            for k, m in lps.items():
                runners[f"lp_merged_k{k}"] = StaticDecode(m, B, past + n + 4, past, graph)
            finite = bool(
                all(torch.isfinite(r.model.decode_static(r.ids, r.pos, r.caches)).all() for r in runners.values())
            )
            vs = [Variant("original", lambda r=runners["original"], n=n: r.run(n))]
            for k in lps:
                vs.append(
                    Variant(
                        f"lp_merged_k{k}",
                        lambda r=runners[f"lp_merged_k{k}"], n=n: r.run(n),
                        k,
                        "original",
                        {"pairs": [list(p) for p in lps[k].pairs]},
                    )
                )
            say(f"{name}: {runtime} batch {B}")
            samples = interleaved(vs, repeats, warmup)
            common = {
                "section": "gpu_decode",
                "runtime": runtime,
                "model": name,
                "phase": "decode",
                "batch": B,
                "past": past,
                "steps": n,
                "dtype": str(dtype).removeprefix("torch."),
                "parameters": arch.num_parameters(),
                "logits_finite": finite,
            }
            rows += rows_from(vs, samples, arch.num_layers, common)
            del runners, vs
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def gpu_facts() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "memory_gb": round(p.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "count": torch.cuda.device_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="prove the code path on CPU with tiny shapes (no CUDA graphs)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results/gpu[-cpu])")
    p.add_argument("--models", default=None, help=f"comma list from {', '.join(SHAPES)}")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip remaining models after this many seconds")
    args = p.parse_args(argv)

    def say(msg: str) -> None:
        print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)

    if not args.cpu and not torch.cuda.is_available():
        print(
            "error: no CUDA device visible — run on a GPU machine, or pass --cpu to prove the script on CPU",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.cpu else "cuda"
    models = args.models.split(",") if args.models else (CPU_MODELS if args.cpu else GPU_MODELS)
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        print(f"error: unknown model shape(s) {unknown} — choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    if args.cpu:
        dtype, batches, past, steps, repeats, warmup, eager_steps = torch.float32, [1, 2], 8, 4, 2, 1, 2
    else:
        dtype, batches, past, steps, repeats, warmup, eager_steps = torch.bfloat16, [1, 8], 512, 64, 5, 1, 16
    t0 = time.perf_counter()
    out = args.out or REPO / "benchmarks" / "results" / ("gpu-cpu-mode" if args.cpu else "gpu")
    result: dict[str, Any] = {
        "schema": SCHEMA_GPU,
        "date": now_utc(),
        "machine": {**machine(), "gpu": gpu_facts()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "device": device,
        "settings": {
            "dtype": str(dtype),
            "batches": batches,
            "past": past,
            "steps": steps,
            "repeats": repeats,
            "warmup": warmup,
            "eager_steps": eager_steps,
            "cuda_graphs": not args.cpu,
        },
        "weights": "random N(0, 0.02), unit norms (speed does not depend on values)",
    }
    say(f"device {device} {result['machine']['gpu'] or ''}")
    result["equivalence"] = equivalence(device)
    say(f"equivalence: {result['equivalence']}")
    rows: list[dict[str, Any]] = []
    for name in models:
        if time.perf_counter() - t0 > args.budget_s:
            arch = SHAPES[name]
            for k in [0, *pair_counts(arch)]:
                rows.append(
                    unavailable_row(
                        "original" if k == 0 else f"lp_merged_k{k}",
                        f"not run: time budget {args.budget_s:.0f} s spent",
                        arch.num_layers,
                        k,
                        {"section": "gpu_decode", "model": name},
                    )
                )
            continue
        try:
            rows += bench_model(
                name, device, dtype, batches, past, steps, repeats, warmup, not args.cpu, eager_steps, say
            )
        except torch.OutOfMemoryError as e:  # record it; the next (smaller or larger) model still runs
            rows.append(
                unavailable_row(
                    "all",
                    f"out of memory: {str(e)[:160]}",
                    SHAPES[name].num_layers,
                    0,
                    {"section": "gpu_decode", "model": name},
                )
            )
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    result["rows"] = rows
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".gpu.json.{os.getpid()}"
    write_json(tmp, result)
    tmp.replace(out / "gpu.json")  # atomic: a reader never sees half a file
    for r in rows:
        if r["status"] == "ok" and r.get("ratio") is not None:
            say(
                f"{r['model']:>14} {r['runtime']:>10} B={r['batch']} {r['variant']:>14}: "
                f"{r['tokens_per_s']['median']:9.1f} tok/s  ratio {r['ratio']:.3f}  limit {r['limit']:.3f}"
            )
    say(f"wrote {out / 'gpu.json'} in {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
