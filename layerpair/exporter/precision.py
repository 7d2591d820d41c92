"""Typed graphs are executed: the 16-bit merged graph is held to the 16-bit unmerged graph it came from.

The merged graph is validated against the fp32 PyTorch reference like every graph, but for ``--dtype fp16`` and
``bf16`` that check is normwise at 2e-2 / 8e-2 (``DTYPE_TOLERANCE`` below): wide enough for a merge bug to hide under
16-bit rounding. So the stage also compares the merged graph with the *unmerged* graph of the same dtype, on
the same validation cases (prefill, decode, chunked, padded). Both graphs round every activation the same way
except where the passes changed the arithmetic:

* ``fold_norm_scales``: ``(g * n) @ W`` becomes ``n @ (diag(g) W)``: one rounding of each folded weight to the
  dtype instead of one rounding of ``g * n`` per activation;
* ``merge_reducing_matmuls``: the order of the sum ``r + a@Wa + b@Wb`` and, with biases, ``ba + bb`` rounded
  once;
* the wide MatMuls and the attention over 2·KVH heads compute the same dot products in another layout (the
  accumulation order of a kernel may differ with the width).

Each change moves a value by about one unit roundoff ``u`` of the dtype (fp16 ``u = 2^-11 = 4.9e-4``, bf16
``2^-8 = 3.9e-3``) relative to its magnitude, a few times per pair, and the difference then passes through the
remaining layers as rounding noise does. The tolerance (``MERGE_TOLERANCE``) is ``8 u`` normwise: logits
relative to the unmerged graph's largest logit, caches relative to its largest cached value. Measured on the
tiny test models of all four families (biased Llama too): fp16 at most 7.8e-4 (1.6 u), bf16 at most 9.9e-3
(2.5 u), so 8 u leaves a 3-5x margin for deeper models. It is 5x (fp16) and 2.5x (bf16) tighter than the dtype
tolerance against fp32, and far below what a merge bug does (a wrong head order, a dropped or doubled bias or
norm scale moves activations by O(1) of their size). ``tests/exporter/test_precision.py``: one branch's
down-projection weights scaled by 1.05 in the merged fp16 graph pass the fp32-reference check (2e-2) and fail
this one.

Where each graph runs: ONNX Runtime (CPU) for fp16. ONNX Runtime's CPU provider has no bf16 kernels, so a bf16
graph runs on ONNX's reference evaluator (``onnx.reference``, numpy with ml_dtypes' bfloat16) — real bf16
arithmetic, but pure Python: only models up to ``EVALUATOR_MAX_PARAMETERS`` parameters (tiny test models).
Above that the report and console say plainly that the bf16 graph was not executed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from layerpair.errors import ValidationError
from layerpair.exporter.model import TORCH_DTYPES, Decoder
from layerpair.exporter.validate import (
    VALIDATION_TEXT,
    Agreement,
    Graph,
    OrtRunner,
    RecordedRunner,
    Runner,
    TorchRunner,
    compare_runners,
    record_reference,
    validation_tokens,
    within_tolerance,
)
from layerpair.iospec import IOSpec

# Normwise relative tolerance on logits and on the KV cache for 16-bit graphs against the fp32 reference: a 16-bit
# graph rounds every activation (fp16: unit roundoff 4.9e-4; bf16: 3.9e-3) through ~10 ops per layer.
DTYPE_TOLERANCE: dict[str, float] = {"float16": 2e-2, "bfloat16": 8e-2}


def within_dtype_tolerance(agreement: dict[str, Any], dtype: str, ref_cache_max: float, atol: float) -> list[str]:
    """Failing checks for a typed graph against the fp32 reference (empty when within tolerance)."""
    bad = []
    rel = DTYPE_TOLERANCE.get(dtype)
    for name, a in agreement.items():
        if rel is None:
            if not a.max_abs <= atol:
                bad.append(f"{name}: logits max_abs {a.max_abs:.3g} > {atol:g}")
            if not a.present_max_abs <= atol:
                bad.append(f"{name}: KV cache max_abs {a.present_max_abs:.3g} > {atol:g}")
            continue
        if not a.max_rel <= rel:
            bad.append(f"{name}: logits max_rel {a.max_rel:.3g} > {rel:g} ({dtype})")
        cache_rel = a.present_max_abs / max(ref_cache_max, 1e-30)
        if not cache_rel <= rel:
            bad.append(f"{name}: KV cache max_abs/max|ref| {cache_rel:.3g} > {rel:g} ({dtype})")
    return bad


#: Unit roundoff of each 16-bit dtype (half the gap between 1 and the next representable number).
UNIT_ROUNDOFF: dict[str, float] = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
#: Merged vs unmerged graph of the same dtype, normwise (see the module docstring): 8 unit roundoffs.
MERGE_TOLERANCE: dict[str, float] = {k: 8 * u for k, u in UNIT_ROUNDOFF.items()}
#: The reference evaluator runs every op in numpy, one Python call per node: fine for tiny models only.
EVALUATOR_MAX_PARAMETERS = 5_000_000
Progress = Callable[[str], None]


class EvaluatorRunner(Runner):
    """A graph on ``onnx.reference.ReferenceEvaluator`` behind validate.py's Runner contract (bf16 included)."""

    def __init__(self, graph: Graph, spec: IOSpec) -> None:
        from onnx.reference import ReferenceEvaluator

        # an in-memory graph is serialised with its weights: only models below EVALUATOR_MAX_PARAMETERS get here
        self.session = ReferenceEvaluator(ir.to_proto(graph) if isinstance(graph, ir.Model) else str(graph))
        self.spec = spec

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = dict(zip(self.spec.input_names, [ids, mask, pos, *past], strict=True))
        out: list[Any] = list(self.session.run(self.spec.output_names, feeds))
        return np.asarray(out[0], np.float32), [np.asarray(t) for t in out[1:]]


