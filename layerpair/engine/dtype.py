"""``--dtype fp32|fp16|bf16``: the typed graph, its pre-build overflow scan and its tolerance.

Typed, not mixed by the builder: the Decoder itself is converted (``typed_decoder``) and exported, so every
tensor in ``model.onnx`` already has its final precision and the engine is built strongly typed. model.py keeps
the numerically fragile parts in fp32 — RMSNorm's mean of squares (``x.float()`` … ``.to(x.dtype)``), rotary
cos/sin and the softmax over masked scores — and ``fp32_islands`` checks that the exported graph still has
them (every Softmax and ReduceMean reads float32), which is exactly what TensorRT warns about for fp16.

Before the (long) build, ``overflow_scan`` reports what would not fit the dtype: weights beyond its max
(become inf) or nonzero weights that flush to zero, and — from one calibration forward of the *typed*
decoder — every op whose typed output is non-finite or within a factor 2 of the dtype's max. Ops computed in
fp32 islands are skipped automatically because their outputs are float32.

Tolerance against the fp32 PyTorch reference (``DTYPE_TOLERANCE``): fp32 keeps ``--atol`` on logits and cache.
A 16-bit graph rounds every activation (fp16: 11-bit significand, unit roundoff 4.9e-4; bf16: 8 bits, 3.9e-3)
through ~10 ops per layer, so the error is stated normwise relative to the reference's largest logit: fp16
<= 2e-2, bf16 <= 8e-2, and for the cache relative to the largest cached value: fp16 <= 2e-2, bf16 <= 8e-2.
Top-1 is reported (16-bit rounding may flip near-ties), not enforced.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from layerpair.exporter.model import Decoder

# The dtype tables and the 16-bit tolerance live with the typed-graph checks (exporter/precision.py), below this
# package; re-exported here for the engine's callers.
from layerpair.exporter.precision import DTYPE_TOLERANCE, TORCH_DTYPES, within_dtype_tolerance

__all__ = ["DTYPE_TOLERANCE", "TORCH_DTYPES", "within_dtype_tolerance"]


def typed_decoder(dec: Decoder, dtype: str) -> Decoder:
    """A copy of ``dec`` in ``dtype`` (the fp32 original stays the validation reference)."""
    if dtype == "float32":
        return dec
    typed = copy.deepcopy(dec).to(TORCH_DTYPES[dtype])
    typed.inv_freq = dec.inv_freq.float()  # .to() casts buffers too; rotary stays fp32 (as from_hf does)
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


# ---- graph and tolerance checks -----------------------------------------------------------------------------
def fp32_islands(onnx_path: Path) -> dict[str, Any]:
    """Dtypes read by the numerically fragile ops of the exported graph: {op: {dtype: count}} and problems."""
    import onnx
    from onnx import shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
    types.update({t.name: t.data_type for t in g.initializer})
    seen: dict[str, dict[str, int]] = {}
    problems = []
    for n in g.node:
        if n.op_type not in ("Softmax", "ReduceMean"):
            continue
        dt = onnx.helper.tensor_dtype_to_np_dtype(types[n.input[0]]).name if n.input[0] in types else "unknown"
        seen.setdefault(n.op_type, {}).setdefault(dt, 0)
        seen[n.op_type][dt] += 1
        if dt != "float32":
            problems.append(f"{n.op_type} '{n.name}' reads {dt}")
    return {"ops": seen, "problems": problems}


# ---- pipeline helpers ---------------------------------------------------------------------------------------
class TypedTorchRunner:
    """The typed PyTorch decoder behind validate.py's Runner contract, numpy float32 in and out (numpy has no
    bfloat16 that torch can wrap)."""

    def __init__(self, module: Decoder, dtype: str) -> None:
        self.module = module
        self.dtype = TORCH_DTYPES[dtype]

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        past_t = [torch.from_numpy(np.asarray(p, np.float32)).to(self.dtype) for p in past]
        with torch.no_grad():
            out = self.module(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), *past_t)
        return out[0].float().numpy(), [t.float().numpy() for t in out[1:]]


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
        from layerpair.exporter.validate import OrtRunner, Runner, compare_runners

        ours: Runner | TypedTorchRunner
        if spec.dtype == "bfloat16":
            self.validated_by = "pytorch-bf16 (ONNX Runtime CPU has no bf16 kernels; the ONNX graph was not run)"
            progress(f"bf16: validating with {self.validated_by}")
            if self.decoder is None:
                raise RuntimeError("the bf16 decoder was released before its validation")
            ours = TypedTorchRunner(self.decoder, "bfloat16")
            spec = type(spec).for_model(self.decoder.arch, self.decoder.pairs, dtype="float32")
        else:
            ours = OrtRunner(graph, spec, prepack=False)
        return compare_runners(ours, spec, reference, ref_spec, tokenizer)  # type: ignore[arg-type]


def typed_export(dec32: Decoder, dtype: str, tokenizer: Any, progress: Callable[[str], None]) -> TypedExport:
    """The decoder to export for ``--dtype`` and its I/O spec; scans for overflow first (fails nothing: the
    validation that follows decides, the scan says why)."""
    from layerpair.exporter.validate import VALIDATION_TEXT, _tokens
    from layerpair.iospec import IOSpec

    spec = IOSpec.for_model(dec32.arch, dec32.pairs, merged=False, dtype=dtype)
    if dtype == "float32":
        return TypedExport(dec32, spec, OverflowReport(dtype, float(torch.finfo(torch.float32).max)))
    typed = typed_decoder(dec32, dtype)
    calib = np.asarray(_tokens(tokenizer, VALIDATION_TEXT, 16, dec32.arch.vocab_size, 0), np.int64)
    scan = overflow_scan(dec32, dtype, calib, typed)
    progress(f"overflow scan: {scan.summary()}")
    return TypedExport(typed, spec, scan)


def reference_cache_max(dec32: Decoder, tokenizer: Any) -> float:
    """Largest |K|,|V| of the fp32 reference on the validation prompt: the scale of the cache tolerance."""
    from layerpair.exporter.validate import VALIDATION_TEXT, _tokens

    ids = torch.tensor([_tokens(tokenizer, VALIDATION_TEXT, 16, dec32.arch.vocab_size, 0)])
    with torch.no_grad():
        out = dec32(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], *dec32.empty_past(1))
    return max(float(t.abs().max()) for t in out[1:])


def tolerance_failures(agreement: dict[str, Any], dtype: str, atol: float, ref_cache_max: float) -> list[str]:
    """validate.within_tolerance for fp32; the normwise dtype tolerance for 16-bit graphs, the cache's relative
    to ``ref_cache_max`` (the reference's largest |K|,|V| on the validation prompt)."""
    if dtype == "float32":
        from layerpair.exporter.validate import within_tolerance

        return within_tolerance(agreement, atol)
    return within_dtype_tolerance(agreement, dtype, ref_cache_max, atol)


def tolerance_json(dtype: str, atol: float) -> dict[str, object]:
    if dtype == "float32":
        return {"logits_max_abs": atol, "present_max_abs": atol}
    rel = DTYPE_TOLERANCE[dtype]
    return {"logits_max_rel": rel, "present_max_abs_over_max_ref": rel, "top1": "reported, not enforced"}
