"""Performance model: predicted decode time per token from the real exported artifacts (issue 17).

    python -m benchmarks.perf_model [--orig DIR] [--lp DIR] [--out DIR] [--kernels auto|ort] [--readme]

Counts, per decode step, the kernels — a TensorRT engine's layers where the export has one (``--trt`` writes
model.plan; see ``engine.py``), else the nodes ONNX Runtime actually runs (its optimized graph) — the bytes each
reads and writes (weights + activations, KV cache at context T) and the FLOPs; predicts time per token on a named
device as sum over kernels of max(bytes / bandwidth, FLOPs / peak) + per-kernel cost; checks the model against
ONNX Runtime CPU decode measured in the same run with this machine's measured bandwidth, peak and per-node
overhead. README.md's prediction table is rendered from the result JSON (``report.readme_block``).
"""
