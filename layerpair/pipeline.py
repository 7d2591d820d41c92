"""The export job: the stages of every subpackage composed in order, each returning its report section.

    open checkpoint -> reference Decoder (pairs; or --pairs auto / --heal) -> typed copy (--dtype)
      -> ONNX (exporter) -> validate -> merge pairs (graph_passes) -> validate merged -> engine (engine/)

Lives above the stage packages (exporter, graph_passes, engine, evaluation): it may import any of them and none
of them imports it. Every stage runs under a ``Meter`` that records its wall time and its peak resident memory
into ``report.json`` (``timings_s``, ``peak_rss_mb_by_stage``); everything is written to a temporary sibling of
the output directory and renamed into place only when every stage passed.
"""

from __future__ import annotations

import json
import platform
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from layerpair.errors import InputError, ValidationError
from layerpair.exporter.loading import Checkpoint, load_checkpoint
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import DEFAULT_OPSET, build_model, save_model
from layerpair.exporter.pairs import Pairs
from layerpair.exporter.precision import record_unmerged
from layerpair.exporter.validate import (
    VALIDATION_TEXT,
    Agreement,
    Graph,
    OrtRunner,
    RecordedRunner,
    TorchRunner,
    compare_runners,
    record_reference,
    validation_tokens,
    within_tolerance,
)
from layerpair.exporter.windowed import validate_windowed
from layerpair.graph_passes.merge import merge_pairs, merge_report
from layerpair.iospec import IOSpec
from layerpair.meter import Meter, counter_progress, return_freed_memory
from layerpair.outdir import staged_output

DEFAULT_ATOL = 1e-4
EXPORT_FIX = "nothing was written; report this model and flags as a bug (or raise --atol if justified)"
MERGED_FIX = "nothing was written; export with --no-merge and report this model and flags as a bug"
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
    external_data: bool | None = None  # None/True: model.onnx.data; False: one file (< 2 GB)
    atol: float = DEFAULT_ATOL
    merge: bool = True  # --no-merge keeps each pair as two branches (layerpair/graph_passes)
    extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"  # graph dtype (--dtype), see layerpair/exporter/precision.py
    engine: Any = None  # layerpair.engine.stage.EngineOptions with --trt
    # --pairs auto / --heal: checkpoint -> (Decoder to export, report entries); see layerpair/evaluation/selection.py
    decoder_for: Any = None
    validation: str = "auto"  # "whole" | "windowed" | "auto" (whole when it fits in memory)
    window_gb: float = 1.0  # windowed validation: fp32 weight bytes per window (at least one block)
    target: str = "portable"  # "ort": ONNX Runtime's fused contrib ops (graph_passes/ort_target.py)
    ort_rotary: str = "auto"  # --target ort: "gqa"/"auto" rotate inside GroupQueryAttention (cache-index positions)
    quant: str | None = None  # --quant int4|int8: MatMulNBits weights (--target ort; graph_passes/quantize.py)
    quant_block: int = 32
    quant_accuracy: int = 4  # MatMulNBits accuracy_level: 4 = int8 activations (the genai builder's CPU default)
    quant_head: bool = True  # a tied LM head is quantized too (its own transposed copy), as the genai builder does


def versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def format_agreement(res: dict[str, Agreement]) -> str:
    return "  ".join(f"{k}: max_abs {a.max_abs:.2e} top1 {a.top1:.3f}" for k, a in res.items())


def reference_decoder(
    ckpt: Checkpoint, opts: ExportOptions, pairs_for: Callable[[int], Pairs], say: Progress
) -> Decoder:
    """The fp32 PyTorch pair-parallel model every graph is validated against (chosen/healed with --pairs auto)."""
    if opts.decoder_for is not None:  # chosen (and healed) on calibration text; validated like any other
        dec, chosen = opts.decoder_for(ckpt)
        opts.extra.update(chosen)
        return dec
    pairs = pairs_for(ckpt.arch.num_layers)
    return ckpt.decoder(pairs, counter_progress(say, "reading weights"))


