"""Device parameters for the roofline model, one table, each figure with its source.

GPU bandwidths and peaks are vendor datasheet figures (dense, no sparsity). Per-kernel costs are *assumptions*
(no vendor publishes them); they are parameters of the prediction, not measurements. The CPU row is filled from
the micro-benchmarks of the same run (``micro.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Per-kernel cost on a GPU, seconds. Assumed, not measured: eager PyTorch / ONNX Runtime launches cost several
# microseconds of host time each; a CUDA graph replays kernels back to back at ~1-2 us each.
LAUNCH_EAGER_S = 5e-6
LAUNCH_GRAPH_S = 1.5e-6
LAUNCH_SOURCE = "assumed (not measured): 5 us/kernel eager launch, 1.5 us/kernel inside a CUDA graph"


@dataclass(frozen=True)
class Device:
    """One device: memory bandwidth (B/s), dense peak (FLOP/s) in the dtype it runs, per-kernel costs (s)."""

    name: str
    bandwidth: float
    peak_flops: float
    dtype: str  # the dtype the prediction assumes on this device (bytes scale with it)
    launch_eager_s: float
    launch_graph_s: float | None  # None: no CUDA graphs (CPU)
    link_bw: float | None  # GPU-GPU bandwidth per direction, B/s (None: no link)
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


GPUS: dict[str, Device] = {
    "H100-SXM": Device(
        "H100-SXM",
        3.35e12,
        989e12,
        "bfloat16",
        LAUNCH_EAGER_S,
        LAUNCH_GRAPH_S,
        450e9,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5: HBM3 3.35 TB/s, BF16 dense 989 TFLOPS, NVLink 900 GB/s "
        "bidirectional); " + LAUNCH_SOURCE,
    ),
    "H200-SXM": Device(
        "H200-SXM",
        4.8e12,
        989e12,
        "bfloat16",
        LAUNCH_EAGER_S,
        LAUNCH_GRAPH_S,
        450e9,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: HBM3e 4.8 TB/s, BF16 dense 989 TFLOPS, NVLink 900 GB/s "
        "bidirectional); " + LAUNCH_SOURCE,
    ),
    "A100-SXM4-80GB": Device(
        "A100-SXM4-80GB",
        2.039e12,
        312e12,
        "bfloat16",
        LAUNCH_EAGER_S,
        LAUNCH_GRAPH_S,
        300e9,
        "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: HBM2e 2,039 GB/s, BF16 dense 312 TFLOPS, NVLink 600 GB/s "
        "bidirectional); " + LAUNCH_SOURCE,
    ),
    "RTX-4090": Device(
        "RTX-4090",
        1.008e12,
        165.2e12,
        "bfloat16",
        LAUNCH_EAGER_S,
        LAUNCH_GRAPH_S,
        None,
        "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090: GDDR6X 1,008 GB/s, FP16/BF16 tensor dense with "
        "FP32 accumulate 165.2 TFLOPS; no NVLink); " + LAUNCH_SOURCE,
    ),
}


def cpu_device(micro: dict[str, Any]) -> Device:
    """This machine, from the micro-benchmarks of the same run (fp32, ONNX Runtime, the run's thread count)."""
    return Device(
        name="this-cpu",
        bandwidth=micro["bandwidth_Bps"],
        peak_flops=micro["peak_flops"],
        dtype="float32",
        launch_eager_s=micro["node_overhead_s"],
        launch_graph_s=None,
        link_bw=None,
        source=(
            "measured in this run: bandwidth = ORT MatMul [1,K]x[K,N] weight bytes / time; peak = ORT "
            "MatMul 1024^3 GEMM; per-node = chain of tiny ORT Add nodes, time / nodes"
        ),
    )
