"""CPU throughput: original vs LP unmerged vs LP merged, PyTorch eager and ONNX Runtime, one process.

    python -m benchmarks.throughput [--tiny] [--out DIR] [--runtimes torch,ort] [--threads N]

Writes DIR/throughput.json and DIR/*.png (DIR defaults to benchmarks/results/throughput-cpu[-tiny]).

    measure   Settings, the timed decode / prefill closures (PyTorch eager or ONNX Runtime), the weights
    exports   ONNX exports of the benchmark decoders (cached), the pair merge and its full-merge check
    sections  the measured sections: main comparison (torch, ort), scaling with pairs, scaling with size
    plot      main.png, scaling_pairs.png, scaling_size.png from the rows
    main      the command line: flags, one run, throughput.json / throughput.md

Variants (random weights, same weights in every variant of one model — speed does not depend on values; norm
scales are U(0.5, 1.5), not ones, so the ONNX merge really folds them):

* ``original``        — ``Decoder(arch)``: the reference decoder, every layer in sequence.
* ``lp_unmerged``     — ``Decoder(arch, pairs)``: each pair as two branches reading the same input.
* ``original_fused``  — ``WideDecoder(dec, ())`` (PyTorch only): norm scales folded, q/k/v and gate/up fused.
* ``lp_merged``       — PyTorch: ``WideDecoder(dec, pairs)``, the pair merged into one wide layer, compared
  against ``original_fused`` so the ratio measures pairing only. ONNX Runtime: the exported LP graph after
  ``layerpair.graph_passes``' merge (issue 3), when that package exposes one; else the row says "not available".

Each measurement: decode = ``steps`` greedy tokens from a cache of ``past`` tokens (growing cache, presents
fed back; batch 1); prefill = one forward of ``seq`` tokens on an empty cache. Variants run round-robin
(rotated start), ``warmup`` rounds discarded, then ``repeats`` rounds: median and IQR of tokens/s. Each LP
row carries ``ratio`` (median / baseline median), ``paired_ratio`` (per-round ratios), the latency-bound
``limit`` L / (L - pairs) and ``gain_fraction`` = (ratio - 1) / (limit - 1).
"""
