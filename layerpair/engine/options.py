"""The export CLI's engine flags (``--trt``, ``--trt-backend``, ``--max-*``, ``--dtype``), kept here so that
layerpair/cli.py only calls three functions. Imports nothing heavy: ``preflight_from_argv`` must answer in
milliseconds, before the export parser (which imports torch) is even built."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from layerpair.engine.backend import BACKEND_CHOICES, resolve_backend
from layerpair.engine.profile import DEFAULT_MAX_BATCH, DEFAULT_MAX_CONTEXT, DEFAULT_MAX_SEQ, EngineLimits
from layerpair.engine.stage import EngineOptions
from layerpair.errors import InputError

DTYPE_FLAGS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
#: ``--target``: ``portable`` (standard ONNX ops; TensorRT parses it) or ``ort`` (ONNX Runtime's fused contrib ops,
#: layerpair/graph_passes/ort_target.py).
TARGETS = ("portable", "ort")
#: ``--ort-rotary``: "gqa" (GroupQueryAttention rotates packed QKV, at cache-index positions; by default where it
#: can) or "separate" (RotaryEmbedding before it, position_ids as given). See graph_passes/gqa_packed_rotary.py.
ORT_ROTARY = ("gqa", "separate")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=list(DTYPE_FLAGS),
        default="fp32",
        help="precision of the exported graph (and engine); norms and softmax stay fp32 (default fp32)",
    )
    g = p.add_argument_group("TensorRT engine")
    g.add_argument("--trt", action="store_true", help="also build OUT/model.plan with TensorRT (strongly typed)")
    g.add_argument("--trt-backend", choices=BACKEND_CHOICES, default="auto", help="which TensorRT (default auto)")
    g.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help=f"engine max batch ({DEFAULT_MAX_BATCH})")
    g.add_argument("--max-seq", type=int, default=DEFAULT_MAX_SEQ, help=f"engine max prompt chunk ({DEFAULT_MAX_SEQ})")
    g.add_argument(
        "--max-context",
        type=int,
        default=DEFAULT_MAX_CONTEXT,
        help=f"engine max past+new tokens ({DEFAULT_MAX_CONTEXT})",
    )


def preflight_from_argv(argv: Sequence[str]) -> None:
    """With ``--trt``: fail now (one line naming the packages) if no TensorRT backend is installed, and check
    the engine limits, so that neither costs a model load. Unknown words are left to the real parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--trt", action="store_true")
    pre.add_argument("--trt-backend", default="auto")
    pre.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    pre.add_argument("--max-seq", type=int, default=DEFAULT_MAX_SEQ)
    pre.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT)
    pre.add_argument("--target", default="portable")
    pre.add_argument("--dtype", default="fp32")
    try:
        args, _ = pre.parse_known_args(list(argv))
    except SystemExit:  # malformed value: the real parser reports it properly
        return
    check_target(args.target, args.trt, args.dtype)
    if args.trt:
        resolve_backend(args.trt_backend)
        EngineLimits(args.max_batch, args.max_seq, args.max_context).check()


def check_target(target: str, trt: bool, dtype: str, ort_rotary: str | None = None) -> None:
    """``--target ort`` is an ONNX Runtime graph (contrib ops TensorRT cannot parse), fp32 only for now;
    ``--ort-rotary`` belongs to it."""
    if target != "ort":
        if ort_rotary is not None:
            raise InputError(
                f"--ort-rotary {ort_rotary} only applies to --target ort", "add --target ort, or drop --ort-rotary"
            )
        return
    if trt:
        raise InputError(
            "--target ort cannot be combined with --trt: its contrib ops (GroupQueryAttention, ...) run on ONNX "
            "Runtime only",
            "drop --target ort for a TensorRT engine (the default portable graph), or drop --trt",
        )
    if dtype != "fp32":
        raise InputError(
            f"--target ort supports --dtype fp32 only, got --dtype {dtype}",
            "drop --dtype, or export the portable graph (drop --target ort)",
        )


def engine_options_from_args(args: argparse.Namespace) -> tuple[str, EngineOptions | None]:
    """(I/O spec dtype, engine options or None without ``--trt``)."""
    dtype = DTYPE_FLAGS[args.dtype]
    if not args.trt:
        return dtype, None
    limits = EngineLimits(args.max_batch, args.max_seq, args.max_context)
    limits.check()
    return dtype, EngineOptions(backend=args.trt_backend, limits=limits)


def engine_summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    scan = report.get("overflow_scan")
    if scan:
        n = len(scan["findings"])
        lines.append(
            f"  {report.get('dtype')}: overflow scan {'clean' if not n else f'{n} findings (see report)'}; "
            f"max |w| {scan['weight_max_abs']:.3g}, max |activation| {scan['activation_max_abs']:.3g}"
        )
    e = report.get("engine")
    if e:
        lines.append(
            f"  engine: {e['plan']} ({e['backend']['name']} {e['backend']['version']}, {e['dtype']}), "
            f"{e['engine_bytes'] / 1e6:.0f} MB, built in {e['build_s']:.1f} s, bindings match the I/O spec"
        )
        gpu = e.get("gpu", {})
        if gpu.get("ran"):
            g = gpu["vs_pytorch"]["generation"]
            lines.append(
                f"  engine vs PyTorch: top1 {g['teacher_forced_top1']:.3f} over {g['tokens']} greedy tokens, "
                f"mean KL {g['mean_kl']:.2e}"
            )
        else:
            lines.append(f"  engine NOT run: {gpu.get('reason', 'unknown')} — no GPU validation or throughput")
    return lines