def graph_runner(graph: Graph, spec: IOSpec, parameters: int) -> tuple[Runner | None, str]:
    """A runner that executes ``graph`` (a file or an in-memory model) in its own dtype, and its name; (None, why)
    when none can."""
    if spec.dtype != "bfloat16":
        return OrtRunner(graph, spec, prepack=False), "onnxruntime"
    if parameters <= EVALUATOR_MAX_PARAMETERS:
        return EvaluatorRunner(graph, spec), "onnx.reference"
    why = (
        f"the bf16 ONNX graph was NOT executed: ONNX Runtime's CPU provider has no bf16 kernels and the model's "
        f"{parameters / 1e6:.0f}M parameters are beyond ONNX's reference evaluator (<= "
        f"{EVALUATOR_MAX_PARAMETERS / 1e6:.0f}M); the merge was checked by its structure only"
    )
    return None, why


def typed_failures(res: dict[str, Agreement], dtype: str, ref_cache_max: float) -> list[str]:
    """Cases where the merged graph is beyond ``MERGE_TOLERANCE[dtype]`` of the unmerged one (NaN fails)."""
    rel = MERGE_TOLERANCE[dtype]
    bad = []
    for name, a in res.items():
        if not a.max_rel <= rel:
            bad.append(f"{name}: logits max_rel {a.max_rel:.3g} > {rel:.3g} at {a.max_abs_at or 'unknown'}")
        cache_rel = a.present_max_abs / max(ref_cache_max, 1e-30)
        if not cache_rel <= rel:
            where = a.present_max_abs_at or "unknown"
            bad.append(f"{name}: KV cache max_abs/max|unmerged| {cache_rel:.3g} > {rel:.3g} at {where}")
    return bad


