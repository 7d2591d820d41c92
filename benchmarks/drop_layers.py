"""A control for decode-speed comparisons: a Hugging Face checkpoint with some layers removed outright.

    python -m benchmarks.drop_layers SRC DST --drop 21,23

Why: a layer-parallel pair keeps both layers' weights and FLOPs; it removes only one layer's worth of small
kernels. A checkpoint with the second layer of each pair deleted has the merged model's depth and node count
but fewer weight bytes, so decoding the two side by side (``benchmarks.ort_decode``) separates what depth costs
from what the weights cost on a device (issue 16: on a bandwidth-bound CPU only the second moves decode time).
The result is a worse language model (nothing heals it): it is a timing control, never a product.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def drop_layers(src: Path, dst: Path, drop: Sequence[int]) -> int:
    """Write ``src`` (a Llama-family HF directory) to ``dst`` without the layers ``drop``; returns the new depth.
    Raises ``ValueError`` for a layer index the model does not have."""
    import torch
    import transformers

    model: Any = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    depth = model.config.num_hidden_layers
    bad = sorted(i for i in drop if not 0 <= i < depth)
    if bad or len(set(drop)) >= depth:
        raise ValueError(f"cannot drop layers {bad or sorted(drop)} of a {depth}-layer model")
    keep = [i for i in range(depth) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    model.save_pretrained(dst)
    if (src / "tokenizer_config.json").is_file():  # the exporter's validation tokenizes its prompts
        transformers.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return len(keep)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.drop_layers", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="a Hugging Face checkpoint directory (benchmarks.anchors.prepare_checkpoint)")
    p.add_argument("dst", type=Path)
    p.add_argument("--drop", required=True, help="comma-separated layer indices, e.g. 21,23")
    args = p.parse_args(argv)
    depth = drop_layers(args.src, args.dst, [int(i) for i in args.drop.split(",")])
    print(f"wrote {args.dst}: {depth} layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
