"""``fp32_islands``: the numerically fragile ops of an exported 16-bit graph still read float32.

The typed export itself (``--dtype``: the typed decoder, its overflow scan, its tolerance) lives with the other
typed-graph checks in ``layerpair/exporter/precision.py``; this module keeps what concerns the engine build:
model.py keeps RMSNorm's mean of squares, rotary cos/sin and the softmax over masked scores in fp32, and
``fp32_islands`` checks that the exported graph still has them (every Softmax and ReduceMean reads float32) —
exactly what TensorRT warns about for fp16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
