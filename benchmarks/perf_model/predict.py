"""Predictions (never measurements): roofline time per decode token, one device and two GPUs in tensor parallel.

One device: t = sum over kernels of max(bytes / bandwidth, FLOPs / peak) + per-kernel cost. On a GPU the graph's
fp32 bytes are scaled to the device dtype (bf16: x0.5) and alias/shape ops launch nothing.

Two GPUs (the paper's regime, arXiv 2502.02790): Megatron-style tensor parallelism splits every layer's weights
over both GPUs and needs 2 all-reduces per layer (after attention, after the MLP); a layer pair puts branch a on
GPU 0 and branch b on GPU 1, each GPU reads one whole layer (the same bytes as two half layers), runs one
layer's kernels, and the pair needs 2 all-reduces (the two branch sums). Per pair that saves one layer's kernel
launches and 2 all-reduces, nothing else. All-reduce of a [B, hidden] bf16 message: latency + bytes / link.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.perf_model.costs import Cost
from benchmarks.perf_model.devices import Device


def step_time(costs: Sequence[Cost], dev: Device, cuda_graphs: bool = False) -> float:
    """Seconds for one decode step on ``dev``; CPU: every node pays the per-node cost, GPU: every kernel."""
    gpu = dev.launch_graph_s is not None
    scale = 0.5 if dev.dtype == "bfloat16" else 1.0  # graph bytes are fp32
    launch = dev.launch_graph_s if (gpu and cuda_graphs and dev.launch_graph_s is not None) else dev.launch_eager_s
    total = 0.0
    for c in costs:
        if gpu and not c.gpu_kernel:
            continue
        total += max(c.traffic * scale / dev.bandwidth, c.flops / dev.peak_flops) + launch
    return total


@dataclass(frozen=True)
class LlamaShape:
    """Dimensions that set a decoder's bytes and FLOPs (Llama family)."""

    name: str
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o + k, v
        return attn + 3 * self.hidden * self.inter + 2 * self.hidden  # gate, up, down + 2 norms


# Published configs (config.json of meta-llama/Llama-2-7b-hf and meta-llama/Meta-Llama-3-8B; SmolLM2's GGUF).
PAPER_MODELS = {
    "llama-2-7b": LlamaShape("llama-2-7b", 32, 4096, 11008, 32, 32, 128, 32000),
    "llama-3-8b": LlamaShape("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256),
}


@dataclass(frozen=True)
class TPParams:
    kernels_per_layer: int  # from the real export's optimized graph (units.layer_split)
    kernels_outside: int
    link_latency_s: float
    cuda_graphs: bool
    head_split: bool = True  # LM head split by vocab over the GPUs + one gather; False: whole head on each GPU
    pair_extra_kernels: int = 0  # kernels a pair launches beyond one layer's (e.g. a second down projection + sum)


def _layer_time(m: LlamaShape, dev: Device, batch: int, ctx: int, share: float) -> float:
    """Roofline time of ``share`` of one layer (bf16): weights + KV cache [B, KVH, ctx, D] x2 read once."""
    weight = 2.0 * m.layer_params() * share
    kv = 2.0 * 2 * batch * m.kv_heads * ctx * m.head_dim * share
    flops = (2.0 * batch * m.layer_params() + 4.0 * batch * m.heads * ctx * m.head_dim) * share
    return max((weight + kv) / dev.bandwidth, flops / dev.peak_flops)


def tp2_step(m: LlamaShape, dev: Device, batch: int, ctx: int, pairs: int, p: TPParams) -> float:
    """Seconds per decode step on two ``dev`` in tensor parallel, ``pairs`` layer pairs (0 = original)."""
    launch = dev.launch_graph_s if p.cuda_graphs and dev.launch_graph_s is not None else dev.launch_eager_s
    link = dev.link_bw or 25e9  # no NVLink (RTX 4090): PCIe 4.0 x16 ~25 GB/s per direction, assumed
    allreduce = p.link_latency_s + 2.0 * batch * m.hidden / link
    share = 0.5 if p.head_split else 1.0
    head = max(
        2.0 * m.vocab * m.hidden * share / dev.bandwidth, 2.0 * batch * m.vocab * m.hidden * share / dev.peak_flops
    )
    # LM head split by vocab: one gather of the logits; whole on each GPU: no communication
    outside = p.kernels_outside * launch + head + (allreduce if p.head_split else 0.0)
    single = m.layers - 2 * pairs
    per_layer = p.kernels_per_layer * launch + 2 * allreduce
    t_single = single * (per_layer + _layer_time(m, dev, batch, ctx, 0.5))
    t_pairs = pairs * (per_layer + p.pair_extra_kernels * launch + _layer_time(m, dev, batch, ctx, 1.0))
    return outside + t_single + t_pairs
