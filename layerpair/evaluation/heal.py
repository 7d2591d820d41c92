"""Training-free healing: a closed-form least-squares refit of each pair's output projections, folded into
the weights, so the parallel pair reproduces the sequential pair it replaces.

For a pair (a, b) on input x, the original (sequential) layers compute::

    h1 = x + A_a(x);  y1 = h1 + M_a(h1);  h2 = y1 + A_b(y1);  y = h2 + M_b(h2)

and the parallel pair ``h = x + A_a(x) + A_b(x); y' = h + M_a(h) + M_b(h)``. Both stages end in a linear map
whose input the pair computes anyway, so two ridge regressions on calibration activations fix them:

1. attention: ``[ctx_a(x), ctx_b(x)] @ [Wo_a; Wo_b] ≈ A_a(x) + A_b(y1)`` (the attention contributions of the
   sequential pair), ctx = the attention output before o_proj;
2. MLP, on the refitted h: ``[act_a(h), act_b(h)] @ [Wd_a; Wd_b] ≈ target - h`` where act = silu(gate)·up and
   target is y (``target="local"``: the sequential pair on the same input) or the original model's residual
   stream after layer b (``target="global"``: also absorbs drift from earlier pairs).

Ridge toward the original weights, ``W = (FᵀF + λI)⁻¹(FᵀT + λW0)`` with ``λ = damping · mean(diag FᵀF)``,
keeps the fit well posed when features outnumber calibration tokens. By default (``damping=None``) each of the
two fits of each pair chooses its damping from ``DAMPING_GRID`` by the residual on held-out calibration windows
(every ``HOLDOUT_EVERY``-th window, the last one when there are fewer), then refits on all windows with it; a
calibration of one window falls back on ``DEFAULT_DAMPING``. Inputs x come from the *already healed* LP model
(pairs are healed in layer order), so each fit sees the activations it will see at run time.

``refit_inputs`` (issue 15, lever 4; off by default) also refits, before the two fits above, the *input*
projections the parallel pair feeds a different residual than the sequential one: layer b's q/k/v read
``N_b(x)`` instead of ``N_b(y1)``, so ``N_b(x) @ W' ≈ N_b(y1) @ W`` (the sequential pre-activations; q/k are
taken before rotary, so the fit is exact in form), and, after the o_proj fit, b's gate/up read ``N'_b(h)``
instead of ``N'_b(h2)`` (``h2 = y1 + A_b(y1)``); ``"ab"`` also fits a's gate/up (``N'_a(h)`` for ``N'_a(x +
A_a(x))``). Each projection is its own ridge fit toward the original weights, its damping chosen as above.

The result is an ordinary Decoder with different projection values: export, merge and validation treat
it like any other checkpoint, and the wide layer costs nothing more at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from layerpair.errors import InputError
from layerpair.evaluation.forward import (
    WindowContext,
    attention,
    attn_ctx,
    blocks_from_pairs,
    embed,
    run_block,
    window_context,
)
from layerpair.evaluation.metrics import DEFAULT_BATCH
from layerpair.exporter.model import Decoder, Layer

DEFAULT_DAMPING = 1e-2  # a fixed damping: the fallback of the automatic choice (and the default before it)
DAMPING_GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)  # the automatic choice's candidates (docs/accuracy.md)
HOLDOUT_EVERY = 8  # every 8th calibration window is held out to choose the damping
Pairs = tuple[tuple[int, int], ...]
TARGETS = ("local", "global")
INPUT_REFITS = ("b", "ab")  # refit_inputs: layer b's q/k/v and gate/up; also layer a's gate/up
#: ``--heal``'s default ``refit_inputs`` (``heal_pairs`` itself defaults to none, for the documented studies):
#: SmolLM2 held-out pydoc/news/legal improved at depth 24 (x1.186/x1.308/x1.223 -> x1.159/x1.234/x1.142) and at
#: depth 22 (x1.322/x1.422/x1.363 -> x1.274/x1.321/x1.229), docs/accuracy.md "Levers (continued)".
DEFAULT_INPUT_REFIT = "ab"


def refit_inputs_flag(choice: str) -> str | None:
    """``--heal-inputs`` none|b|ab -> ``heal_pairs``' ``refit_inputs`` (None for none)."""
    return None if choice == "none" else choice