def onnx_file_facts(path: Path, opset: int, op_types: list[str]) -> dict[str, Any]:
    """The report's ``onnx`` section for a written ``path`` (and its ``.data`` file, if any)."""
    data = path.with_name(path.name + ".data")
    return {
        "file": path.name,
        "external_data": data.name if data.exists() else None,
        "opset": opset,
        "nodes": len(op_types),
        "matmuls": op_types.count("MatMul"),
        "bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
    }


@dataclass
class _Validator:
    """ONNX Runtime on a graph against the recorded fp32 PyTorch reference; ValidationError above tolerance."""

    typed: Any  # exporter.precision.TypedExport
    reference: RecordedRunner
    ref_spec: IOSpec
    tokenizer: Any
    opts: ExportOptions
    say: Progress

    def __call__(
        self, graph: Graph, spec: IOSpec, what: str, fix: str, atol: float | None = None
    ) -> dict[str, Agreement]:
        """``atol``: the fp32 bound, ``--atol`` unless given (the shipped ``--target ort`` graph: ``target_atol``)."""
        from layerpair.exporter.precision import tolerance_failures

        agreement = self.typed.agreement(graph, spec, self.reference, self.ref_spec, self.tokenizer, self.say)
        self.say(format_agreement(agreement))
        bound = self.opts.atol if atol is None else atol
        bad = tolerance_failures(agreement, self.opts.dtype, bound, self.reference.cache_max())
        if bad:
            raise ValidationError(f"{what} disagrees with PyTorch: " + "; ".join(bad), fix)
        return agreement


def run_export(
    opts: ExportOptions, pairs_for: Callable[[int], Pairs], progress: Progress = stderr_progress
) -> dict[str, Any]:
    """Open, choose the validation mode, then run the stages; write ``opts.output`` atomically. Returns the report."""
    meter = Meter(progress)
    with staged_output(opts.output, opts.force) as tmp:
        with meter("open"):
            progress(f"opening {opts.model}")
            ckpt = load_checkpoint(opts.model, progress)
        mode, why = validation_mode(opts, ckpt.arch)
        progress(f"validation: {mode} graph ({why})")
        stages = _windowed_stages if mode == "windowed" else _whole_stages
        report = stages(opts, ckpt, pairs_for, tmp, meter, progress)
        report["validation_mode"] = {"mode": mode, "why": why}
        report.update(meter.to_json())
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def validation_mode(opts: ExportOptions, arch: Any) -> tuple[str, str]:
    """ "whole" when the fp32 PyTorch model and an ONNX Runtime session of it fit in memory one after the other
    (peak ~1.3x the fp32 weight bytes + ~1 GB; ~2.8x with --dtype fp16/bf16: ONNX Runtime's CPU provider keeps fp32
    copies of 16-bit weights next to the typed model — Llama-3.2-1B fp16 peaked at 13.2 GB, 2.8x), else
    "windowed"; ``--validation`` overrides."""
    need = (1.3 if opts.dtype == "float32" else 2.8) * 4 * arch.num_parameters() + 2**30
    avail = available_memory()
    if opts.validation != "auto":
        return opts.validation, "--validation " + opts.validation
    if opts.decoder_for is not None:
        return "whole", "--pairs auto / --heal evaluate the whole model in PyTorch"
    if need <= avail:
        return "whole", f"needs ~{need / 2**30:.1f} GiB of {avail / 2**30:.1f} GiB available"
    return "windowed", f"the whole graph needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"


