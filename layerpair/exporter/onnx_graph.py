"""``build_graph``: the reference Decoder written out as an ONNX graph directly with onnx_ir — no tracer.

Why not ``torch.onnx.export``: tracing copies every weight into the traced program, then into the ONNX proto
(SmolLM2: 131 s, 4.7 GB peak; a 7-8B model cannot be traced on 24 GB). Here each weight becomes an
``ir.LazyTensor`` that reads the Decoder's own parameter only when the file is written, one tensor at a time,
so the export holds the weights once (in the Decoder, which validation needs anyway).

The graph is the op-for-op form ``torch.onnx.export(dynamo=True)`` produced for ``model.py`` (the graph passes
match that structure; ``tests/exporter/test_onnx_graph.py`` checks the node sequence of one layer)::

    RMSNorm     [Cast f32] Pow 2 -> ReduceMean(-1) -> Add eps -> Sqrt -> Reciprocal -> Mul x -> [Cast] -> Mul g
    projection  MatMul(x, W[in,out]) [+ Add bias]
    heads       Reshape [0,0,H,D] [-> RMSNorm (Qwen3)] -> Transpose(0,2,1,3)
    rotary      Add(Mul(t, cos), Mul(Concat(Neg(Slice(t, D/2:)), Slice(t, :D/2)), sin))
    cache       present = Concat(past, new, axis=2)                                  [B,KVH,T,D]
    attention   MatMul(Reshape(q,[B,KVH,G,S,D]), Transpose(Unsqueeze(K,2))) * scale -> [Cast f32]
                -> Where(keep, ., min) -> Softmax -> [Cast] -> MatMul(Unsqueeze(V,2))
                -> Reshape [B,H,S,D] -> Transpose -> Reshape [B,S,H*D]
    MLP         Mul(Mul(g, Sigmoid(g)), u) with g, u projections, then the down projection

16-bit graphs keep RMSNorm, rotary cos/sin and the softmax in float32 exactly where model.py does.
Masks (causal, padding, sliding window) and cos/sin are computed once and shared by every layer, so the two
branches of a pair read the *same* values — a precondition of the attention merge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from onnx_ir.tensor_adapters import TorchTensor

from layerpair.exporter.model import Decoder, Layer
from layerpair.iospec import IOSpec

INT64_MAX = 2**63 - 1
_IR_DTYPES = {
    torch.float32: ir.DataType.FLOAT,
    torch.float16: ir.DataType.FLOAT16,
    torch.bfloat16: ir.DataType.BFLOAT16,
    torch.int64: ir.DataType.INT64,
}


Source = Callable[[str], torch.Tensor]  # our parameter name -> its tensor (read from the checkpoint on demand)


def _lazy_weight(t: torch.Tensor, name: str, source: Source | None) -> ir.LazyTensor:
    """A tensor read only when serialised: ``t`` itself, or — for a meta tensor (a Decoder skeleton) — whatever
    ``source(name)`` reads from the checkpoint. Never a second resident copy of the model."""
    if t.is_meta and source is None:
        raise ValueError(f"weight '{name}' has no data and no source to read it from")

    def read() -> ir.TensorProtocol:
        data = source(name) if t.is_meta and source is not None else t.detach()
        if tuple(data.shape) != tuple(t.shape) or data.dtype != t.dtype:
            raise ValueError(f"weight '{name}' read as {tuple(data.shape)} {data.dtype}, expected {tuple(t.shape)}")
        return TorchTensor(data.contiguous(), name=name)

    return ir.LazyTensor(read, dtype=_IR_DTYPES[t.dtype], shape=ir.Shape(tuple(t.shape)), name=name)


class _GraphWriter:
    """Appends nodes and initializers; names carry the module path so a node can be traced to model.py."""

    def __init__(self, dtype: torch.dtype, source: Source | None = None) -> None:
        self.source = source
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self.dtype = _IR_DTYPES[dtype]
        self.scope = ""
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], ir.Value] = {}

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attrs: Any) -> ir.Value:
        self._count += 1
        name = f"{self.scope}/{op_type}_{self._count}"
        n = ir.Node("", op_type, inputs, attributes=[ir.convenience.convert_attribute(k, v) for k, v in attrs.items()])
        n.name = name
        n.outputs[0].name = name
        self.nodes.append(n)
        return n.outputs[0]

    def init(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        v = ir.Value(
            name=name,
            shape=ir.Shape([int(d) for d in tensor.shape.numpy()]),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        self.initializers.append(v)
        return v

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        """A small constant, shared by every node that needs the same value (as the dynamo export shares them)."""
        key = (str(array.dtype), array.tobytes(), array.shape)
        if key not in self._consts:
            unique = f"const_{name}_{len(self._consts)}"
            self._consts[key] = self.init(unique, ir.Tensor(array, name=unique))
        return self._consts[key]

    def weight(self, name: str, t: torch.Tensor) -> ir.Value:
        return self.init(name, _lazy_weight(t, name, self.source))

    def cast(self, x: ir.Value, to: ir.DataType) -> ir.Value:
        """Cast only in 16-bit graphs (an fp32 graph has no identity casts, like the dynamo export)."""
        return x if self.dtype == ir.DataType.FLOAT else self.op("Cast", [x], to=int(to))

    def scalar(self, name: str, value: float, dtype: ir.DataType) -> ir.Value:
        return self.const(name, np.array(value, dtype=dtype.numpy()))

    def ints(self, name: str, values: Sequence[int]) -> ir.Value:
        return self.const(name, np.array(values, dtype=np.int64))


def rmsnorm(w: _GraphWriter, x: ir.Value, weight: torch.Tensor, eps: float, name: str) -> ir.Value:
    """``g * (x32 * 1/sqrt(mean(x32^2, -1) + eps)).to(dtype)``, ``x32 = float(x)`` (model.RMSNorm)."""
    f32 = ir.DataType.FLOAT
    x32 = w.cast(x, f32)
    ms = w.op(
        "ReduceMean",
        [w.op("Pow", [x32, w.scalar("two", 2.0, f32)]), w.ints("axes_last", [-1])],
        keepdims=1,
        noop_with_empty_axes=0,
    )
    inv = w.op("Reciprocal", [w.op("Sqrt", [w.op("Add", [ms, w.scalar("eps", eps, f32)])])])
    unit = w.cast(w.op("Mul", [x32, inv]), w.dtype)
    return w.op("Mul", [w.weight(name, weight), unit])


def linear(w: _GraphWriter, x: ir.Value, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> ir.Value:
    """``x @ W`` with ``W`` stored ``[in, out]`` (model.py's layout), plus the bias where the model has one."""
    y = w.op("MatMul", [x, w.weight(name, weight)])
    return y if bias is None else w.op("Add", [y, w.weight(name.replace("_proj", "_bias"), bias)])


def rotary(w: _GraphWriter, t_BHSD: ir.Value, cos: ir.Value, sin: ir.Value, head_dim: int) -> ir.Value:
    """``t * cos + rotate_half(t) * sin`` with ``rotate_half(t) = [-t[..., D/2:], t[..., :D/2]]``."""
    half = head_dim // 2
    # Explicit axes and steps, as the dynamo export wrote them: onnxscript's RotaryEmbedding fusion matches that.
    ax, one = w.ints("axis3", [3]), w.ints("one", [1])
    hi = w.op("Slice", [t_BHSD, w.ints("half", [half]), w.ints("end", [INT64_MAX]), ax, one])
    lo = w.op("Slice", [t_BHSD, w.ints("zero", [0]), w.ints("half", [half]), ax, one])
    rot_half = w.op("Concat", [w.op("Neg", [hi]), lo], axis=-1)
    return w.op("Add", [w.op("Mul", [t_BHSD, cos]), w.op("Mul", [rot_half, sin])])


class _Shared:
    """Values every layer reads: cos/sin [B,1,S,D] and one keep mask [B,1,1,S,T] per distinct window."""

    def __init__(self, cos: ir.Value, sin: ir.Value, keep: dict[int | None, ir.Value]) -> None:
        self.cos, self.sin, self.keep = cos, sin, keep


def masks(w: _GraphWriter, dec: Decoder, ids: ir.Value, attention_mask: ir.Value) -> dict[int | None, ir.Value]:
    """Boolean keep masks [B,1,1,S,T] per distinct window: causal by cache index, padding, sliding window."""
    S = w.op("Shape", [ids], start=1, end=2)  # [1]
    T = w.op("Shape", [attention_mask], start=1, end=2)
    zero, one = w.const("i0", np.array(0, np.int64)), w.const("i1", np.array(1, np.int64))
    P = w.op("Sub", [T, S])  # past length [1]
    q_idx = w.op("Add", [w.op("Unsqueeze", [w.op("Range", [zero, w.op("Squeeze", [S]), one]), w.ints("ax1", [1])]), P])
    k_idx = w.op("Unsqueeze", [w.op("Range", [zero, w.op("Squeeze", [T]), one]), w.ints("ax0", [0])])  # [1,T]
    causal = w.op("LessOrEqual", [k_idx, q_idx])  # [S,T]
    pad = w.op("Unsqueeze", [w.op("Cast", [attention_mask], to=int(ir.DataType.BOOL)), w.ints("ax12", [1, 2])])
    out: dict[int | None, ir.Value] = {}
    for win in sorted({dec.arch.window(i) for i in range(dec.arch.num_layers)}, key=lambda x: (x is None, x)):
        allowed = causal
        if win is not None:
            dist = w.op("Sub", [q_idx, k_idx])
            allowed = w.op("And", [causal, w.op("Less", [dist, w.const("win", np.array(win, np.int64))])])
        keep = w.op("And", [w.op("Unsqueeze", [allowed, w.ints("ax01", [0, 1])]), pad])  # [B,1,S,T]
        out[win] = w.op("Unsqueeze", [keep, w.ints("ax1", [1])])  # [B,1,1,S,T]: broadcast over KVH and G
    return out


def cos_sin(w: _GraphWriter, dec: Decoder, position_ids: ir.Value) -> tuple[ir.Value, ir.Value]:
    """cos/sin [B,1,S,D]: fp32 ``position * inv_freq`` (as transformers), cast to the graph dtype after."""
    inv_freq: torch.Tensor = dec.inv_freq  # type: ignore[assignment]  # a registered buffer, fp32
    pos = w.op("Unsqueeze", [w.op("Cast", [position_ids], to=int(ir.DataType.FLOAT)), w.ints("ax_last", [-1])])
    freqs = w.op("Mul", [pos, w.const("inv_freq", inv_freq.detach().numpy().astype(np.float32))])  # [B,S,D/2]
    emb = w.op("Concat", [freqs, freqs], axis=-1)
    ax1 = w.ints("ax1", [1])
    cos = w.op("Unsqueeze", [w.cast(w.op("Cos", [emb]), w.dtype), ax1])
    sin = w.op("Unsqueeze", [w.cast(w.op("Sin", [emb]), w.dtype), ax1])
    return cos, sin


def heads(w: _GraphWriter, lin: ir.Value, n: int, D: int, norm: Any, name: str, eps: float) -> ir.Value:
    """[B,S,n*D] -> [B,n,S,D], with Qwen3's per-head RMSNorm between the reshape and the transpose."""
    x = w.op("Reshape", [lin, w.ints("heads", [0, 0, n, D])])
    if norm is not None:
        x = rmsnorm(w, x, norm.weight, eps, name)
    return w.op("Transpose", [x], perm=[0, 2, 1, 3])


def attention(
    w: _GraphWriter, dec: Decoder, layer: Layer, xn: ir.Value, sh: _Shared, past: Sequence[ir.Value]
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """One layer's attention: (o_proj output [B,S,h], present K, present V [B,KVH,T,D])."""
    a, at, i = dec.arch, layer.self_attn, layer.index
    H, KVH, D, G = a.num_heads, a.num_kv_heads, a.head_dim, a.num_groups
    p = f"layers.{i}.self_attn."
    q = linear(w, xn, at.q_proj, at.q_bias, p + "q_proj")
    k = linear(w, xn, at.k_proj, at.k_bias, p + "k_proj")
    v = linear(w, xn, at.v_proj, at.v_bias, p + "v_proj")
    q_BHSD = rotary(w, heads(w, q, H, D, at.q_norm, p + "q_norm.weight", a.rms_norm_eps), sh.cos, sh.sin, D)
    k_BKSD = rotary(w, heads(w, k, KVH, D, at.k_norm, p + "k_norm.weight", a.rms_norm_eps), sh.cos, sh.sin, D)
    v_BKSD = heads(w, v, KVH, D, None, "", a.rms_norm_eps)
    k_BKTD = w.op("Concat", [past[0], k_BKSD], axis=2)  # present = past ++ new
    v_BKTD = w.op("Concat", [past[1], v_BKSD], axis=2)
    ax2 = w.ints("ax2", [2])
    q_BKGSD = w.op("Reshape", [q_BHSD, w.ints("q5", [0, KVH, G, -1, D])])
    kT = w.op("Transpose", [w.op("Unsqueeze", [k_BKTD, ax2])], perm=[0, 1, 2, 4, 3])
    scores = w.op("Mul", [w.op("MatMul", [q_BKGSD, kT]), w.scalar("scale", a.attn_scale, w.dtype)])
    f32min = w.scalar("f32min", float(np.finfo(np.float32).min), ir.DataType.FLOAT)
    masked = w.op("Where", [sh.keep[a.window(i)], w.cast(scores, ir.DataType.FLOAT), f32min])
    probs = w.cast(w.op("Softmax", [masked], axis=-1), w.dtype)
    ctx = w.op("MatMul", [probs, w.op("Unsqueeze", [v_BKTD, ax2])])  # [B,KVH,G,S,D]
    ctx = w.op("Transpose", [w.op("Reshape", [ctx, w.ints("ctx4", [0, H, -1, D])])], perm=[0, 2, 1, 3])
    ctx = w.op("Reshape", [ctx, w.ints("ctx", [0, 0, H * D])])  # [B,S,H*D]
    return linear(w, ctx, at.o_proj, at.o_bias, p + "o_proj"), k_BKTD, v_BKTD


def mlp(w: _GraphWriter, layer: Layer, x: ir.Value) -> ir.Value:
    m, p = layer.mlp, f"layers.{layer.index}.mlp."
    g = linear(w, x, m.gate_proj, m.gate_bias, p + "gate_proj")
    u = linear(w, x, m.up_proj, m.up_bias, p + "up_proj")
    act = w.op("Mul", [w.op("Mul", [g, w.op("Sigmoid", [g])]), u])  # silu(g) * u
    return linear(w, act, m.down_proj, m.down_bias, p + "down_proj")


def block(
    w: _GraphWriter,
    dec: Decoder,
    ls: Sequence[Layer],
    x: ir.Value,
    sh: _Shared,
    past: Mapping[int, Sequence[ir.Value]],
    presents: dict[int, tuple[ir.Value, ir.Value]],
) -> ir.Value:
    """A single layer, or a pair whose two branches read the same input (model.Decoder.forward)."""
    eps = dec.arch.rms_norm_eps
    h = x
    for layer in ls:
        w.scope = f"/layers.{layer.index}/attn"
        xn = rmsnorm(w, x, layer.input_layernorm.weight, eps, f"layers.{layer.index}.input_layernorm.weight")
        out, k, v = attention(w, dec, layer, xn, sh, past[layer.index])
        presents[layer.index] = (k, v)
        h = w.op("Add", [h, out])
    x = h
    for layer in ls:
        w.scope = f"/layers.{layer.index}/mlp"
        name = f"layers.{layer.index}.post_attention_layernorm.weight"
        x = w.op("Add", [x, mlp(w, layer, rmsnorm(w, h, layer.post_attention_layernorm.weight, eps, name))])
    return x


def lm_head(w: _GraphWriter, dec: Decoder, x_BSh: ir.Value, embed_Vh: ir.Value) -> ir.Value:
    """Logits [B,S,V]. Tied embeddings read the embedding table itself, ``Gemm(x, E, transB=1)`` on [B*S, h]
    rows: no transposed copy of a [V,h] table (1 GB for Llama-3.2-1B) on disk or in a runtime's memory."""
    if dec.lm_head is not None:
        return w.op("MatMul", [x_BSh, w.weight("lm_head", dec.lm_head)])
    rows = w.op("Reshape", [x_BSh, w.ints("rows", [-1, dec.arch.hidden_size])])
    logits_NV = w.op("Gemm", [rows, embed_Vh], transB=1)
    shape_BSV = w.op("Concat", [w.op("Shape", [x_BSh], start=0, end=2), w.ints("vocab", [dec.arch.vocab_size])], axis=0)
    return w.op("Reshape", [logits_NV, shape_BSV])


_SPEC_DTYPES = {
    "float32": ir.DataType.FLOAT,
    "float16": ir.DataType.FLOAT16,
    "bfloat16": ir.DataType.BFLOAT16,
    "int64": ir.DataType.INT64,
}


def _io_value(name: str, dtype: str, dims: Sequence[int | str]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(_SPEC_DTYPES[dtype]), shape=ir.Shape(list(dims)))


def build_graph(dec: Decoder, spec: IOSpec, opset: int, source: Source | None = None) -> ir.Model:
    """The whole decoder as an ``ir.Model`` whose I/O is ``spec`` (unmerged slots); weights stay lazy."""
    w = _GraphWriter(dec.embed_tokens.dtype, source)
    inputs = [_io_value(t.name, t.dtype, t.dims) for t in spec.inputs]
    ids, attention_mask, position_ids = inputs[:3]
    past = {s.layers[0]: inputs[3 + 2 * j : 5 + 2 * j] for j, s in enumerate(spec.slots)}
    w.scope = "/rotary_and_masks"
    cos, sin = cos_sin(w, dec, position_ids)
    sh = _Shared(cos, sin, masks(w, dec, ids, attention_mask))
    w.scope = "/embed"
    embed = w.weight("embed_tokens", dec.embed_tokens)
    x = w.op("Gather", [embed, ids], axis=0)
    presents: dict[int, tuple[ir.Value, ir.Value]] = {}
    layers: Any = dec.layers
    for blk in dec.blocks:
        x = block(w, dec, [layers[i] for i in blk], x, sh, past, presents)
    w.scope = "/head"
    x = rmsnorm(w, x, dec.norm.weight, dec.arch.rms_norm_eps, "norm.weight")
    logits = w.cast(lm_head(w, dec, x, embed), ir.DataType.FLOAT)
    outputs = _name_outputs(w, spec, logits, presents)
    graph = ir.Graph(
        inputs, outputs, nodes=w.nodes, initializers=w.initializers, opset_imports={"": opset}, name="layerpair"
    )
    model = ir.Model(graph, ir_version=10, producer_name="layerpair-export")
    # Types and shapes of every intermediate value (the weights are not touched): onnxscript's fusion rules,
    # TensorRT's parser and anyone reading the graph rely on them, as they did on the dynamo export's.
    common_passes.ShapeInferencePass()(model)
    return model


def _name_outputs(
    w: _GraphWriter, spec: IOSpec, logits: ir.Value, presents: dict[int, tuple[ir.Value, ir.Value]]
) -> list[ir.Value]:
    """Give the output values the spec's names, dtypes and symbolic dims (an Identity where one value would
    otherwise need two names — never the case for this graph, checked)."""
    values = [logits]
    for s in spec.slots:
        values.extend(presents[s.layers[0]])
    for v, t in zip(values, spec.outputs, strict=True):
        if v.name == t.name or v.is_graph_output():
            raise RuntimeError(f"output value '{t.name}' is produced twice")
        v.name = t.name
        v.type = _io_value(t.name, t.dtype, t.dims).type
        v.shape = ir.Shape(list(t.dims))
    return values
