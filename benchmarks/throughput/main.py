"""CPU throughput: original vs LP unmerged vs LP merged, PyTorch eager and ONNX Runtime, one process.

The command line of ``python -m benchmarks.throughput`` (the package docstring describes the variants and the
statistics): flags -> ``Settings``, the sections in order, then throughput.json, throughput.md and the plots,
written atomically to the output directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SCHEMA_THROUGHPUT, machine, now_utc, write_json
from benchmarks.shapes import SHAPES, default_pairs
from benchmarks.throughput.measure import WEIGHTS, Settings
from benchmarks.throughput.plot import plot
from benchmarks.throughput.sections import Ctx, main_ort, main_torch, scaling_pairs, scaling_size
from layerpair.errors import InputError, LayerpairError
from layerpair.outdir import staged_output

REPO = Path(__file__).resolve().parents[2]


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
