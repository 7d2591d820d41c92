"""This machine's roofline parameters, measured with ONNX Runtime in the same run (fp32, the run's threads).

* bandwidth: MatMul [1, K] x [K, N] with the weight an initializer larger than the last-level cache; a 1-row
  GEMM streams the weight once, as every decode-step projection does, so bytes / time is the rate decode sees.
  A large numpy copy is recorded next to it (read + write bytes / time) for reference, not used by the model.
* peak: MatMul [M, K] x [K, N], M = K = N = 1024 (2 GFLOP): compute-bound.
* per-node overhead: a chain of tiny Add nodes on a [1, 8] tensor; time / nodes is what the executor costs per
  node when the node itself does no work.
Each figure is the median of a few repeats. Bandwidth and per-node overhead are measured right before and right
after every decode timing (``measure.measure_rounds``) and averaged: on this shared machine the load drifts within
seconds, and each timing is predicted from the parameters measured around it. Peak once per round.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _session(model: onnx.ModelProto, threads: int) -> object:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _matmul_model(m: int, k: int, n: int, weight: np.ndarray | None) -> onnx.ModelProto:
    """y[m, n] = x[m, k] @ W[k, n]; W an initializer (decode weights are) or a second input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
    inits = [numpy_helper.from_array(weight, "W")] if weight is not None else []
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm", [x], [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _chain_model(nodes: int) -> onnx.ModelProto:
    """x -> Add -> Add -> ... (``nodes`` Adds on [1, 8] fp32)."""
    one = numpy_helper.from_array(np.ones((1, 8), np.float32), "one")
    names = ["x"] + [f"h{i}" for i in range(nodes)]
    body = [helper.make_node("Add", [names[i], "one"], [names[i + 1]]) for i in range(nodes)]
    g = helper.make_graph(
        body,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, 8])],
        [one],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _gemv_chain_model(count: int, k: int, n: int) -> onnx.ModelProto:
    """x[1, k] @ W0[k, n] @ W1[n, k] @ ... (``count`` distinct weights): mid-sized GEMVs back to back."""
    rng = np.random.default_rng(2)
    names = ["x"] + [f"y{i}" for i in range(count)]
    shapes = [(k, n) if i % 2 == 0 else (n, k) for i in range(count)]
    inits = [
        numpy_helper.from_array(rng.standard_normal(s, dtype=np.float32) * 0.03, f"W{i}") for i, s in enumerate(shapes)
    ]
    body = [helper.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(count)]
    last = shapes[-1][1]
    g = helper.make_graph(
        body,
        "gemv_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, last])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


class Micro:
    """The three micro-benchmarks with their sessions built once, so that they can run between decode timings.

    bandwidth: weight [4096, 8192] fp32 = 128 MiB (> the 32 MiB L3 of this machine); peak: 1024^3 GEMM;
    per-node: 400 chained Adds, graph optimizations off (no constant folding of the chain).
    """

    def __init__(self, threads: int, k: int = 4096, n: int = 8192, size: int = 1024, chain: int = 400) -> None:
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        self.w_bytes = 4.0 * k * n
        self.gemv = _session(_matmul_model(1, k, n, rng.standard_normal((k, n), dtype=np.float32)), threads)
        self.x1 = np.ones((1, k), np.float32)
        self.a = rng.standard_normal((size, size), dtype=np.float32)
        self.gemm = _session(_matmul_model(size, size, size, self.a), threads)
        self.size, self.chain_nodes, self.threads = size, chain, threads
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.chain = ort.InferenceSession(
            _chain_model(chain).SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        self.x8 = np.zeros((1, 8), np.float32)
        # Diagnostic only (not a model parameter): 32 distinct [576, 1536] weights (113 MiB), decode-sized GEMVs.
        self.chain_bytes = 4.0 * 32 * 576 * 1536
        self.gemv_chain = _session(_gemv_chain_model(32, 576, 1536), threads)
        self.x576 = np.ones((1, 576), np.float32)

    def quick(self) -> dict[str, float]:
        """Bandwidth and per-node overhead (~0.2 s): run right before and after each decode timing."""
        t_bw = _median_time(lambda: self.gemv.run(None, {"x": self.x1}), 7, warmup=1)  # type: ignore[attr-defined]
        t_ch = _median_time(lambda: self.chain.run(None, {"x": self.x8}), 21)
        t_mc = _median_time(lambda: self.gemv_chain.run(None, {"x": self.x576}), 5, warmup=1)  # type: ignore[attr-defined]
        bw = self.w_bytes / t_bw
        return {
            "bandwidth_Bps": bw,
            "node_overhead_s": t_ch / self.chain_nodes,
            "diagnostic_bandwidth_32x576x1536_Bps": self.chain_bytes / t_mc,
        }

    def peak(self) -> float:
        """FLOP/s of the 1024^3 GEMM (once per round: the compute term is small in decode)."""
        return 2.0 * self.size**3 / _median_time(lambda: self.gemm.run(None, {"x": self.a}), 5)  # type: ignore[attr-defined]


def numpy_copy_bandwidth() -> float:
    """Reference only (not used by the model): 256 MiB numpy copy, read + write bytes / time."""
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _median_time(lambda: np.copyto(dst, src), 5)