@dataclass
class HealReport:
    pairs: list[list[int]]
    damping: float | None  # None: chosen per fit on held-out calibration windows (``chosen_damping``)
    target: str
    calib_tokens: int
    chosen_damping: dict[str, tuple[float, float]] = field(default_factory=dict)  # pair -> (attention, MLP)
    # per pair: relative residual ||F W - T|| / ||T|| before (original weights) and after the refit
    attn_rel_err: dict[str, tuple[float, float]] = field(default_factory=dict)
    mlp_rel_err: dict[str, tuple[float, float]] = field(default_factory=dict)
    refit_inputs: str | None = None
    input_damping: dict[str, dict[str, float]] = field(default_factory=dict)  # pair -> {"b.q_proj": damping, ...}

    def to_json(self) -> dict[str, Any]:
        extra = (
            {}
            if self.refit_inputs is None
            else {"refit_inputs": self.refit_inputs, "input_damping": self.input_damping}
        )
        inputs = "" if self.refit_inputs is None else f" (and the input projections of '{self.refit_inputs}')"
        return extra | {
            "method": f"ridge refit of o_proj and down_proj{inputs} per pair (closed form, folded into the weights)",
            "pairs": self.pairs,
            "damping": "auto" if self.damping is None else self.damping,
            "damping_grid": list(DAMPING_GRID) if self.damping is None else None,
            "chosen_damping": self.chosen_damping,
            "target": self.target,
            "calib_tokens": self.calib_tokens,
            "attn_rel_err_before_after": self.attn_rel_err,
            "mlp_rel_err_before_after": self.mlp_rel_err,
        }


class Normal:
    """Accumulates FᵀF, FᵀT and TᵀT in float64 across chunks of calibration tokens."""

    def __init__(self) -> None:
        self.G: Tensor | None = None
        self.C: Tensor | None = None
        self.tt = 0.0

    def add(self, F_ND: Tensor, T_NH: Tensor) -> None:
        f, t = F_ND.reshape(-1, F_ND.shape[-1]).double(), T_NH.reshape(-1, T_NH.shape[-1]).double()
        g, c = f.t() @ f, f.t() @ t
        self.G = g if self.G is None else self.G + g
        self.C = c if self.C is None else self.C + c
        self.tt += float((t * t).sum())

    def solve(self, W0: Tensor, damping: float) -> tuple[Tensor, float, float]:
        """Ridge solution toward W0; returns (W, relative residual with W0, relative residual with W)."""
        assert self.G is not None and self.C is not None
        G, C, w0 = self.G, self.C, W0.double()
        lam = damping * float(G.diagonal().mean())
        W = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), C + lam * w0)

        def rel(w: Tensor) -> float:  # ||FW - T||² = wᵀGw - 2 tr(wᵀC) + TᵀT
            r = float((w * (G @ w)).sum() - 2 * (w * C).sum()) + self.tt
            return (max(r, 0.0) / max(self.tt, 1e-30)) ** 0.5

        return W.to(W0.dtype), rel(w0), rel(W)

    def sq_residual(self, W: Tensor) -> float:
        """||FW - T||² over the accumulated tokens."""
        assert self.G is not None and self.C is not None
        w = W.double()
        return float((w * (self.G @ w)).sum() - 2 * (w * self.C).sum()) + self.tt

    def __iadd__(self, other: Normal) -> Normal:
        assert other.G is not None and other.C is not None
        self.G = other.G if self.G is None else self.G + other.G
        self.C = other.C if self.C is None else self.C + other.C
        self.tt += other.tt
        return self


def _solve(fit: Normal, held: Normal, W0: Tensor, damping: float | None) -> tuple[Tensor, float, float, float]:
    """(W, damping used, rel err before, after) on all tokens. ``damping=None``: the DAMPING_GRID value whose
    fit on ``fit`` leaves the least residual on ``held`` (DEFAULT_DAMPING when nothing is held out)."""
    if damping is None:
        if held.G is None:
            damping = DEFAULT_DAMPING
        else:
            damping = min(DAMPING_GRID, key=lambda d: held.sq_residual(fit.solve(W0, d)[0]))
            fit += held
    W, before, after = fit.solve(W0, damping)
    return W, damping, before, after


def mlp_act(layer: Layer, h: Tensor) -> Tensor:
    """silu(gate) * up of the MLP on its normed input: the features of down_proj [B,W,I]."""
    m: Any = layer.mlp
    x = layer.post_attention_layernorm(h)
    g, u = x @ m.gate_proj, x @ m.up_proj
    if m.gate_bias is not None and m.up_bias is not None:
        g, u = g + m.gate_bias, u + m.up_bias
    return F.silu(g) * u


