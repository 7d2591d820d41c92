"""The graph ONNX Runtime actually runs, with every tensor's shape as a function of (batch B, past length T).

ORT writes its optimized graph (``SessionOptions.optimized_model_filepath``); that graph contains contrib ops
(FusedMatMul, QuickGelu, GroupQueryAttention, SkipSimplifiedLayerNormalization, ...) that ONNX shape inference
does not know. So shapes are *observed*: the optimized graph runs one decode step (sequence 1) with every node
output exposed, at four (B, T) points; each dimension is fitted exactly as d = a + b·B + c·T + e·B·T (integer
coefficients) and checked at a fifth point. A dimension that does not fit raises: no guessed shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

# (B, T) probe points for the fit, and the check point; T = past length, total = T + 1 (decode step).
FIT_POINTS = ((1, 4), (1, 12), (2, 4), (2, 12))
CHECK_POINT = (3, 20)

Dim = tuple[int, int, int, int]  # d(B, T) = a + b·B + c·T + e·B·T


def dim_at(d: Dim, batch: int, past: int) -> int:
    return d[0] + d[1] * batch + d[2] * past + d[3] * batch * past


@dataclass
class Tensor:
    """A node input or output: static (initializer) or shape-fitted (activation)."""

    name: str
    itemsize: int
    dims: list[Dim]
    initializer: bool = False

    def numel(self, batch: int, past: int) -> int:
        return int(np.prod([dim_at(d, batch, past) for d in self.dims], dtype=np.int64))

    def nbytes(self, batch: int, past: int) -> int:
        return self.numel(batch, past) * self.itemsize


@dataclass
class Node:
    op: str
    name: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    attrs: dict[str, Any] = field(default_factory=dict)


def optimized_model(src: Path, dst: Path, threads: int) -> Path:
    """Write the graph ORT runs for ``src`` (default optimization level, CPU provider) to ``dst``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.optimized_model_filepath = str(dst)
    # Weights to a side file: the optimized copy of a 0.5 GB model must not be limited by protobuf's 2 GB.
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", dst.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    return dst


def _input_dim(name: str, batch: int, past: int, fixed: dict[str, int]) -> int:
    """Value of a symbolic graph-input dim at a decode step (sequence 1): names of ours and genai's builder.

    ``fixed`` names symbolic dims that are constants of the model (genai's ``kv_cache_dim`` = head size).
    """
    if name in fixed:
        return fixed[name]
    n = name.lower()
    if "past" in n:
        return past
    if "total" in n:
        return past + 1
    if "batch" in n:
        return batch
    if "seq" in n:
        return 1
    raise ValueError(f"unknown symbolic input dim '{name}'")


def decode_feeds(
    graph: onnx.GraphProto, batch: int, past: int, fixed: dict[str, int] | None = None
) -> dict[str, np.ndarray]:
    """One decode step's inputs: token ids 0, mask all ones, position = past, K/V caches zeros of length past."""
    init = {i.name for i in graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in graph.input:
        if vi.name in init:
            continue
        tt = vi.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else _input_dim(d.dim_param, batch, past, fixed or {})
            for d in tt.shape.dim
        ]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if "position" in vi.name:
            feeds[vi.name] = np.full(shape, past, dtype)
        elif "mask" in vi.name:
            feeds[vi.name] = np.ones(shape, dtype)
        else:
            feeds[vi.name] = np.zeros(shape, dtype)
    return feeds


def _observe(
    path: Path, threads: int, fixed: dict[str, int]
) -> dict[tuple[int, int], dict[str, tuple[tuple[int, ...], int]]]:
    """(shape, itemsize) of every node output at the probe points, from one session with all outputs exposed."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    g = model.graph
    known = {o.name for o in g.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    for n in g.node:
        for o in n.output:
            if o and o not in known:
                g.output.append(onnx.ValueInfoProto(name=o))
                known.add(o)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized: run it as is
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    seen: dict[tuple[int, int], dict[str, tuple[tuple[int, ...], int]]] = {}
    for b, t in (*FIT_POINTS, CHECK_POINT):
        feeds = decode_feeds(g, b, t, fixed)
        outs = sess.run(names, feeds)
        shapes = {k: (tuple(v.shape), v.dtype.itemsize) for k, v in zip(names, outs, strict=True)}
        shapes.update({k: (tuple(v.shape), v.dtype.itemsize) for k, v in feeds.items()})
        seen[(b, t)] = shapes
    return seen


def fit_dims(samples: Mapping[tuple[int, int], tuple[int, ...]]) -> list[Dim]:
    """Exact bilinear fit of each dimension over FIT_POINTS, verified at CHECK_POINT (raises if it does not fit)."""
    a = np.array([[1, b, t, b * t] for b, t in FIT_POINTS], float)
    ranks = {len(s) for s in samples.values()}
    if len(ranks) != 1:
        raise ValueError(f"rank changes with (B, T): {samples}")
    dims: list[Dim] = []
    for k in range(ranks.pop()):
        y = np.array([samples[p][k] for p in FIT_POINTS], float)
        c = np.rint(np.linalg.solve(a, y)).astype(int)
        d: Dim = (int(c[0]), int(c[1]), int(c[2]), int(c[3]))
        for b, t in (*FIT_POINTS, CHECK_POINT):
            if dim_at(d, b, t) != samples[(b, t)][k]:
                raise ValueError(f"dimension {k} is not bilinear in (B, T): {samples}")
        dims.append(d)
    return dims


def _static(t: onnx.TensorProto) -> Tensor:
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return Tensor(t.name, itemsize, [(int(x), 0, 0, 0) for x in t.dims], initializer=True)


def load_graph(
    path: Path, threads: int, fixed: dict[str, int] | None = None, progress: Callable[[str], None] | None = None
) -> list[Node]:
    """Nodes of the optimized graph at ``path`` with inputs/outputs as ``Tensor`` (fitted shapes)."""
    seen = _observe(path, threads, fixed or {})
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name: _static(i) for i in model.graph.initializer}
    cache: dict[str, Tensor] = {}

    def tensor(name: str) -> Tensor:
        if name in inits:
            return inits[name]
        if name not in cache:
            per = {p: seen[p][name][0] for p in seen}
            cache[name] = Tensor(name, seen[FIT_POINTS[0]][name][1], fit_dims(per))
        return cache[name]

    nodes = []
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        ins = [tensor(i) for i in n.input if i]
        outs = [tensor(o) for o in n.output if o]
        nodes.append(Node(n.op_type, n.name, ins, outs, attrs))
    if progress:
        progress(f"{path.name}: {len(nodes)} nodes, {len(cache)} activations fitted")
    return nodes
