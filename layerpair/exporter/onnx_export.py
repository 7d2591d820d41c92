"""``export_onnx``: the reference Decoder becomes ``model.onnx`` with the I/O spec's names and dims.

Exporter choice: ``torch.onnx.export(dynamo=True)`` at opset 20. Attention is written out (MatMul, Softmax),
not the opset-23 ``Attention`` op: TensorRT-RTX 1.7 parses decomposed attention and builds it on the CPU,
while the fused op fails to build in fp32 ("not supported by a dedicated kernel"). Every dim is exported as
``Dim.DYNAMIC`` (torch.export cannot state T = P + S as a constraint, but infers it); afterwards the symbolic
dims torch invented (``s10``, ``s69 + s70``) are renamed to the I/O spec's names, so ONNX, TensorRT profiles
and Triton all say ``batch``, ``sequence``, ``past_sequence``, ``total_sequence``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from layerpair.exporter.model import Decoder
from layerpair.iospec import IOSpec

DEFAULT_OPSET = 20
TWO_GB = 2**31


def _example_inputs(dec: Decoder) -> tuple[torch.Tensor, ...]:
    # Sizes >= 2 on every dynamic axis: torch.export specialises dims of size 0 and 1.
    B, S, P = 2, 3, 4
    a = dec.arch
    dtype = dec.embed_tokens.dtype
    ids = torch.randint(0, a.vocab_size, (B, S))
    mask = torch.ones(B, P + S, dtype=torch.long)
    pos = torch.arange(P, P + S).expand(B, S).contiguous()
    past = [torch.zeros(B, a.num_kv_heads, P, a.head_dim, dtype=dtype) for _ in range(2 * a.num_layers)]
    return (ids, mask, pos, *past)


def set_symbolic_dims(model: ir.Model, spec: IOSpec) -> None:
    """Overwrite graph input/output dims with the spec's (symbolic names, static sizes)."""
    by_name = {t.name: t for t in [*spec.inputs, *spec.outputs]}
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.name is None or value.name not in by_name:
            raise RuntimeError(f"exported graph has an I/O tensor '{value.name}' that the I/O spec does not know")
        value.shape = ir.Shape(list(by_name[value.name].dims))


def export_onnx(
    dec: Decoder, path: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> onnx.ModelProto:
    """Export ``dec`` to ``path``; external data (``model.onnx.data``) when asked or when over 2 GB.

    Returns the saved model without its weights loaded (external data stays on disk), for counting nodes.
    """
    spec = dec.io
    D = torch.export.Dim.DYNAMIC
    n_past = 2 * dec.arch.num_layers
    dynamic_shapes = {
        "input_ids": {0: D, 1: D},
        "attention_mask": {0: D, 1: D},
        "position_ids": {0: D, 1: D},
        "past": tuple({0: D, 2: D} for _ in range(n_past)),
    }
    # torch.onnx prints its progress and a torchvision notice to stdout/logging; keep our console ours.
    quiet = io.StringIO()
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(quiet),
        _silence("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            dec,
            _example_inputs(dec),
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            input_names=spec.input_names,
            output_names=spec.output_names,
            optimize=True,
            verbose=False,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("torch.onnx.export returned no program")
    set_symbolic_dims(program.model, spec)
    weight_bytes = sum(p.numel() * p.element_size() for p in dec.parameters())
    use_external = weight_bytes >= TWO_GB if external_data is None else external_data
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=use_external)
    return onnx.load(str(path), load_external_data=False)


@contextlib.contextmanager
def _silence(*names: str):  # type: ignore[no-untyped-def]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)
