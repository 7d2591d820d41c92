"""``layerpair-export``: argument parsing and stage composition only — no logic lives here.

    layerpair-export MODEL [--pairs SPEC] [-o OUT] [--force] ...    export + validate (the main job)
    layerpair-export <verb> ...                                     other verbs, see VERBS

Every LayerpairError becomes ``error: <one line>`` on stderr and its exit code; nothing else escapes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from layerpair.engine.options import (
    ORT_ROTARY,
    TARGETS,
    add_engine_args,
    check_target,
    engine_options_from_args,
    engine_summary_lines,
    preflight_from_argv,
)
from layerpair.errors import InputError, LayerpairError

# verb -> "module:function"; each function takes argv (the words after the verb) and returns an exit code.
VERBS: dict[str, str] = {}
VERBS["bench"] = "layerpair.deploy.bench:bench_cli"
VERBS["check"] = "layerpair.deploy.check:check_cli"
VERBS["eval"] = "layerpair.evaluation.cli:run_eval_cli"
VERBS["generate"] = "layerpair.deploy.generate:generate_cli"
VERBS["triton"] = "layerpair.deploy.triton:triton_cli"


def add_quant_args(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("weight-only quantization (--target ort)")
    q.add_argument("--quant", choices=("int4", "int8"), default=None, help="MatMul weights -> MatMulNBits")
    q.add_argument("--quant-block", type=int, default=32, help="weights per scale along K: 16..256 (default 32)")
    q.add_argument(
        "--quant-accuracy",
        type=int,
        default=4,
        help="MatMulNBits accuracy level: 4 = int8 activations, fast on CPU (default); 0/1 = float32",
    )
    q.add_argument(
        "--quant-fp32-head", action="store_true", help="keep a tied LM head float32 (default: quantized, own copy)"
    )


def export_parser() -> argparse.ArgumentParser:
    from layerpair.exporter.loading import DEFAULT_MODEL
    from layerpair.exporter.onnx_export import DEFAULT_OPSET
    from layerpair.pipeline import DEFAULT_ATOL

    p = argparse.ArgumentParser(
        prog="layerpair-export",
        description="Export a Llama-family model with layer-parallel pairs to a validated ONNX decoder.",
        epilog="other verbs: " + (", ".join(sorted(VERBS)) or "none") + " (layerpair-export VERB --help)",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=DEFAULT_MODEL,
        help=f"checkpoint directory, .gguf file, hub id, or embedded short name (default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--pairs",
        default="none",
        help="S:E (even range: pairs (S,S+1)…(E-2,E-1)), a list like 10-11,14-15, none (default), or auto "
        "(search on calibration text; needs --max-ppl-increase and/or --target-depth)",
    )
    p.add_argument("-o", "--output", type=Path, default=None, help="output directory (default: ./<model>-lp<pairs>)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    _add_layout_args(p)  # --external-data / --single-file
    p.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help=f"validation tolerance, max abs on logits and cache (default {DEFAULT_ATOL:g})",
    )
    _add_validation_args(p)  # --validation, --window-gb
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="keep each pair as two parallel branches (default: merge each pair into one wide layer)",
    )
    _add_target_args(p)  # --target, --ort-rotary
    add_quant_args(p)  # --quant, --quant-block, --quant-accuracy, --quant-fp32-head
    add_engine_args(p)  # --dtype, --trt, --trt-backend, --max-batch/--max-seq/--max-context
    from layerpair.evaluation.cli import add_selection_args

    add_selection_args(p)  # --pairs auto (--max-ppl-increase, --target-depth, --plot), --heal
    p.add_argument("--triton", type=Path, default=None, metavar="REPO", help="also write a Triton model repository")
    return p


def _add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        choices=TARGETS,
        default="portable",
        help="portable: standard ONNX ops (ONNX Runtime, TensorRT; the default); ort: ONNX Runtime's fused contrib "
        "ops (GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization), ONNX Runtime only, fp32",
    )
    p.add_argument(
        "--ort-rotary",
        choices=ORT_ROTARY,
        default=None,
        help="--target ort: gqa lets GroupQueryAttention rotate packed QKV at each token's cache index (same logits "
        "when position_ids count real tokens after left padding, as every runner here feeds); separate keeps "
        "RotaryEmbedding ops that read position_ids as given (packed sequences, gaps). Default: gqa where every "
        "attention allows it (not Qwen3), else separate, said in the report",
    )


def _add_layout_args(p: argparse.ArgumentParser) -> None:
    data = p.add_mutually_exclusive_group()
    data.add_argument(
        "--external-data",
        dest="external_data",
        action="store_true",
        default=None,
        help="store weights in model.onnx.data, written tensor by tensor (the default)",
    )
    data.add_argument(
        "--single-file",
        dest="external_data",
        action="store_false",
        help="weights inside model.onnx (models under 2 GB; costs two transient copies of the weights)",
    )


def _add_validation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--validation",
        choices=("auto", "whole", "windowed"),
        default="auto",
        help="whole graph against the PyTorch model, or window by window for models that do not fit in memory "
        "twice (default auto: whole when it fits)",
    )
    p.add_argument(
        "--window-gb", type=float, default=1.0, help="windowed validation: fp32 weights per window (default 1)"
    )


def _default_output(model: str, pairs: str) -> Path:
    stem = Path(model.rstrip("/")).name.removesuffix(".gguf").replace("/", "_") or "model"
    tag = pairs.strip().lower().replace(":", "-").replace(",", "_")
    return Path(f"{stem}-lp{tag}" if tag and tag != "none" else f"{stem}-lp")


def run_export_cli(argv: Sequence[str]) -> int:
    preflight_from_argv(argv)  # --trt without TensorRT fails here, before torch is even imported
    from layerpair.exporter.pairs import parse_pairs
    from layerpair.pipeline import ExportOptions, run_export

    args = export_parser().parse_args(argv)
    dtype, engine = engine_options_from_args(args)
    check_target(args.target, args.trt, args.dtype, args.ort_rotary)
    from layerpair.graph_passes.quantize import check_quant

    check_quant(args.quant, args.quant_block, args.quant_accuracy, args.target)
    if not args.window_gb > 0:
        raise InputError(f"--window-gb must be positive, got {args.window_gb}", "pass e.g. --window-gb 1")
    if not (args.atol > 0 and args.atol != float("inf")):  # inf (or NaN) would turn validation off
        raise InputError(f"--atol must be positive, got {args.atol}", "pass e.g. --atol 1e-4")
    output = args.output or _default_output(args.model, args.pairs)
    from layerpair.evaluation.selection import export_selection

    decoder_for = export_selection(args)  # None unless --pairs auto / --heal
    # Parse once with a huge layer count so syntax errors fail before the model is loaded; the range check
    # against the real depth runs again after loading.
    if args.pairs.strip().lower() != "auto":
        parse_pairs(args.pairs, 1 << 30)
    if args.triton is not None:  # fail before the slow export, not after it
        from layerpair.outdir import check_destination

        check_destination(args.triton, args.force)
    opts = ExportOptions(
        model=args.model,
        pairs_spec=args.pairs,
        output=output,
        force=args.force,
        opset=args.opset,
        external_data=args.external_data,
        atol=args.atol,
        merge=not args.no_merge,
        dtype=dtype,
        engine=engine,
        decoder_for=decoder_for,
        validation=args.validation,
        window_gb=args.window_gb,
        target=args.target,
        ort_rotary=args.ort_rotary or "auto",
        quant=args.quant,
        quant_block=args.quant_block,
        quant_accuracy=args.quant_accuracy,
        quant_head=not args.quant_fp32_head,
    )
    report = run_export(opts, lambda n: parse_pairs(args.pairs, n))
    print(summary(report, output))
    if args.triton is not None:  # same code as `layerpair-export triton OUT REPO` (defaults; the verb has all flags)
        from layerpair.deploy.triton import triton_cli

        return triton_cli([str(output), str(args.triton), *(["--force"] if args.force else [])])
    return 0


def _quant_lines(report: dict) -> list[str]:
    """``--quant``: what was quantized, how it was validated, and that the ORT-vs-PyTorch lines below are the
    float32 graph's (the quantized one is held to its own dequantized weights, not to PyTorch)."""
    rq = report.get("quant")
    if not rq:
        return []
    val, tol = rq["validation"], rq["tolerance"]
    untied = report.get("ort_target", {}).get("lm_head_untied", 0)
    exact = _worst([c["max_abs"] for c in val["accuracy_level_0"].values()])
    lines = [
        f"  --quant int{rq['bits']}: {rq['matmuls_quantized']} MatMuls -> MatMulNBits (block {rq['block_size']}, "
        f"symmetric, accuracy level {rq['accuracy_level']}); tied LM head "
        f"{'quantized (own copy)' if untied else 'float32' if rq['gemm_left_float'] else 'n/a'}, "
        "embedding float32",
        f"  quantized vs its own dequantized weights: float32 activations logits max_abs {exact:.2e} "
        f"(<= {tol['float32_activations_max_abs']:g})",
    ]
    shipped = val.get(f"accuracy_level_{rq['accuracy_level']}")
    if rq["accuracy_level"] not in (0, 1) and shipped:
        rel = _worst([c["max_rel"] for c in shipped.values()])
        top1 = min(c["top1"] for c in shipped.values())
        bound = tol["int8_activations_max_rel"]
        lines.append(f"  as shipped (int8 activations): logits max_rel {rel:.3f} (<= {bound:g}), top1 {top1:.3f}")
    lines.append(
        "  the lines below: the float32 graph before --quant; the rounding's cost: layerpair-export eval --onnx"
    )
    return lines


