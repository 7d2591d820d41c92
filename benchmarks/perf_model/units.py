"""Per-layer kernel counts read off the graph: the stretch of graph between two consecutive K-cache writes.

A node's *unit* is the number of K-cache producers (the nodes that output ``present.*.key``) among its ancestors
and itself. Unit 0 holds the prologue (embedding, rotary tables, mask) and the first layer up to its K write;
unit i (0 < i < L) runs from layer i-1's K write to layer i's: one layer's worth of nodes, shifted. The
interior units of an unpaired export therefore each hold exactly one layer's nodes; the model takes the median
(they are equal for a uniform stack) as kernels per layer, and the rest of the graph as "outside the layers".
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.perf_model.costs import Cost
from benchmarks.perf_model.graph import Node


def node_units(nodes: Sequence[Node]) -> list[int]:
    """Unit index of every node (nodes in topological order, as ORT writes its optimized graph)."""
    mask: dict[str, int] = {}  # value name -> bit set of K producers upstream (bit i = i-th K producer seen)
    bit = 0
    units = []
    for n in nodes:
        m = 0
        for t in n.inputs:
            m |= mask.get(t.name, 0)
        if any(o.name.startswith("present.") and o.name.endswith(".key") for o in n.outputs):
            m |= 1 << bit
            bit += 1
        for o in n.outputs:
            mask[o.name] = m
        units.append(m.bit_count())
    return units


@dataclass(frozen=True)
class LayerSplit:
    """Kernels per layer and outside the layers, from an unpaired export."""

    layers: int
    nodes_per_layer: int
    gpu_kernels_per_layer: int
    nodes_outside: int
    gpu_kernels_outside: int
    interior_units_equal: bool

    def to_json(self) -> dict[str, int | bool]:
        return dict(self.__dict__)


def layer_split(nodes: Sequence[Node], costs: Sequence[Cost]) -> LayerSplit:
    units = node_units(nodes)
    n_layers = max(units)
    interior = range(1, n_layers)
    per_nodes = [sum(1 for u in units if u == i) for i in interior]
    per_gpu = [sum(1 for u, c in zip(units, costs, strict=True) if u == i and c.gpu_kernel) for i in interior]
    if not per_nodes:
        raise ValueError("fewer than two K-cache writes: no interior unit to count a layer from")
    k_nodes = int(statistics.median(per_nodes))
    k_gpu = int(statistics.median(per_gpu))
    return LayerSplit(
        layers=n_layers,
        nodes_per_layer=k_nodes,
        gpu_kernels_per_layer=k_gpu,
        nodes_outside=len(nodes) - n_layers * k_nodes,
        gpu_kernels_outside=sum(c.gpu_kernel for c in costs) - n_layers * k_gpu,
        interior_units_equal=len(set(per_nodes)) == 1 and len(set(per_gpu)) == 1,
    )