def heal_pairs(
    dec: Decoder,
    pairs: Sequence[tuple[int, int]],
    calib_windows: Tensor,
    damping: float | None = None,
    target: str = "local",
    batch: int = DEFAULT_BATCH,
    progress: Callable[[str], None] | None = None,
    refit_inputs: str | None = None,
) -> tuple[Decoder, HealReport]:
    """A new Decoder with ``pairs`` whose pair o_proj/down_proj are refitted on ``calib_windows`` [N,W]; ``damping``
    None chooses it per fit on held-out windows; ``refit_inputs`` "b"/"ab" also refits input projections
    (module docstring; local target only).

    ``dec`` holds the original weights (its own pairs are ignored) and is not modified.
    """
    if target not in TARGETS:
        raise InputError(f"heal target '{target}' is unknown", f"use one of: {', '.join(TARGETS)}")
    if damping is not None and not damping > 0:
        raise InputError(f"heal damping must be positive, got {damping}", "pass e.g. 1e-2")
    if refit_inputs is not None and (refit_inputs not in INPUT_REFITS or target != "local"):
        raise InputError(
            f"refit_inputs '{refit_inputs}' needs target 'local'", f"use one of: {', '.join(INPUT_REFITS)}"
        )
    say = progress or (lambda msg: None)
    pairs = tuple(sorted(pairs))
    healed = copy_with_pairs(dec, pairs)
    report = HealReport(
        [list(p) for p in pairs], damping, target, int(calib_windows.numel()), refit_inputs=refit_inputs
    )
    if not pairs:
        return healed, report
    new: Any = healed.layers
    chunks, held = _chunks(calib_windows, batch, damping is None)
    ctxs = [window_context(dec, *c.shape) for c in chunks]
    with torch.no_grad():
        xs = [embed(healed, ids) for ids in chunks]  # LP residual stream, per chunk
        x_orig = [embed(dec, ids) for ids in chunks]  # original stream (global target only)
        done = 0
        for block in blocks_from_pairs(dec.arch.num_layers, pairs):
            if target == "global":  # advance the original stream through this block's layers, sequentially
                for i in block:
                    x_orig = [run_block(dec, (i,), x, c) for x, c in zip(x_orig, ctxs, strict=True)]
            if len(block) == 2:
                a, b = block
                ys_a = [run_block(dec, (a,), x, c) for x, c in zip(xs, ctxs, strict=True)]
                fits = _Fits(xs, ctxs, held, damping, ys_a)
                _heal_pair(dec, a, b, new, fits, x_orig if target == "global" else None, report)
                done += 1
                say(f"healed pair {a}-{b} ({done}/{len(pairs)}): {_pair_line(report, f'{a}-{b}')}")
            xs = [run_block(healed, block, x, c) for x, c in zip(xs, ctxs, strict=True)]
    return healed, report


def _heal_pair(
    dec: Decoder, a: int, b: int, new: Any, fits: _Fits, global_targets: list[Tensor] | None, report: HealReport
) -> None:
    """Every fit of pair (a, b) in order, written into ``new[a]``/``new[b]`` and recorded in ``report``."""
    key = f"{a}-{b}"
    if report.refit_inputs is not None:
        report.input_damping[key] = _refit_qkv(dec, b, new[b], fits)
    ctx_ab, d_attn, report.attn_rel_err[key] = _refit_o_proj(dec, a, b, new[a], new[b], fits)
    if report.refit_inputs is not None:
        report.input_damping[key] |= _refit_gate_up(dec, a, b, new, fits, ctx_ab, "a" in report.refit_inputs)
    d_mlp, before, after = _refit_down_proj(dec, a, b, new[a], new[b], fits, ctx_ab, global_targets)
    report.mlp_rel_err[key] = (before, after)
    report.chosen_damping[key] = (d_attn, d_mlp)


def _pair_line(report: HealReport, key: str) -> str:
    (ab, aa), (mb, ma) = report.attn_rel_err[key], report.mlp_rel_err[key]
    d_attn, d_mlp = report.chosen_damping[key]
    line = (
        f"relative residual, attention {ab:.3f} -> {aa:.3f} (damping {d_attn:g}), "
        f"MLP {mb:.3f} -> {ma:.3f} (damping {d_mlp:g})"
    )
    inputs = report.input_damping.get(key)
    return line if inputs is None else line + "; inputs " + ", ".join(f"{k} {d:g}" for k, d in inputs.items())