def available_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _whole_stages(
    opts: ExportOptions,
    ckpt: Checkpoint,
    pairs_for: Callable[[int], Pairs],
    tmp: Path,
    meter: Meter,
    progress: Progress,
) -> dict[str, Any]:
    """The fp32 PyTorch model in memory, recorded once; ONNX Runtime on the whole graph against that recording.

    With pairs to merge, the unmerged graph is validated in memory on the Decoder's own tensors (it is never
    shipped, so never written) while the merged graph is written once; the written file is validated after the
    PyTorch model is freed, so no two copies of the weights are ever resident."""
    validate, exported, kept = _load_and_record(opts, ckpt, pairs_for, meter, progress)
    return_freed_memory()  # --dtype: the fp32 Decoder, recorded, is gone
    typed, pairs = validate.typed, exported.pairs
    spec, typed_check = typed.spec, None  # spec: I/O of OUT/model.onnx
    merge_info: dict[str, Any] = {"merged": False}
    if pairs and opts.merge:  # graph passes: each pair becomes one wide layer (layerpair/graph_passes)
        spec, onnx_info, merge_info, typed_check = _merge_stages(exported, ckpt, spec, validate, tmp, meter)
    else:
        with meter("export"):
            model, spec = for_target(build_model(exported, opts.opset), spec, opts, merge_info, progress)
            onnx_info = write_onnx(model, tmp / "model.onnx", opts, pairs, progress)
    del exported  # the session below maps the written weights: never next to a PyTorch copy (unless ``kept``)
    typed.decoder = None if kept is None else typed.decoder
    return_freed_memory()
    merged = bool(merge_info["merged"])
    with meter("validate_merged" if merged else "validate"):
        progress(f"validating the written {'merged ' if merged else ''}ONNX against PyTorch")
        what, fix = ("merged ONNX", MERGED_FIX) if merged else ("ONNX Runtime", EXPORT_FIX)
        agreement = validate(tmp / "model.onnx", spec, what, fix, target_atol(opts))
        if typed_check is not None:  # 16-bit: a second session on the file, after the first one is gone
            return_freed_memory()
            merge_info.update(typed_check.compare(tmp / "model.onnx", spec, progress))
    if opts.quant is not None:  # the file just validated at float32 is the one quantized
        with meter("quantize"):
            merge_info["quant"], onnx_info = quantize_written(tmp / "model.onnx", spec, opts, ckpt, progress)
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    merge_info["reference_repeat"] = validate.reference.repeat  # the reference against a rerun of itself
    report = _report(opts, ckpt, pairs, typed, onnx_info, spec, agreement, merge_info)
    if opts.engine is not None:  # after the ONNX (and merge) stages: builds from whatever model.onnx is now
        from layerpair.engine.stage import engine_from_onnx_dir

        with meter("engine"):
            report["engine"] = engine_from_onnx_dir(tmp, spec, opts.engine, progress, kept, ckpt.tokenizer)
    return report


def _load_and_record(
    opts: ExportOptions, ckpt: Checkpoint, pairs_for: Callable[[int], Pairs], meter: Meter, progress: Progress
) -> tuple[_Validator, Decoder, Decoder | None]:
    """Load the fp32 reference Decoder, type it (--dtype), record its outputs once. Returns the validator (holding
    the recording), the Decoder to export, and the fp32 Decoder where a later stage still runs it (``--trt``'s
    GPU checks, bf16 validation) — else None: with ``--dtype`` the fp32 copy is freed here."""
    from layerpair.exporter.precision import typed_export

    with meter("load"):
        dec32 = reference_decoder(ckpt, opts, pairs_for, progress)
        typed = typed_export(dec32, opts.dtype, ckpt.tokenizer, progress)  # --dtype: exporter/precision.py
    with meter("reference"):  # PyTorch runs once; every graph below is compared with this recording
        progress("running the PyTorch reference (prefill, decode, chunked prompt, padded batch)")
        reference = record_reference(TorchRunner(dec32), dec32.io, ckpt.tokenizer, progress, check_repeat=True)
    keep = opts.engine is not None or opts.dtype == "bfloat16"
    validate = _Validator(typed, reference, dec32.io, ckpt.tokenizer, opts, progress)
    return validate, typed.decoder or dec32, dec32 if keep else None