@dataclass
class TypedMergeCheck:
    """The unmerged typed graph's outputs, recorded before the merge (``record_unmerged``); ``compare`` holds
    the merged graph to them after it."""

    dtype: str
    parameters: int
    tokenizer: Any = field(default=None, repr=False)
    runtime: str = ""  # "onnxruntime" | "onnx.reference"; empty when the graph was not executed
    unmerged: RecordedRunner | None = None
    unmerged_spec: IOSpec | None = None
    report: dict[str, Any] = field(default_factory=dict)  # executed, runtime, reason / vs_fp32_reference

    def compare(self, merged_path: Path, merged_spec: IOSpec, say: Progress) -> dict[str, Any]:
        """The report entry ``{"typed_merge_check": ...}``; raises ValidationError beyond ``MERGE_TOLERANCE``.
        Empty for fp32 (there the merged graph is held to the fp32 reference at ``--atol`` already)."""
        if self.dtype == "float32":
            return {}
        if self.unmerged is None or self.unmerged_spec is None:
            return {"typed_merge_check": self.report}
        runner, _ = graph_runner(merged_path, merged_spec, self.parameters)
        if runner is None:
            raise RuntimeError("the unmerged graph was executed, so the merged one can be")
        res = compare_runners(runner, merged_spec, self.unmerged, self.unmerged_spec, self.tokenizer)
        say(f"merged vs unmerged {self.dtype} graph ({self.runtime}): " + _summary(res))
        bad = typed_failures(res, self.dtype, self.unmerged.cache_max())
        if bad:
            raise ValidationError(
                f"merged {self.dtype} graph disagrees with the unmerged {self.dtype} graph ({self.runtime}): "
                + "; ".join(bad),
                "nothing was written; a merge pass changed the function: export with --no-merge and report it",
            )
        rel = MERGE_TOLERANCE[self.dtype]
        self.report.update(
            against=f"the unmerged {self.dtype} graph",
            tolerance={"logits_max_rel": rel, "present_max_abs_over_max_ref": rel},
            agreement={k: a.to_json() for k, a in res.items()},
        )
        return {"typed_merge_check": self.report}


def record_unmerged(
    graph: Graph,
    spec: IOSpec,
    parameters: int,
    reference: RecordedRunner,
    ref_spec: IOSpec,
    tokenizer: Any,
    say: Progress,
) -> TypedMergeCheck:
    """Run the unmerged typed ``graph`` (in memory, before the merge) once through the validation cases and keep
    its outputs (its session is released on return). fp32: nothing to do.

    bf16 on the reference evaluator: the graph is first compared with ``reference`` (the recorded fp32 PyTorch
    model) at the bf16 tolerance of ``DTYPE_TOLERANCE`` (ValidationError beyond it) — the validate stage could
    not run the graph and had the bf16 PyTorch decoder stand in for it."""
    check = TypedMergeCheck(spec.dtype, parameters, tokenizer)
    if spec.dtype == "float32":
        return check
    runner, runtime = graph_runner(graph, spec, parameters)
    if runner is None:
        check.report = {"dtype": spec.dtype, "executed": False, "reason": runtime}
        say(runtime)
        return check
    check.report = {"dtype": spec.dtype, "executed": True, "runtime": runtime}
    if spec.dtype == "bfloat16":
        check.report["vs_fp32_reference"] = _bf16_vs_fp32(runner, spec, reference, ref_spec, tokenizer, say)
    say(f"{spec.dtype}: recording the unmerged graph on {runtime} (the merged graph is held to it)")
    check.runtime, check.unmerged_spec = runtime, spec
    check.unmerged = record_reference(runner, spec, tokenizer)
    return check


