"""The export job as composable stages (``<Output>From<Input>``), and ``run_export`` that chains them.

    checkpoint_from_source -> decoder_from_checkpoint -> onnx_from_decoder -> validation (engine/dtype.py)

Later stages (graph passes, engines, Triton) take the export directory and its report and add to them.
"""

from __future__ import annotations

import gc
import json
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerpair.errors import ValidationError
from layerpair.exporter.loading import Checkpoint, load_checkpoint
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import DEFAULT_OPSET, export_onnx
from layerpair.exporter.pairs import Pairs
from layerpair.exporter.validate import Agreement
from layerpair.iospec import IOSpec
from layerpair.outdir import staged_output

DEFAULT_ATOL = 1e-4
Progress = Callable[[str], None]


def stderr_progress(msg: str) -> None:
    print(f"[layerpair] {msg}", file=sys.stderr, flush=True)


@dataclass
class ExportOptions:
    model: str
    pairs_spec: str = "none"
    output: Path = Path("out")
    force: bool = False
    opset: int = DEFAULT_OPSET
    external_data: bool | None = None
    atol: float = DEFAULT_ATOL
    merge: bool = True  # --no-merge keeps each pair as two branches (layerpair/graph_passes)
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # graph dtype (--dtype), see layerpair/engine/dtype.py
    engine: Any = None  # layerpair.engine.stage.EngineOptions with --trt
    # --pairs auto / --heal: checkpoint -> (Decoder to export, report entries); see layerpair/evaluation/selection.py
    decoder_for: Any = None


def checkpoint_from_source(name: str, progress: Progress) -> Checkpoint:
    return load_checkpoint(name, progress)


def decoder_from_checkpoint(ckpt: Checkpoint, pairs: Pairs) -> Decoder:
    return Decoder.from_hf(ckpt.model, ckpt.arch, pairs)


def onnx_from_decoder(dec: Decoder, path: Path, opset: int, external_data: bool | None) -> dict[str, Any]:
    proto = export_onnx(dec, path, opset=opset, external_data=external_data)
    data = path.with_name(path.name + ".data")
    return {
        "file": path.name,
        "external_data": data.name if data.exists() else None,
        "opset": opset,
        "nodes": len(proto.graph.node),
        "matmuls": sum(n.op_type == "MatMul" for n in proto.graph.node),
        "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
    }


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_agreement(res: dict[str, Agreement]) -> str:
    return "  ".join(f"{k}: max_abs {a.max_abs:.2e} top1 {a.top1:.3f}" for k, a in res.items())


def run_export(
    opts: ExportOptions, pairs_for: Callable[[int], Pairs], progress: Progress = stderr_progress
) -> dict[str, Any]:
    """Load, apply pairs, export, validate; write ``opts.output`` atomically. Returns the report."""
    timings: dict[str, float] = {}
    with staged_output(opts.output, opts.force) as tmp:
        t = time.perf_counter()
        progress(f"loading {opts.model}")
        ckpt = checkpoint_from_source(opts.model, progress)
        if opts.decoder_for is not None:  # chosen (and healed) on calibration text; validated like any other
            dec, chosen = opts.decoder_for(ckpt)
            pairs = dec.pairs
            opts.extra.update(chosen)
        else:
            pairs = pairs_for(ckpt.arch.num_layers)
            dec = decoder_from_checkpoint(ckpt, pairs)
        # The Decoder holds its own copy of the weights; drop transformers' copy before export and merge, the
        # two memory peaks (SmolLM2: -540 MB).
        ckpt.model = None
        gc.collect()
        # --dtype: export a typed copy, validate it against the fp32 `dec` (engine/dtype.py).
        from layerpair.engine.dtype import tolerance_failures, tolerance_json, typed_export

        typed = typed_export(dec, opts.dtype, ckpt.tokenizer, progress)
        spec = typed.spec  # I/O spec of OUT/model.onnx
        timings["load"] = time.perf_counter() - t

        t = time.perf_counter()
        progress(f"exporting ONNX (opset {opts.opset}, pairs {list(map(list, pairs)) or 'none'})")
        onnx_info = onnx_from_decoder(typed.decoder, tmp / "model.onnx", opts.opset, opts.external_data)
        timings["export"] = time.perf_counter() - t
        progress(f"exported {onnx_info['nodes']} nodes, {onnx_info['bytes'] / 1e6:.0f} MB in {timings['export']:.1f} s")

        def validated(spec: IOSpec, timing: str, what: str, fix: str) -> dict[str, Agreement]:
            """Run ORT on OUT/model.onnx against the PyTorch `dec`; raise ValidationError above tolerance."""
            t = time.perf_counter()
            agreement = typed.agreement(tmp / "model.onnx", spec, dec, ckpt.tokenizer, progress)
            timings[timing] = time.perf_counter() - t
            progress(format_agreement(agreement))
            bad = tolerance_failures(agreement, opts.dtype, opts.atol, dec, ckpt.tokenizer)
            if bad:
                raise ValidationError(f"{what} disagrees with PyTorch: " + "; ".join(bad), fix)
            return agreement

        progress("validating ONNX Runtime against PyTorch (prefill, 4 decode steps, padded batch of 2)")
        agreement = validated(
            spec,
            "validate",
            "ONNX Runtime",
            "nothing was written; report this model and flags as a bug (or raise --atol if justified)",
        )
        merge_info: dict[str, Any] = {"merged": False}
        if pairs and opts.merge:  # graph passes: each pair becomes one wide layer (layerpair/graph_passes)
            from layerpair.graph_passes.stage import merged_onnx_from_onnx

            t = time.perf_counter()
            progress("merging each pair into one wide layer (graph passes)")
            spec, merge_info = merged_onnx_from_onnx(tmp / "model.onnx", ckpt.arch, pairs, spec.dtype)
            onnx_info.update(merge_info.pop("onnx"))
            timings["merge"] = time.perf_counter() - t
            progress("validating the merged ONNX against PyTorch")
            merge_info["agreement_unmerged"] = {k: a.to_json() for k, a in agreement.items()}
            agreement = validated(
                spec,
                "validate_merged",
                "merged ONNX",
                "nothing was written; export with --no-merge and report this model and flags as a bug",
            )
        if ckpt.tokenizer is not None:
            ckpt.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        arch = ckpt.arch
        report: dict[str, Any] = {
            "model": opts.model,
            "source": {"kind": ckpt.kind, "location": ckpt.location},
            "architecture": arch.model_type,
            "num_layers": arch.num_layers,
            "pairs": [list(p) for p in pairs],
            "depth": arch.num_layers - len(pairs),
            "parameters": arch.num_parameters(),
            "dtype": opts.dtype,
            "onnx": onnx_info,
            "io": spec.to_json(),
            "tolerance": tolerance_json(opts.dtype, opts.atol),
            "agreement": {k: a.to_json() for k, a in agreement.items()},
            "versions": versions(),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            **merge_info,
            **opts.extra,
        }
        if opts.dtype != "float32":
            report["overflow_scan"] = typed.overflow.to_json()
            report["validated_by"] = typed.validated_by
        if opts.engine is not None:  # after the ONNX (and merge) stages: builds from whatever model.onnx is now
            from layerpair.engine.stage import engine_from_onnx_dir

            t = time.perf_counter()
            report["engine"] = engine_from_onnx_dir(tmp, spec, opts.engine, progress, dec, ckpt.tokenizer)
            report["timings_s"]["engine"] = round(time.perf_counter() - t, 3)
        report["peak_rss_mb"] = round(peak_rss_mb(), 1)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