def _merge_stages(
    dec: Decoder, ckpt: Checkpoint, spec: IOSpec, validate: _Validator, tmp: Path, meter: Meter
) -> tuple[IOSpec, dict[str, Any], dict[str, Any], Any]:
    """Merge the pairs in memory and write the merged graph while the unmerged one is validated in memory.

    The unmerged graph is never shipped, so never written: ONNX Runtime runs it on the Decoder's own tensors
    (validate.ort_session). Writing is mostly disk time and validating CPU time, so the two overlap (a thread
    writes; ``with ThreadPoolExecutor`` waits for it even when the validation fails, before the output is removed).
    Returns the merged spec, the ``onnx`` report section, the merge's report entries and the 16-bit merge check
    (run on the written file)."""
    opts, say, pairs = validate.opts, validate.say, dec.pairs
    with meter("merge"):
        graph = build_model(dec, opts.opset)
        merged, merged_spec, merge_info = merge_in_memory(graph, ckpt.arch, pairs, spec.dtype, say)
        merged, merged_spec = for_target(merged, merged_spec, opts, merge_info, say)
    unmerged = build_model(dec, opts.opset)

    def write() -> dict[str, Any]:
        with meter("export"):
            return write_onnx(merged, tmp / "model.onnx", opts, pairs, say)

    with ThreadPoolExecutor(1, thread_name_prefix="layerpair-write") as pool:
        written = pool.submit(write)
        with meter("validate"):
            say("validating the unmerged graph in memory (on the PyTorch tensors) while the merged one is written")
            agreement = validate(unmerged, spec, "ONNX Runtime", EXPORT_FIX)
            ref, n = validate.reference, ckpt.arch.num_parameters()  # 16-bit: the merged graph is held to this
            typed_check = record_unmerged(unmerged, spec, n, ref, validate.ref_spec, validate.tokenizer, say)
        onnx_info = written.result()
    merge_info["agreement_unmerged"] = {k: a.to_json() for k, a in agreement.items()}
    return merged_spec, onnx_info, merge_info, typed_check


def _windowed_stages(
    opts: ExportOptions,
    ckpt: Checkpoint,
    pairs_for: Callable[[int], Pairs],
    tmp: Path,
    meter: Meter,
    progress: Progress,
) -> dict[str, Any]:
    """No whole PyTorch model: the graph is written straight from the checkpoint and validated window by window
    (exporter/windowed.py) against PyTorch blocks read for that window only."""
    from layerpair.exporter.precision import DTYPE_TOLERANCE, TORCH_DTYPES

    if opts.target == "ort":
        raise InputError(
            "--target ort is validated on the whole graph only, and this model needs windowed validation",
            "export the portable graph (drop --target ort), or free memory for --validation whole",
        )
    if opts.decoder_for is not None or ckpt.weights is None:
        raise InputError("--validation windowed needs a checkpoint read tensor by tensor, without --pairs auto/--heal",
                         "use a safetensors checkpoint directory and explicit --pairs")  # fmt: skip
    pairs = pairs_for(ckpt.arch.num_layers)
    ref = Decoder.skeleton(ckpt.arch, pairs)  # fp32 reference, shapes only
    typed = ref if opts.dtype == "float32" else Decoder.skeleton(ckpt.arch, pairs).to(TORCH_DTYPES[opts.dtype])
    typed.inv_freq = ref.inv_freq  # .to() casts buffers too; rotary stays fp32 (as typed_decoder does)
    with meter("export"):  # pairs merged in memory, before anything is written: the model is written once
        spec, onnx_info, merge_info = _write_merged(typed, tmp / "model.onnx", opts, ckpt.weights, progress)
    tokens = validation_tokens(ckpt.tokenizer, VALIDATION_TEXT, 23, ckpt.arch.vocab_size, 0)
    tol = DTYPE_TOLERANCE.get(opts.dtype, opts.atol)
    budget = int(opts.window_gb * 2**30)
    source = ref.weight_source(ckpt.weights)
    stage = "merged" if merge_info["merged"] else "unmerged"
    if spec.dtype == "bfloat16":  # ONNX Runtime's CPU provider has no bf16 kernels
        progress("bf16: the graph was NOT executed (ONNX Runtime CPU has no bf16 kernels); validate it on a GPU")
        report_v = {stage: {"mode": "windowed", "executed": False, "why": "ONNX Runtime CPU has no bf16 kernels"}}
    else:
        with meter("validate_merged" if stage == "merged" else "validate"):
            v = validate_windowed(tmp / "model.onnx", spec, ref, source, tokens, tol, budget, progress)
        report_v = {stage: v}
    if ckpt.tokenizer is not None:
        ckpt.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    report = _report(opts, ckpt, pairs, None, onnx_info, spec, {}, merge_info)
    report["validation"] = report_v
    return report