def _bf16_vs_fp32(
    runner: Runner, spec: IOSpec, reference: RecordedRunner, ref_spec: IOSpec, tokenizer: Any, say: Progress
) -> dict[str, Any]:

    say("bf16: running the unmerged bf16 ONNX graph on onnx.reference against the fp32 PyTorch reference")
    res = compare_runners(runner, spec, reference, ref_spec, tokenizer)
    bad = within_dtype_tolerance(res, "bfloat16", reference.cache_max(), 0.0)
    if bad:
        raise ValidationError(
            f"bf16 ONNX graph (onnx.reference) disagrees with PyTorch beyond {DTYPE_TOLERANCE['bfloat16']:g}: "
            + "; ".join(bad),
            "nothing was written; report this model and flags as a bug (or export fp16/fp32)",
        )
    return {k: a.to_json() for k, a in res.items()}


def _summary(res: dict[str, Agreement]) -> str:
    return "  ".join(f"{k}: max_rel {a.max_rel:.2e} top1 {a.top1:.3f}" for k, a in res.items())


# ---- typed export: --dtype fp16|bf16 -----------------------------------------------------------------------
def typed_decoder(dec: Decoder, dtype: str) -> Decoder:
    """A copy of ``dec`` in ``dtype`` (the fp32 original stays the validation reference)."""
    if dtype == "float32":
        return dec
    # Parameter by parameter onto a meta skeleton: a deepcopy would first duplicate the fp32 model (5 GB for
    # Llama-3.2-1B) before casting it.
    typed = Decoder.skeleton(dec.arch, dec.pairs)
    for name, p in dec.named_parameters():
        typed.set_parameter(name, p.detach().to(TORCH_DTYPES[dtype]))
    typed.inv_freq = dec.inv_freq.float()  # rotary stays fp32 (as from_hf does)
    return typed


# ---- overflow scan ------------------------------------------------------------------------------------------
@dataclass
class OverflowFinding:
    where: str  # parameter name, or "module.path:op"
    kind: str  # "weight>max" | "weight_underflow" | "nonfinite" | "near_max"
    max_abs: float
    count: int = 0

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass
class OverflowReport:
    dtype: str
    dtype_max: float
    weights_scanned: int = 0
    ops_scanned: int = 0
    weight_max_abs: float = 0.0
    activation_max_abs: float = 0.0  # largest finite typed activation seen in the calibration forward
    findings: list[OverflowFinding] = field(default_factory=list)

    @property
    def overflows(self) -> list[OverflowFinding]:
        return [f for f in self.findings if f.kind in ("weight>max", "nonfinite")]

    def summary(self) -> str:
        if not self.findings:
            return (
                f"{self.dtype}: no overflow (weights max |w| {self.weight_max_abs:.3g}, activations max "
                f"{self.activation_max_abs:.3g}, dtype max {self.dtype_max:.3g})"
            )
        kinds: dict[str, int] = {}
        for f in self.findings:
            kinds[f.kind] = kinds.get(f.kind, 0) + 1
        worst = ", ".join(f"{f.where} ({f.kind}, {f.max_abs:.3g})" for f in self.findings[:3])
        return f"{self.dtype}: " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + f"; e.g. {worst}"

    def to_json(self) -> dict[str, object]:
        return {
            "dtype": self.dtype,
            "dtype_max": self.dtype_max,
            "weights_scanned": self.weights_scanned,
            "ops_scanned": self.ops_scanned,
            "weight_max_abs": self.weight_max_abs,
            "activation_max_abs": self.activation_max_abs,
            "findings": [f.to_json() for f in self.findings],
        }


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, F.linear}


