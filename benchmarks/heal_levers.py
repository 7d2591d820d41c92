"""Issue 15, levers 3/4: healing variants at depth 24 on the docs' pairs, healed on generated samples.

Every variant heals the study's depth-24 pairs (``4-5,6-7,14-15,21-22,24-25,26-27``) on the 64 x 256 tokens
sampled from the model itself (``layerpair.evaluation.generated``, seed 0) and is scored on the first 4096 tokens
of pydoc topics, news and legal prose (``benchmarks.calib_transfer.HELD_OUT``). A re-implementation of
``layerpair.evaluation.heal.heal_pairs``' two ridge fits per pair with the variants as switches:

* ``local``: heal_pairs as it was (inputs from the already-healed LP model, local target, damping 1e-2);
* ``global``: both fits target the original model's stream (attention: its residual after layer a's
  attention and b's; MLP: after layer b) instead of the sequential pair on the LP input;
* ``orig-inputs``: features and local targets on the *original* model's stream (not sequential);
* ``val-damping``: damping per fit from 1e-3..0.3 by the residual on held-out calibration batches (every 8th
  batch of 4 windows), then refit on all (heal_pairs' default now, with every 8th *window* held out);
* ``val-wide``: the same over 1e-3..3;  ``fixed-0.3``: damping 0.3 for every fit.

    python -m benchmarks.heal_levers val-damping,global,orig-inputs --json levers.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.calib_transfer import HELD_OUT, STUDY_PAIRS_24
from layerpair.evaluation import heal as H
from layerpair.evaluation.data import default_text, encoder, read_text, windows_from_tokens
from layerpair.evaluation.forward import (
    WindowContext,
    attention,
    attn_ctx,
    blocks_from_pairs,
    embed,
    run_block,
    window_context,
)
from layerpair.evaluation.generated import GenSpec, bos_id, generated_windows
from layerpair.evaluation.metrics import TorchBackend, text_metrics_many
from layerpair.exporter.model import Decoder
from layerpair.exporter.pairs import parse_pairs

GRID = H.DAMPING_GRID  # heal_pairs' own candidates
VARIANTS: dict[str, dict[str, Any]] = {
    "local": {},
    "global": {"target": "global"},
    "orig-inputs": {"inputs": "orig"},
    "val-damping": {"grid": GRID},
    "val-wide": {"grid": (*GRID, 1.0, 3.0)},
    "fixed-0.3": {"damping": 0.3},
}


class Variant:
    def __init__(self, target: str = "local", inputs: str = "lp", damping: float = 1e-2, grid: tuple = ()) -> None:
        self.target, self.inputs, self.damping, self.grid = target, inputs, damping, grid

    def solve(self, fit: H.Normal, held: H.Normal, W0: Tensor) -> tuple[Tensor, float]:
        lam = self.damping
        if self.grid:
            lam = min(self.grid, key=lambda d: held.sq_residual(fit.solve(W0, d)[0]))
        if held.G is not None:
            fit += held
        return fit.solve(W0, lam)[0], lam


def _fit_pair(
    dec: Decoder, v: Variant, a: int, b: int, new: Any, xin: list[Tensor], xo: list[Tensor], ctxs: list[WindowContext]
) -> tuple[float, float]:
    """Both ridge fits of pair (a, b), written into ``new``; returns the dampings used."""
    orig: Any = dec.layers
    na, nb, w = new[a], new[b], dec.arch.window
    fit, held = H.Normal(), H.Normal()
    feats = []
    for k, (x, c) in enumerate(zip(xin, ctxs, strict=True)):
        ca, cb = attn_ctx(na, na.input_layernorm(x), c, w(a)), attn_ctx(nb, nb.input_layernorm(x), c, w(b))
        base = xo[k] if v.target == "global" else x
        y1 = run_block(dec, (a,), base, c)
        seq = attention(orig[a], base, c, w(a)) + attention(orig[b], y1, c, w(b))
        if v.target == "global":  # the original stream's attention state, as a correction of the LP input
            seq = seq + base - x
        (held if v.grid and k % 8 == 7 else fit).add(torch.cat([ca, cb], -1), seq - H.o_bias(na) - H.o_bias(nb))
        feats.append((ca, cb))
    q = feats[-1][0].shape[-1]
    W, lam1 = v.solve(fit, held, torch.cat([na.self_attn.o_proj, nb.self_attn.o_proj], 0))
    na.self_attn.o_proj.data, nb.self_attn.o_proj.data = W[:q].contiguous(), W[q:].contiguous()
    fit, held = H.Normal(), H.Normal()
    for k, (x, c) in enumerate(zip(xin, ctxs, strict=True)):
        ca, cb = feats[k]
        h = x + ca @ na.self_attn.o_proj + cb @ nb.self_attn.o_proj + H.o_bias(na) + H.o_bias(nb)
        tgt = run_block(dec, (b,), run_block(dec, (a,), xo[k] if v.target == "global" else x, c), c)
        act = torch.cat([H.mlp_act(na, h), H.mlp_act(nb, h)], -1)
        (held if v.grid and k % 8 == 7 else fit).add(act, tgt - h - H.down_bias(na) - H.down_bias(nb))
    i_dim = dec.arch.intermediate_size
    W, lam2 = v.solve(fit, held, torch.cat([na.mlp.down_proj, nb.mlp.down_proj], 0))
    na.mlp.down_proj.data, nb.mlp.down_proj.data = W[:i_dim].contiguous(), W[i_dim:].contiguous()
    return lam1, lam2


def heal(dec: Decoder, pairs: Sequence[tuple[int, int]], calib: Tensor, v: Variant) -> tuple[Decoder, dict]:
    pairs = tuple(sorted(pairs))
    healed = H.copy_with_pairs(dec, pairs)
    chunks = [calib[i : i + 4] for i in range(0, calib.shape[0], 4)]
    ctxs = [window_context(dec, *c.shape) for c in chunks]
    chosen = {}
    with torch.no_grad():
        xs = [embed(healed, ids) for ids in chunks]  # the healed LP model's stream
        xo = [embed(dec, ids) for ids in chunks]  # the original model's stream
        for block in blocks_from_pairs(dec.arch.num_layers, pairs):
            if len(block) == 2:
                a, b = block
                lams = _fit_pair(dec, v, a, b, healed.layers, xs if v.inputs == "lp" else xo, xo, ctxs)
                chosen[f"{a}-{b}"] = lams
            xs = [run_block(healed, block, x, c) for x, c in zip(xs, ctxs, strict=True)]
            for i in block:  # the original runs the pair's layers one after the other
                xo = [run_block(dec, (i,), x, c) for x, c in zip(xo, ctxs, strict=True)]
    return healed, chosen


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.heal_levers")
    p.add_argument("variants", help=f"comma-separated: {','.join(VARIANTS)}")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from layerpair.exporter.loading import load_checkpoint

    t0 = time.perf_counter()

    def say(m: str) -> None:
        print(f"[levers {time.perf_counter() - t0:6.0f} s] {m}", file=sys.stderr, flush=True)

    ck = load_checkpoint("smollm2-135m", say)
    dec, enc = ck.decoder(()), encoder(ck.tokenizer)
    texts = {k: default_text() if f is None else read_text(f) for k, f in HELD_OUT.items()}
    evs = {k: windows_from_tokens(enc(t), 512, 4096) for k, t in texts.items()}
    gen, _ = generated_windows(dec, bos_id(ck.tokenizer, enc), enc, GenSpec(), say)
    pairs, ref, res = parse_pairs(STUDY_PAIRS_24, dec.arch.num_layers), TorchBackend(dec, ()), {}
    for name in a.variants.split(","):
        t = time.perf_counter()
        healed, chosen = heal(dec, pairs, gen, Variant(**VARIANTS[name]))
        res[name] = {"heal_seconds": round(time.perf_counter() - t, 1), "damping": chosen}
        for dom, ev in evs.items():
            (m,) = text_metrics_many([TorchBackend(healed)], ev, ref)
            res[name][dom] = {"ratio": m.ppl_ratio, "kl": m.kl, "top1": m.top1}
            say(f"{name} {dom}: x{m.ppl_ratio:.3f} KL {m.kl:.3f}")
            a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