def _write_merged(
    dec: Decoder, path: Path, opts: ExportOptions, weights: Any, progress: Progress
) -> tuple[IOSpec, dict[str, Any], dict[str, Any]]:
    """Build the graph from the checkpoint, merge its pairs in memory (weights still lazy), write it once.

    The unmerged graph is never written in this mode (it would cost a second copy of the model on disk); its
    windows are not validated separately — the merged graph, the one shipped, is (``--no-merge`` checks the
    unmerged one)."""
    model = build_model(dec, opts.opset, dec.weight_source(weights))
    spec = IOSpec.for_model(dec.arch, dec.pairs, dtype=opts.dtype)
    merge_info: dict[str, Any] = {"merged": False}
    if dec.pairs and opts.merge:
        model, spec, merge_info = merge_in_memory(model, dec.arch, dec.pairs, opts.dtype, progress)
    return spec, write_onnx(model, path, opts, dec.pairs, progress), merge_info


def target_atol(opts: ExportOptions) -> float:
    """The fp32 bound the shipped graph is held to: ``--atol``, or for ``--target ort`` at least
    ``ORT_TARGET_ATOL`` (its fused kernels sum in another order; see graph_passes/ort_target.py)."""
    if opts.target != "ort":
        return opts.atol
    from layerpair.graph_passes.ort_target import ORT_TARGET_ATOL

    return max(opts.atol, ORT_TARGET_ATOL)


