"""Performance model: predicted decode time per token from the real exported artifacts (issue 17).

    python -m benchmarks.perf_model [--orig DIR] [--lp DIR] [--out DIR]

Counts, per decode step, the kernels ONNX Runtime actually runs (its optimized graph), the bytes each reads and
writes (weights + activations, KV cache at context T) and the FLOPs; predicts time per token on a named device as
sum over kernels of max(bytes / bandwidth, FLOPs / peak) + per-kernel cost; checks the model against ONNX Runtime
CPU decode measured in the same run with this machine's measured bandwidth, peak and per-node overhead.
"""