def _worst(values: Sequence[float | None]) -> float:
    """The largest of the measured ``values`` (None: not measured in that window), NaN if any is NaN — Python's
    ``max`` would drop a NaN that is not first; 0.0 when none was measured."""
    measured = [float(v) for v in values if v is not None]
    return math.nan if any(math.isnan(v) for v in measured) else max(measured, default=0.0)


def summary(report: dict, output: Path) -> str:
    ag = report["agreement"]
    lines = [
        f"wrote {output}/model.onnx  ({report['architecture']}, {report['num_layers']} layers -> depth "
        f"{report['depth']}, pairs {report['pairs'] or 'none'})",
        f"  onnx: opset {report['onnx']['opset']}, {report['onnx']['nodes']} nodes, "
        f"{report['onnx']['bytes'] / 1e6:.1f} MB",
    ]
    ort = report.get("ort_target")
    if ort:
        f = ort["attention_fused"]
        lines.append(
            f"  --target ort: GroupQueryAttention on {f['layers']} layers + {f['pairs']} merged pairs, "
            f"nodes {ort['nodes_before']} -> {ort['nodes_after']}; validated to max abs "
            f"{report['tolerance']['logits_max_abs']:g} (fused kernels; ONNX Runtime only)"
        )
    if report.get("merged"):
        lines.append(
            f"  merged pairs: nodes {report['nodes_before']} -> {report['nodes_after']}, "
            f"MatMuls {report['matmuls_before']} -> {report['matmuls_after']} (--no-merge keeps two branches)"
        )
    for stage, v in report.get("validation", {}).items():  # windowed validation (no whole-graph agreement)
        windows = v.get("windows", [])
        if not v.get("executed", True):
            lines.append(f"  {stage:8s} NOT EXECUTED: {v['why']}")
            continue
        worst = {k: _worst([w[k] for w in windows]) for k in ("hidden_max_abs", "cache_max_abs", "logits_max_abs")}
        lines.append(
            f"  {stage:8s} {len(windows)} windows ORT vs PyTorch: hidden max_abs {worst['hidden_max_abs']:.2e} "
            f"cache max_abs {worst['cache_max_abs']:.2e} logits max_abs {worst['logits_max_abs']:.2e}"
        )
    lines += _quant_lines(report)
    for k, a in ag.items():
        skipped = a.get("keys_not_compared", 0)
        note = f" (keys of {skipped} left-padded row-steps not compared: rotary at cache index)" if skipped else ""
        lines.append(
            f"  {k:8s} ORT vs PyTorch: logits max_abs {a['max_abs']:.2e} max_rel {a['max_rel']:.2e} "
            f"top1 {a['top1']:.3f}  cache max_abs {a['present_max_abs']:.2e}{note}"
        )
    t = report["timings_s"]
    lines.append(
        "  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()) + f"; peak RSS {report['peak_rss_mb']:.0f} MB"
    )
    lines += engine_summary_lines(report)
    lines.append(f"  report: {output}/report.json")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    handler: Callable[[Sequence[str]], int]
    if args and args[0] in VERBS:
        mod, fn = VERBS[args[0]].split(":")
        handler = getattr(importlib.import_module(mod), fn)
        args = args[1:]
    else:
        handler = run_export_cli
    try:
        return handler(args)
    except LayerpairError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted — nothing was written", file=sys.stderr)
        return 130


def dump_json(obj: object) -> str:
    return json.dumps(obj, indent=2)


if __name__ == "__main__":
    sys.exit(main())