def quantize_written(
    path: Path, spec: IOSpec, opts: ExportOptions, ckpt: Checkpoint, say: Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--quant``: the validated float32 graph at ``path`` rewritten in place with MatMulNBits weights
    (graph_passes/quantize.py), then validated against the same graph on its own dequantized weights: exactly with
    float32 activations (``target_atol``), and as shipped (accuracy level 4, int8 activations) normwise within
    ``ACTIVATION_INT8_REL``. What the rounding itself costs is measured by ``layerpair-export eval --onnx``.
    Returns the report's ``quant`` section and the new ``onnx`` section."""
    from layerpair.graph_passes.quantize import ACTIVATION_INT8_REL, BITS, dequantized, quantize, with_accuracy_level

    say(f"--quant {opts.quant}: MatMul weights -> MatMulNBits (blocks of {opts.quant_block}, symmetric, "
        f"accuracy level {opts.quant_accuracy}; ONNX Runtime's quantizer)")  # fmt: skip
    model, facts = quantize(ir.load(str(path)), BITS[str(opts.quant)], opts.quant_block, opts.quant_accuracy)
    ref = OrtRunner(dequantized(model), spec)
    checks: dict[str, Any] = {}
    for level in sorted({0, opts.quant_accuracy}):
        agreement = compare_runners(OrtRunner(with_accuracy_level(model, level), spec), spec, ref, spec, ckpt.tokenizer)
        say(f"accuracy level {level} vs its dequantized weights:\n" + format_agreement(agreement))
        exact = level in (0, 1)
        bad = within_tolerance(agreement, target_atol(opts)) if exact else _normwise(agreement, ACTIVATION_INT8_REL)
        checks[f"accuracy_level_{level}"] = {k: a.to_json() for k, a in agreement.items()}
        if bad:
            raise ValidationError(f"the {opts.quant} graph at accuracy level {level} disagrees with its own "
                                  "dequantized weights: " + "; ".join(bad), "report this with report.json")  # fmt: skip
    with_accuracy_level(model, opts.quant_accuracy)
    del ref
    path.unlink()
    path.with_name(path.name + ".data").unlink(missing_ok=True)
    pairs = tuple((s.layers[0], s.layers[1]) for s in spec.slots if len(s.layers) == 2)
    onnx_info = write_onnx(model, path, opts, pairs, say)
    bounds = {"float32_activations_max_abs": target_atol(opts), "int8_activations_max_rel": ACTIVATION_INT8_REL}
    return {**facts, "tolerance": bounds, "validation": checks}, onnx_info


def _normwise(agreement: dict[str, Agreement], rel: float) -> list[str]:
    """Failing cases: logits max_rel, or KV cache max_abs over the reference's scale, above ``rel`` (NaN fails)."""
    bad = []
    for name, a in agreement.items():
        if not a.max_rel <= rel:
            bad.append(f"{name}: logits max_rel {a.max_rel:.3g} > {rel:g}")
    return bad


def for_target(
    model: ir.Model, spec: IOSpec, opts: ExportOptions, info: dict[str, Any], say: Progress
) -> tuple[ir.Model, IOSpec]:
    """``--target ort``: ``model`` rewritten with ONNX Runtime's fused ops (report section ``ort_target`` added to
    ``info``) and its spec (``rotary_positions``); the portable target returns both as they are."""
    if opts.target != "ort":
        return model, spec
    from layerpair.graph_passes.ort_target import to_ort

    say("--target ort: fusing attention (GroupQueryAttention), rotary and norms into ONNX Runtime contrib ops")
    # a tied head gets its own MatMul (which --quant then quantizes) unless --quant-fp32-head keeps the fp32 Gemm
    model, rep = to_ort(model, spec, opts.ort_rotary, untie=opts.quant is None or opts.quant_head)
    fused, rot = rep["attention_fused"], rep["rotary"]
    how = (
        " (GroupQueryAttention rotates packed QKV; --ort-rotary separate honours position_ids as given)"
        if rot["positions"] == "cache_index"
        else f" (RotaryEmbedding ops: {rot.get('why_separate', '')})"
    )
    say(f"fused {fused['layers']} layers and {fused['pairs']} merged pairs; nodes {rep['nodes_before']} -> "
        f"{rep['nodes_after']}; rotary at {rot['positions']}{how}")  # fmt: skip
    info["ort_target"] = rep
    return model, replace(spec, rotary_positions=rot["positions"])


def merge_in_memory(
    model: ir.Model, arch: Any, pairs: Pairs, dtype: str, progress: Progress
) -> tuple[ir.Model, IOSpec, dict[str, Any]]:
    """graph_passes on ``model`` (weights stay lazy: merged tensors are built one at a time when written)."""
    progress("merging each pair into one wide layer in memory (graph passes), before writing")
    model, rep = merge_pairs(model, arch, pairs)
    return model, IOSpec.for_model(arch, pairs, merged=True, dtype=dtype), merge_report(rep)


def write_onnx(model: ir.Model, path: Path, opts: ExportOptions, pairs: Pairs, progress: Progress) -> dict[str, Any]:
    """Write ``model`` (weights tensor by tensor, see exporter/onnx_export.py); the report's ``onnx`` section."""
    progress(f"writing ONNX (opset {opts.opset}, pairs {list(map(list, pairs)) or 'none'})")
    save_model(model, path, opts.external_data is not False, counter_progress(progress, "writing weights"))
    return onnx_file_facts(path, opts.opset, [n.op_type for n in model.graph])


def _report(
    opts: ExportOptions,
    ckpt: Checkpoint,
    pairs: Pairs,
    typed: Any,
    onnx_info: dict[str, Any],
    spec: IOSpec,
    agreement: dict[str, Agreement],
    merge_info: dict[str, Any],
) -> dict[str, Any]:
    from layerpair.exporter.precision import tolerance_json

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
        "target": opts.target,
        "onnx": onnx_info,
        "io": spec.to_json(),
        "tolerance": tolerance_json(opts.dtype, target_atol(opts)),
        "agreement": {k: a.to_json() for k, a in agreement.items()},
        "versions": versions(),
        **merge_info,
        **opts.extra,
    }
    if opts.dtype != "float32" and typed is not None:
        report["overflow_scan"] = typed.overflow.to_json()
        report["validated_by"] = typed.validated_by
    return report
