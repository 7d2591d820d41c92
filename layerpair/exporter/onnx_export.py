"""``export_onnx``: the reference Decoder becomes ``model.onnx`` with the I/O spec's names and dims.

The graph is written directly with onnx_ir (``onnx_graph.build_graph``), not traced: weights are read from the
Decoder one tensor at a time while the file is written, so an export never holds a second copy of the model.
Opset 20, attention written out (MatMul, Softmax), not the opset-23 ``Attention`` op: TensorRT-RTX 1.7 parses
decomposed attention and builds it on the CPU, while the fused op fails to build in fp32.

Weights go to ``model.onnx.data`` next to the graph by default (``external_data=None`` or True), written tensor
by tensor: a single-file save first serialises the whole model into one protobuf (two transient copies of every
weight). ``external_data=False`` asks for one file, allowed below ONNX's 2 GB protobuf limit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from layerpair.errors import InputError, disk_full_as_output_error
from layerpair.exporter.model import TORCH_DTYPES, Decoder
from layerpair.exporter.onnx_graph import Source, build_graph
from layerpair.iospec import IOSpec

DEFAULT_OPSET = 20
TWO_GB = 2**31


def save_model(
    model: ir.Model, path: Path, external_data: bool, progress: Callable[[int, int], None] | None = None
) -> None:
    """Write ``model`` to ``path`` (weights to ``<name>.data`` when ``external_data``), one tensor at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external_data:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
        if size >= TWO_GB:  # checked here, where every writer passes (export, and the windowed in-memory merge)
            raise InputError(
                f"a single-file ONNX model cannot hold {size / 2**30:.1f} GiB of weights (protobuf's 2 GiB limit)",
                "drop --single-file: weights then go to model.onnx.data",
            )
        with disk_full_as_output_error(str(path)):
            ir.save(model, str(path))
        return
    # ir.save keeps tensors of <= 256 bytes (shape constants) inline; the callback sees the others.
    total = sum(v.const_value is not None and v.const_value.nbytes > 256 for v in model.graph.initializers.values())
    done = [0]

    def callback(tensor: ir.TensorProtocol, info: ir.external_data.CallbackInfo) -> None:
        done[0] += 1  # counted, not info.index: parallel writers report out of order
        if progress is not None:
            progress(done[0], total)

    with disk_full_as_output_error(f"{path} and its weights ({path.name}.data)"):
        ir.save(model, str(path), external_data=path.name + ".data", callback=callback)


def export_onnx(
    dec: Decoder,
    path: Path,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    source: Source | None = None,
) -> onnx.ModelProto:
    """Export ``dec`` to ``path``. Returns the saved model without its weights (for counting nodes).

    ``dec`` may be a skeleton (``Decoder.skeleton``, meta tensors) with ``source`` reading each weight from the
    checkpoint as it is written: the export then never holds more than one tensor of the model.
    """
    save_model(build_model(dec, opset, source), path, external_data is not False, progress)
    return onnx.load(str(path), load_external_data=False)


def build_model(dec: Decoder, opset: int = DEFAULT_OPSET, source: Source | None = None) -> ir.Model:
    """The unmerged graph of ``dec`` in its dtype, weights lazy (nothing is read until it is saved)."""
    dtype = next(name for name, t in TORCH_DTYPES.items() if t == dec.embed_tokens.dtype)
    return build_graph(dec, IOSpec.for_model(dec.arch, dec.pairs, dtype=dtype), opset, source)