def _chunks(windows: Tensor, batch: int, hold_out: bool) -> tuple[list[Tensor], list[bool]]:
    """Batches of calibration windows and whether each is held out (to choose the damping): with ``hold_out``,
    every HOLDOUT_EVERY-th window (the last one when there are fewer), batched apart from the rest."""
    n = windows.shape[0]
    idx = torch.arange(n)
    is_held = (idx % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) if n >= HOLDOUT_EVERY else (idx == n - 1)
    if not hold_out or n < 2:
        is_held = torch.zeros(n, dtype=torch.bool)
    out: list[Tensor] = []
    flags: list[bool] = []
    for flag in (False, True):
        part = windows[is_held == flag]
        out += [part[i : i + batch] for i in range(0, part.shape[0], batch)]
        flags += [flag] * -(-part.shape[0] // batch)
    return out, flags


@dataclass
class _Fits:
    """What every fit of a pair reads: the LP stream and masks per batch, which batches are held out, the damping,
    and the original layer a on each batch of the LP stream (the sequential pair's ``y1``, computed once)."""

    xs: list[Tensor]
    ctxs: list[WindowContext]
    held: list[bool]
    damping: float | None
    ys_a: list[Tensor]

    def normals(self) -> tuple[Normal, Normal]:
        return Normal(), Normal()


def copy_with_pairs(dec: Decoder, pairs: Pairs) -> Decoder:
    """A Decoder running ``pairs`` with its own copy of ``dec``'s weights (healing rewrites them in place)."""
    healed = Decoder(dec.arch, pairs)
    src = dict(dec.named_parameters())
    for name, p in healed.named_parameters():  # copies keep the source dtype; rotary inv_freq stays fp32
        p.data = src[name].detach().clone()
    return healed.eval()


def _refit_o_proj(
    dec: Decoder, a: int, b: int, na: Layer, nb: Layer, fits: _Fits
) -> tuple[list[tuple[Tensor, Tensor]], float, tuple[float, float]]:
    """Stage 1: ``[ctx_a(x), ctx_b(x)] @ [Wo_a; Wo_b] ≈ A_a(x) + A_b(y1)`` (the sequential pair's attention
    contributions, o_proj biases taken out), fitted on the LP stream ``xs`` and written into ``na``/``nb``.
    Returns each chunk's contexts (ctx_a, ctx_b) [B,W,H*D], which stage 2 reuses, the damping used and
    (rel err before, after)."""
    orig: Any = dec.layers
    la, lb = orig[a], orig[b]
    fit, held = fits.normals()
    feats: list[tuple[Tensor, Tensor]] = []
    for x, y1, c, is_held in zip(fits.xs, fits.ys_a, fits.ctxs, fits.held, strict=True):
        ca = attn_ctx(na, na.input_layernorm(x), c, dec.arch.window(a))
        cb = attn_ctx(nb, nb.input_layernorm(x), c, dec.arch.window(b))
        seq_attn = attention(la, x, c, dec.arch.window(a)) + attention(lb, y1, c, dec.arch.window(b))
        (held if is_held else fit).add(torch.cat([ca, cb], -1), seq_attn - o_bias(na) - o_bias(nb))
        feats.append((ca, cb))
    q = feats[-1][0].shape[-1]
    W0 = torch.cat([na.self_attn.o_proj, nb.self_attn.o_proj], 0)
    W, damping, before, after = _solve(fit, held, W0, fits.damping)
    na.self_attn.o_proj.data, nb.self_attn.o_proj.data = W[:q].contiguous(), W[q:].contiguous()
    return feats, damping, (before, after)


def _refit_projections(
    module: Any, names: Sequence[str], xs_new: list[Tensor], xs_seq: list[Tensor], fits: _Fits, tag: str
) -> dict[str, float]:
    """Ridge refit of each ``module.<name>`` ([in,out], bias untouched) so ``xs_new @ W' ≈ xs_seq @ W``: the
    pre-activations the sequential pair computes, on the input the parallel pair gives. Returns the dampings."""
    out: dict[str, float] = {}
    for name in names:
        W0 = getattr(module, name)
        fit, held = fits.normals()
        for xn, xq, is_held in zip(xs_new, xs_seq, fits.held, strict=True):
            (held if is_held else fit).add(xn, xq @ W0)
        W, out[f"{tag}.{name}"], _, _ = _solve(fit, held, W0, fits.damping)
        W0.data = W.contiguous()
    return out


def _refit_qkv(dec: Decoder, b: int, nb: Layer, fits: _Fits) -> dict[str, float]:
    """Layer b's q/k/v on ``N_b(x)`` toward their sequential pre-activations on ``N_b(y1)``."""
    lb: Any = dec.layers[b]
    xs_new = [nb.input_layernorm(x) for x in fits.xs]
    xs_seq = [lb.input_layernorm(y1) for y1 in fits.ys_a]
    return _refit_projections(nb.self_attn, ("q_proj", "k_proj", "v_proj"), xs_new, xs_seq, fits, "b")


def _refit_gate_up(
    dec: Decoder, a: int, b: int, new: Any, fits: _Fits, feats: list[tuple[Tensor, Tensor]], also_a: bool
) -> dict[str, float]:
    """Layer b's (and with ``also_a`` layer a's) gate/up on the refitted h toward their sequential
    pre-activations: b's on ``N'_b(y1 + A_b(y1))``, a's on ``N'_a(x + A_a(x))``."""
    orig: Any = dec.layers
    na, nb, w = new[a], new[b], dec.arch.window
    hs = [_post_attention(x, ca, cb, na, nb) for x, (ca, cb) in zip(fits.xs, feats, strict=True)]
    seq_b, seq_a = [], []
    for x, y1, c in zip(fits.xs, fits.ys_a, fits.ctxs, strict=True):
        seq_b.append(orig[b].post_attention_layernorm(y1 + attention(orig[b], y1, c, w(b))))
        if also_a:
            seq_a.append(orig[a].post_attention_layernorm(x + attention(orig[a], x, c, w(a))))
    names = ("gate_proj", "up_proj")
    out = _refit_projections(nb.mlp, names, [nb.post_attention_layernorm(h) for h in hs], seq_b, fits, "b")
    if also_a:
        out |= _refit_projections(na.mlp, names, [na.post_attention_layernorm(h) for h in hs], seq_a, fits, "a")
    return out


def _post_attention(x: Tensor, ca: Tensor, cb: Tensor, na: Layer, nb: Layer) -> Tensor:
    """The parallel pair's residual after both attentions: ``h = x + o_a(ctx_a) + o_b(ctx_b)``."""
    return x + ca @ na.self_attn.o_proj + cb @ nb.self_attn.o_proj + o_bias(na) + o_bias(nb)


def _refit_down_proj(
    dec: Decoder,
    a: int,
    b: int,
    na: Layer,
    nb: Layer,
    fits: _Fits,
    feats: list[tuple[Tensor, Tensor]],
    global_targets: list[Tensor] | None,
) -> tuple[float, float, float]:
    """Stage 2, on the h of the refitted o_proj: ``[act_a(h), act_b(h)] @ [Wd_a; Wd_b] ≈ target - h`` (down_proj
    biases taken out), written into ``na``/``nb``. The target is the sequential pair on the same input, or with
    ``global_targets`` the original model's stream after layer b. Returns (damping used, rel err before, after)."""
    fit, held = fits.normals()
    for k, (x, y1, c, is_held) in enumerate(zip(fits.xs, fits.ys_a, fits.ctxs, fits.held, strict=True)):
        h = _post_attention(x, *feats[k], na, nb)
        tgt = run_block(dec, (b,), y1, c) if global_targets is None else global_targets[k]
        (held if is_held else fit).add(
            torch.cat([mlp_act(na, h), mlp_act(nb, h)], -1), tgt - h - down_bias(na) - down_bias(nb)
        )
    i_dim = dec.arch.intermediate_size
    W0 = torch.cat([na.mlp.down_proj, nb.mlp.down_proj], 0)
    W, damping, before, after = _solve(fit, held, W0, fits.damping)
    na.mlp.down_proj.data, nb.mlp.down_proj.data = W[:i_dim].contiguous(), W[i_dim:].contiguous()
    return damping, before, after


def o_bias(layer: Layer) -> Tensor | float:
    b = layer.self_attn.o_bias
    return 0.0 if b is None else b


def down_bias(layer: Layer) -> Tensor | float:
    b = layer.mlp.down_bias
    return 0.0 if b is None else b