class _ActivationProbe(TorchFunctionMode):
    """Records max |x| of every floating op output in ``dtype`` during one forward, by module and op.

    Matrix products of ``dtype`` tensors run in fp32 and are rounded to ``dtype``: what a GPU GEMM (and TensorRT)
    does with 16-bit inputs — fp32 accumulation — and ~40x faster than PyTorch's CPU fp16 kernels (a
    Llama-3.2-1B prompt took 177 s that way). Every other op runs in the typed model's own dtype."""

    def __init__(self, dtype: torch.dtype, where: Callable[[], str]) -> None:
        super().__init__()
        self.dtype = dtype
        self.where = where
        self.stats: dict[str, tuple[float, int]] = {}  # key -> (max finite |x|, non-finite count)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == self.dtype for a in args):
            args = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == self.dtype else a for a in args)
            out = func(*args, **(kwargs or {})).to(self.dtype)
        else:
            out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == self.dtype and out.numel():
            with torch._C.DisableTorchFunction():
                x = out.detach().float()
                finite = torch.isfinite(x)
                bad = int((~finite).sum())
                mx = float(x.abs().where(finite, torch.zeros((), dtype=x.dtype)).max())
            key = f"{self.where()}:{getattr(func, '__name__', str(func))}"
            old_mx, old_bad = self.stats.get(key, (0.0, 0))
            self.stats[key] = (max(old_mx, mx), old_bad + bad)
        return out


def overflow_scan(dec32: Decoder, dtype: str, calib_ids: np.ndarray, typed: Decoder | None = None) -> OverflowReport:
    """Weights of the fp32 decoder against ``dtype``'s range, then one calibration forward of the typed one (its
    matrix products accumulated in fp32, see ``_ActivationProbe``)."""
    tdt = TORCH_DTYPES[dtype]
    info = torch.finfo(tdt)
    rep = OverflowReport(dtype, float(info.max))
    if dtype == "float32":
        return rep
    typed_params = dict(typed.named_parameters()) if typed is not None else {}
    for name, p in dec32.named_parameters():
        rep.weights_scanned += 1
        lo, hi = torch.aminmax(p.detach()) if p.numel() else (torch.zeros(()), torch.zeros(()))
        mx = max(-float(lo), float(hi))
        rep.weight_max_abs = max(rep.weight_max_abs, mx)
        if mx > info.max:
            rep.findings.append(OverflowFinding(name, "weight>max", mx, int((p.detach().abs() > info.max).sum())))
        # Nonzero weights below the smallest subnormal become exactly 0 in the typed graph.
        tp = typed_params.get(name)
        t = tp.detach() if tp is not None else p.detach().to(tdt)
        lost = int(torch.count_nonzero(p.detach())) - int(torch.count_nonzero(t))
        if lost:
            rep.findings.append(OverflowFinding(name, "weight_underflow", mx, lost))
    _scan_activations(typed if typed is not None else typed_decoder(dec32, dtype), calib_ids, tdt, rep)
    return rep


def _scan_activations(typed: Decoder, calib_ids: np.ndarray, tdt: torch.dtype, rep: OverflowReport) -> None:
    """One forward of the typed decoder on ``calib_ids`` under ``_ActivationProbe``; findings per module and op."""
    info = torch.finfo(tdt)
    stack: list[str] = ["decoder"]
    handles = []

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            stack.append(name)

        return hook

    def leave(*_: Any) -> None:  # must return None: a forward hook's return value replaces the output
        stack.pop()

    for mname, mod in typed.named_modules():
        if mname:
            handles.append(mod.register_forward_pre_hook(enter(mname)))
            handles.append(mod.register_forward_hook(leave))
    probe = _ActivationProbe(tdt, lambda: stack[-1])
    ids = torch.from_numpy(np.asarray(calib_ids, dtype=np.int64)).reshape(1, -1)
    S = ids.shape[1]
    try:
        with torch.no_grad(), probe:
            typed(ids, torch.ones_like(ids), torch.arange(S)[None], *typed.empty_past(1, tdt))
    finally:
        for h in handles:
            h.remove()
    rep.ops_scanned = len(probe.stats)
    for key, (mx, bad) in probe.stats.items():
        rep.activation_max_abs = max(rep.activation_max_abs, mx)
        if bad:
            rep.findings.append(OverflowFinding(key, "nonfinite", mx, bad))
        elif mx > info.max / 2:
            rep.findings.append(OverflowFinding(key, "near_max", mx))


