"""Per-node cost of one decode step at (batch B, past T): bytes read and written, weight bytes, FLOPs.

Rules (each one says why):

* Alias ops (Reshape, Squeeze, Unsqueeze, Flatten, Identity) move no data: ORT reuses the input buffer. Shape
  reads metadata only. They still cost one node's dispatch on the CPU; on a GPU they launch no kernel.
* Gather reads only the rows it returns (the embedding table is 113 MB for SmolLM2; a decode step reads 1 row).
* Attention contrib ops (GroupQueryAttention) take the rotary cos/sin tables [max_len, D/2] as initializers
  but read only the current positions' rows: those inputs count 0 bytes.
* Everything else reads every input once and writes every output once (initializers included: a decode step
  streams every weight matrix once).
* FLOPs: MatMul / FusedMatMul / Gemm 2·(output elements)·K; GroupQueryAttention / MultiHeadAttention
  4·B·H·S·T_total·D (QK^T and PV); any other op 1 per output element (negligible next to the GEMMs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.perf_model.graph import Node, Tensor, dim_at

ALIAS_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
META_OPS = frozenset({"Shape", "Size"})
GATHER_OPS = frozenset({"Gather", "GatherElements", "GatherND"})
MATMUL_OPS = frozenset({"MatMul", "FusedMatMul", "Gemm", "MatMulInteger"})
ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})


@dataclass(frozen=True)
class Cost:
    """One node at one (B, T). ``gpu_kernel``: whether a GPU runtime would launch a kernel for it."""

    op: str
    read: int
    write: int
    weight: int
    flops: float
    gpu_kernel: bool

    @property
    def traffic(self) -> int:
        return self.read + self.write


def _shape(t: Tensor, b: int, p: int) -> list[int]:
    return [dim_at(d, b, p) for d in t.dims]


def _matmul_k(n: Node, b: int, p: int) -> int:
    a = _shape(n.inputs[0], b, p)
    trans_a = bool(n.attrs.get("transA", 0))
    if len(a) == 1:
        return a[0]
    return a[-2] if trans_a else a[-1]


def _attention_flops(n: Node, b: int, p: int) -> float:
    """4·B·H·S·T_total·D from the query input [B, S, H·D] and the present key output [B, KVH, T_total, D]."""
    q = _shape(n.inputs[0], b, p)
    heads = int(n.attrs.get("num_heads", 1))
    pk = _shape(n.outputs[1], b, p) if len(n.outputs) > 1 else None
    if pk is None or len(pk) != 4:
        return float(q[0] * q[1] * q[2])  # no present output to read T_total from: elementwise fallback
    t_total, d = pk[2], pk[3]
    return 4.0 * q[0] * heads * q[1] * t_total * d


def node_cost(n: Node, b: int, p: int) -> Cost:
    out_bytes = sum(t.nbytes(b, p) for t in n.outputs)
    if n.op in ALIAS_OPS or n.op in META_OPS:
        return Cost(n.op, 0, 0, 0, 0.0, False)
    if n.op in GATHER_OPS:
        data, rest = n.inputs[0], n.inputs[1:]
        read = out_bytes + sum(t.nbytes(b, p) for t in rest)  # only the gathered rows of the data input
        weight = out_bytes if data.initializer else 0
        return Cost(n.op, read, out_bytes, weight, 0.0, True)
    ins = n.inputs
    if n.op in ATTENTION_OPS:  # its initializers are rotary cos/sin tables: it reads only the current rows
        ins = [t for t in ins if not t.initializer]
    read = sum(t.nbytes(b, p) for t in ins)
    weight = sum(t.nbytes(b, p) for t in ins if t.initializer)
    out_elems = sum(t.numel(b, p) for t in n.outputs)
    if n.op in MATMUL_OPS:
        flops = 2.0 * n.outputs[0].numel(b, p) * _matmul_k(n, b, p)
    elif n.op in ATTENTION_OPS:
        flops = _attention_flops(n, b, p)
    else:
        flops = float(out_elems)
    return Cost(n.op, read, out_bytes, weight, flops, True)


def graph_costs(nodes: Sequence[Node], b: int, p: int) -> list[Cost]:
    return [node_cost(n, b, p) for n in nodes]


@dataclass(frozen=True)
class Totals:
    nodes: int
    gpu_kernels: int
    traffic: int
    weight: int
    flops: float
    matmuls: int

    def to_json(self) -> dict[str, float | int]:
        return {
            "nodes": self.nodes,
            "gpu_kernels": self.gpu_kernels,
            "bytes": self.traffic,
            "weight_bytes": self.weight,
            "flops": self.flops,
            "matmuls": self.matmuls,
        }


def totals(costs: Sequence[Cost]) -> Totals:
    return Totals(
        nodes=len(costs),
        gpu_kernels=sum(c.gpu_kernel for c in costs),
        traffic=sum(c.traffic for c in costs),
        weight=sum(c.weight for c in costs),
        flops=sum(c.flops for c in costs),
        matmuls=sum(c.op in MATMUL_OPS for c in costs),
    )
