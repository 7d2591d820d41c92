"""The ``--trt`` stage: ``engine_from_onnx_dir`` turns the export directory's model.onnx into model.plan.

Runs after the ONNX stage (and after the merge stage, whatever ``model.onnx`` is by then: ``spec`` must be
the I/O spec of that file). Without a GPU the engine is still built (TensorRT-RTX compiles ahead of time on
the CPU) and the report says, in ``engine.gpu``, what was not run and why; it never carries a figure that
was not measured. On a GPU the engine is checked against ONNX Runtime and PyTorch (``gpu_checks``) and a missed
threshold (``engine/gpu.py``'s ``ENGINE_THRESHOLDS``) fails the command like any validation: exit 3.

Pipeline contract::

    backend = preflight(opts.trt_backend)          # in the CLI, before any export work: fails in ms
    ...                                            # load, export, validate, merge
    report["engine"] = engine_from_onnx_dir(tmp, spec, EngineOptions(...), progress, dec32, tokenizer)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerpair.engine.backend import Backend, load_backend, resolve_backend
from layerpair.engine.build import engine_from_onnx, gpu_status
from layerpair.engine.profile import EngineLimits, ProfileSpec, profiles_from_limits
from layerpair.errors import ValidationError
from layerpair.iospec import IOSpec

PLAN_FILE = "model.plan"


@dataclass
class EngineOptions:
    backend: str = "auto"  # --trt-backend
    limits: EngineLimits = field(default_factory=EngineLimits)
    gpu_checks: bool = True  # run engine-vs-ORT/PyTorch where a GPU exists
    n_tokens: int = 64  # greedy tokens for the engine-vs-PyTorch generation check


def preflight(backend: str = "auto") -> str:
    """Cheap (find_spec only) check for ``--trt``; raises MissingDependencyError naming the packages."""
    return resolve_backend(backend)


def engine_from_onnx_dir(
    out_dir: Path,
    spec: IOSpec,
    opts: EngineOptions,
    progress: Callable[[str], None],
    dec32: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Build ``out_dir/model.plan`` from ``out_dir/model.onnx``; return the report's ``engine`` section."""
    backend = load_backend(resolve_backend(opts.backend))
    profiles = profiles_from_limits(opts.limits)
    lim = opts.limits
    progress(
        f"building {backend.name} {backend.version} engine ({spec.dtype}, strongly typed; max batch {lim.max_batch}, "
        f"max seq {lim.max_seq}, max context {lim.max_context}; profiles {', '.join(p.name for p in profiles)})"
    )
    build = engine_from_onnx(out_dir / "model.onnx", spec, out_dir / PLAN_FILE, profiles, backend, lim.to_json())
    progress(f"engine: {build.engine_bytes / 1e6:.0f} MB in {build.build_s:.1f} s; I/O bindings match the I/O spec")
    section: dict[str, Any] = build.to_json()
    usable, why = gpu_status()
    if not usable:
        section["gpu"] = {"ran": False, "reason": why}
        progress(f"engine NOT run: {why}; built ahead of time, validation and throughput need an NVIDIA GPU")
        return section
    if not opts.gpu_checks or dec32 is None:
        section["gpu"] = {"ran": False, "reason": "GPU checks disabled by the caller"}
        return section
    section["gpu"] = gpu_checks(out_dir, spec, profiles, backend, opts, dec32, tokenizer, progress)
    return section


def gpu_checks(
    out_dir: Path,
    spec: IOSpec,
    profiles: list[ProfileSpec],
    backend: Backend,
    opts: EngineOptions,
    dec32: Any,
    tokenizer: Any,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Engine vs ONNX Runtime and vs the fp32 PyTorch model, held to ``gpu.ENGINE_THRESHOLDS``: the report's
    ``engine.gpu``, or ValidationError (exit 3, nothing written) naming every threshold missed."""
    from layerpair.engine.gpu import ENGINE_THRESHOLDS, TrtStepRunner, engine_failures, engine_vs_ort, engine_vs_torch
    from layerpair.exporter.validate import VALIDATION_TEXT, validation_tokens

    t = ENGINE_THRESHOLDS[spec.dtype]
    progress("GPU: engine vs ONNX Runtime (per output) and vs the original PyTorch model")
    runner = TrtStepRunner(out_dir / PLAN_FILE, spec, profiles, backend)
    try:
        prompt = validation_tokens(tokenizer, VALIDATION_TEXT, 16, spec.arch.vocab_size, 0)
        gpu: dict[str, Any] = {
            "ran": True,
            "thresholds": t.to_json(),
            "vs_onnxruntime": engine_vs_ort(
                out_dir / PLAN_FILE, out_dir / "model.onnx", spec, profiles, backend, atol=t.ort_atol, rtol=t.ort_rtol
            ),
            "vs_pytorch": engine_vs_torch(runner, spec, dec32, prompt, tokenizer, opts.n_tokens),
        }
    finally:
        runner.close()
    g = gpu["vs_pytorch"]["generation"]
    progress(
        f"engine vs PyTorch over {g['tokens']} greedy tokens: top1 {g['teacher_forced_top1']:.3f}, "
        f"mean KL {g['mean_kl']:.2e}, logits max_abs {g['logits_max_abs']:.2e}"
    )
    bad = engine_failures(gpu, spec.dtype)
    if bad:
        raise ValidationError(
            f"the {spec.dtype} engine misses its thresholds: " + "; ".join(bad),
            "nothing was written; the thresholds are ENGINE_THRESHOLDS in layerpair/engine/gpu.py — report the "
            "model, flags and GPU",
        )
    gpu["passed"] = True
    return gpu