# ---- typed export (pipeline helpers) ------------------------------------------------------------------------
@dataclass
class TypedExport:
    decoder: Decoder | None  # what to export (``dec`` itself for fp32); None once exported and released
    spec: Any  # IOSpec of the exported (unmerged) graph, in ``dtype``
    overflow: OverflowReport

    validated_by: str = "onnxruntime"

    def agreement(
        self, graph: Any, spec: Any, reference: Any, ref_spec: Any, tokenizer: Any, progress: Callable[[str], None]
    ) -> Any:
        """ONNX Runtime on ``graph`` (a file or an in-memory ``ir.Model``, see validate.ort_session; I/O ``spec``,
        merged or not) against the fp32 ``reference`` runner.

        bf16: ONNX Runtime's CPU provider has no bf16 kernels (NOT_IMPLEMENTED for Mul), so the graph cannot run
        here; the exported bf16 PyTorch decoder stands in for the dtype check (``validated_by`` says so) and the
        graph itself is checked by the engine build and, on a GPU, against PyTorch."""
        ours: Runner
        if spec.dtype == "bfloat16":
            self.validated_by = "pytorch-bf16 (ONNX Runtime CPU has no bf16 kernels; the ONNX graph was not run)"
            progress(f"bf16: validating with {self.validated_by}")
            if self.decoder is None:
                raise RuntimeError("the bf16 decoder was released before its validation")
            ours = TorchRunner(self.decoder, torch.bfloat16)
            spec = type(spec).for_model(self.decoder.arch, self.decoder.pairs, dtype="float32")
        else:
            ours = OrtRunner(graph, spec, prepack=False)
        return compare_runners(ours, spec, reference, ref_spec, tokenizer)  # type: ignore[arg-type]


def typed_export(dec32: Decoder, dtype: str, tokenizer: Any, progress: Callable[[str], None]) -> TypedExport:
    """The decoder to export for ``--dtype`` and its I/O spec; scans for overflow first (fails nothing: the
    validation that follows decides, the scan says why)."""
    spec = IOSpec.for_model(dec32.arch, dec32.pairs, merged=False, dtype=dtype)
    if dtype == "float32":
        return TypedExport(dec32, spec, OverflowReport(dtype, float(torch.finfo(torch.float32).max)))
    typed = typed_decoder(dec32, dtype)
    calib = np.asarray(validation_tokens(tokenizer, VALIDATION_TEXT, 16, dec32.arch.vocab_size, 0), np.int64)
    scan = overflow_scan(dec32, dtype, calib, typed)
    progress(f"overflow scan: {scan.summary()}")
    return TypedExport(typed, spec, scan)


def reference_cache_max(dec32: Decoder, tokenizer: Any) -> float:
    """Largest |K|,|V| of the fp32 reference on the validation prompt: the scale of the cache tolerance."""
    ids = torch.tensor([validation_tokens(tokenizer, VALIDATION_TEXT, 16, dec32.arch.vocab_size, 0)])
    with torch.no_grad():
        out = dec32(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], *dec32.empty_past(1))
    return max(float(t.abs().max()) for t in out[1:])


def tolerance_failures(agreement: dict[str, Any], dtype: str, atol: float, ref_cache_max: float) -> list[str]:
    """validate.within_tolerance for fp32; the normwise dtype tolerance for 16-bit graphs, the cache's relative
    to ``ref_cache_max`` (the reference's largest |K|,|V| on the validation prompt)."""
    if dtype == "float32":
        return within_tolerance(agreement, atol)
    return within_dtype_tolerance(agreement, dtype, ref_cache_max, atol)


def tolerance_json(dtype: str, atol: float) -> dict[str, object]:
    if dtype == "float32":
        return {"logits_max_abs": atol, "present_max_abs": atol}
    rel = DTYPE_TOLERANCE[dtype]
    return {"logits_max_rel": rel, "present_max_abs_over_max_ref": rel, "top1": "reported, not enforced"}
