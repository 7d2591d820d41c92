"""``auto_pairs``: choose disjoint adjacent pairs that cost the least perplexity on a calibration text.

1. Single-pair damage: the calibration perplexity ratio of every pair (i, i+1) alone, against the original.
2. Beam search over *sets* (any disjoint pairs, not only contiguous runs): each step extends every set in the
   beam with one of its ``candidates`` cheapest compatible pairs (ranked by single damage), *evaluates each
   combined set for real* (damage is not additive: pairs interact), and keeps the ``beam`` best.
3. The best set at each depth forms the frontier (depth -> perplexity ratio); the choice is read off it.

Cost control: every evaluation resumes from cached hidden states — the parent set's residual stream at the new
pair's first layer (everything before it is unchanged) — so a pair near the top costs a few layers and the
head, not a full forward. Scores are cached per pair set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from layerpair.errors import InputError, MissingDependencyError
from layerpair.evaluation.forward import blocks_from_pairs, embed, head, run_block, window_context
from layerpair.evaluation.metrics import DEFAULT_BATCH, nll_of_logits
from layerpair.exporter.model import Decoder

Pair = tuple[int, int]
Pairs = tuple[Pair, ...]
MAX_BUDGET = 10.0  # +1000%: beyond this a "budget" no longer constrains anything


def parse_budget(text: str | float) -> float:
    """``"5%"`` / ``"0.05"`` / ``0.05`` -> 0.05; raises InputError outside (0, +1000%]."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise InputError(f"--max-ppl-increase '{text}' is not a number", "pass e.g. 5% or 0.05") from None
    if not (0 < value <= MAX_BUDGET):  # NaN fails too
        raise InputError(
            f"--max-ppl-increase {text} is out of range", f"pass a value in (0%, {MAX_BUDGET * 100:.0f}%], e.g. 5%"
        )
    return value


def check_target_depth(target: int, num_layers: int) -> None:
    lo = num_layers - num_layers // 2
    if not lo <= target < num_layers:
        raise InputError(
            f"--target-depth {target} is out of range for a {num_layers}-layer model",
            f"pass a depth in [{lo}, {num_layers - 1}] (each pair removes one layer of depth)",
        )


@dataclass
class FrontierPoint:
    depth: int
    pairs: Pairs
    ppl: float
    ratio: float


@dataclass
class SearchResult:
    pairs: Pairs  # the choice
    num_layers: int
    base_ppl: float
    frontier: list[FrontierPoint]
    singles: dict[Pair, float]  # single-pair perplexity ratio
    budget: float | None
    target_depth: int | None
    calib_tokens: int
    evaluations: int
    settings: dict[str, Any] = field(default_factory=dict)

    def point(self, depth: int) -> FrontierPoint | None:
        return next((p for p in self.frontier if p.depth == depth), None)

    def table(self) -> str:
        from layerpair.exporter.pairs import format_pairs

        lines = ["depth  ppl ratio  calib ppl  pairs", f"{self.num_layers:5d}  {1.0:9.3f}  {self.base_ppl:9.2f}  none"]
        for p in self.frontier:
            mark = "  <- chosen" if p.pairs == self.pairs else ""
            lines.append(f"{p.depth:5d}  {p.ratio:9.3f}  {p.ppl:9.2f}  {format_pairs(p.pairs)}{mark}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "pairs": [list(p) for p in self.pairs],
            "depth": self.num_layers - len(self.pairs),
            "base_ppl": self.base_ppl,
            "budget": self.budget,
            "target_depth": self.target_depth,
            "calib_tokens": self.calib_tokens,
            "evaluations": self.evaluations,
            "settings": self.settings,
            "frontier": [{**asdict(p), "pairs": [list(q) for q in p.pairs]} for p in self.frontier],
            "single_pair_ratio": {f"{a}-{b}": r for (a, b), r in sorted(self.singles.items())},
        }


OBJECTIVES = ("mean", "worst")  # how a pair set's score reduces over calibration sources (``groups``)


class Scorer:
    """Calibration NLL of pair sets, resuming from cached residual streams.

    ``groups`` (one source id per window, e.g. a text and generated samples) batches each source apart; with
    ``objective="worst"`` a set scores the base NLL plus the *largest* per-source NLL increase over the original
    (``set_base``), so ``exp(score - base)`` is the worst source's perplexity ratio. ``"mean"`` (the default)
    is the mean NLL over all windows, whatever the groups.
    """

    def __init__(
        self, dec: Decoder, windows: Tensor, batch: int, groups: Tensor | None = None, objective: str = "mean"
    ) -> None:
        if objective not in OBJECTIVES:
            raise InputError(f"search objective '{objective}' is unknown", f"use one of: {', '.join(OBJECTIVES)}")
        self.dec, self.windows, self.batch, self.objective = dec, windows, batch, objective
        self.L = dec.arch.num_layers
        self.cache: dict[Pairs, float] = {}
        self.evaluations = 0
        gid = torch.zeros(windows.shape[0], dtype=torch.long) if groups is None else groups.long()
        self.sizes = {int(g): int((gid == g).sum()) for g in torch.unique(gid)}
        self.chunks: list[Tensor] = []
        self.chunk_group: list[int] = []
        for g in self.sizes:
            part = windows[gid == g]
            self.chunks += [part[i : i + batch] for i in range(0, part.shape[0], batch)]
            self.chunk_group += [g] * -(-part.shape[0] // batch)
        self.ctx = [window_context(dec, *c.shape) for c in self.chunks]
        self.base_group: dict[int, float] | None = None

    def _score(self, totals: dict[int, float]) -> float:
        """Per-source NLL totals -> the objective (module docstring; ``set_base`` first for ``worst``)."""
        mean = sum(totals.values()) / self.windows.shape[0]
        if self.objective == "mean":
            return mean
        assert self.base_group is not None, "Scorer.set_base before a worst-source score"
        base_mean = sum(b * self.sizes[g] for g, b in self.base_group.items()) / self.windows.shape[0]
        return base_mean + max(totals[g] / self.sizes[g] - b for g, b in self.base_group.items())

    def states(self, pairs: Pairs) -> list[dict[int, Tensor]]:
        """Residual stream at every block boundary of ``pairs``, per chunk of windows."""
        out = []
        with torch.no_grad():
            for ids, c in zip(self.chunks, self.ctx, strict=True):
                x, st = embed(self.dec, ids), {}
                for block in blocks_from_pairs(self.L, pairs):
                    st[block[0]] = x
                    x = run_block(self.dec, block, x, c)
                st[self.L] = x
                out.append(st)
        return out

    def _totals(self, states: list[dict[int, Tensor]]) -> dict[int, float]:
        totals = dict.fromkeys(self.sizes, 0.0)
        with torch.no_grad():
            for ids, g, st in zip(self.chunks, self.chunk_group, states, strict=True):
                totals[g] += nll_of_logits(head(self.dec, st[self.L]), ids) * ids.shape[0]
        return totals

    def nll_from_states(self, states: list[dict[int, Tensor]]) -> float:
        """Mean NLL over all windows of the final states."""
        return sum(self._totals(states).values()) / self.windows.shape[0]

    def set_base(self, states: list[dict[int, Tensor]]) -> float:
        """Record the original model's per-source NLL (``states`` of no pairs); returns its score."""
        totals = self._totals(states)
        self.base_group = {g: t / self.sizes[g] for g, t in totals.items()}
        return self._score(totals)

    def nll(self, pairs: Pairs, parent: list[dict[int, Tensor]], start: int) -> float:
        """Score (``objective``) of ``pairs``, whose plan equals the parent's before layer ``start``."""
        key = tuple(sorted(pairs))
        if key not in self.cache:
            self.evaluations += 1
            totals = dict.fromkeys(self.sizes, 0.0)
            with torch.no_grad():
                for ids, c, g, st in zip(self.chunks, self.ctx, self.chunk_group, parent, strict=True):
                    x = st[start]
                    for block in blocks_from_pairs(self.L, key):
                        if block[0] >= start:
                            x = run_block(self.dec, block, x, c)
                    totals[g] += nll_of_logits(head(self.dec, x), ids) * ids.shape[0]
            self.cache[key] = self._score(totals)
        return self.cache[key]


def auto_pairs(
    dec: Decoder,
    calib_windows: Tensor,
    max_ppl_increase: float | None = None,
    target_depth: int | None = None,
    beam: int = 2,
    candidates: int = 4,
    batch: int = DEFAULT_BATCH,
    exclude: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
    groups: Tensor | None = None,
    objective: str = "mean",
) -> SearchResult:
    """Search pair sets on ``calib_windows`` [N,W]; choose by budget and/or target depth.

    * only ``max_ppl_increase`` (fraction, 0.05 = +5%): the deepest cut whose ratio stays within it;
    * only ``target_depth``: the best set found at that depth;
    * both: the set at ``target_depth``, which must be within the budget (else InputError naming the best ratio).

    ``groups``/``objective``: sources and the score's reduction over them (``Scorer``). ``dec.pairs`` is ignored.
    """
    L = dec.arch.num_layers
    _check_search_args(L, max_ppl_increase, target_depth, beam, candidates)
    say = progress or (lambda msg: None)
    sc = Scorer(dec, calib_windows, batch, groups, objective)
    base_states = sc.states(())
    base = sc.set_base(base_states)
    limit = math.inf if max_ppl_increase is None else math.log1p(max_ppl_increase)
    max_pairs = L // 2 if target_depth is None else L - target_depth
    say(f"single-pair damage on {calib_windows.numel()} calibration tokens ({L - 1} pairs)")
    allowed = [(i, i + 1) for i in range(L - 1) if i not in exclude and i + 1 not in exclude]
    singles = {p: math.exp(sc.nll((p,), base_states, p[0]) - base) for p in allowed}
    ranked = sorted(singles, key=singles.__getitem__)

    frontier: list[FrontierPoint] = []
    beam_sets: list[tuple[Pairs, list[dict[int, Tensor]]]] = [((), base_states)]
    for n in range(1, max_pairs + 1):
        scored = _extend_beam(sc, beam_sets, ranked, candidates)
        if not scored:
            break
        best = sorted(scored, key=scored.__getitem__)[:beam]
        frontier.append(FrontierPoint(L - n, best[0], math.exp(scored[best[0]]), math.exp(scored[best[0]] - base)))
        say(f"depth {L - n}: x{frontier[-1].ratio:.3f} with {len(best[0])} pairs ({sc.evaluations} evaluations)")
        if scored[best[0]] - base > limit and target_depth is None:
            break  # past the budget; deeper sets only get worse
        if n < max_pairs:
            beam_sets = [(k, sc.states(k)) for k in best]
    chosen = _choose(frontier, max_ppl_increase, target_depth, L)
    return SearchResult(
        pairs=chosen,
        num_layers=L,
        base_ppl=math.exp(base),
        frontier=frontier,
        singles=singles,
        budget=max_ppl_increase,
        target_depth=target_depth,
        calib_tokens=int(calib_windows.numel()),
        evaluations=sc.evaluations,
        settings=_settings(beam, candidates, calib_windows, sc, groups is not None),
    )


def _settings(beam: int, candidates: int, windows: Tensor, sc: Scorer, grouped: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"beam": beam, "candidates": candidates, "window": int(windows.shape[1])}
    return out | ({"objective": sc.objective, "sources": len(sc.sizes)} if grouped else {})


def _check_search_args(
    L: int, max_ppl_increase: float | None, target_depth: int | None, beam: int, candidates: int
) -> None:
    """``auto_pairs``' arguments, checked before any forward pass (each failure an InputError naming the fix)."""
    if max_ppl_increase is None and target_depth is None:
        raise InputError("--pairs auto needs a budget or a depth", "add --max-ppl-increase 5% and/or --target-depth N")
    if max_ppl_increase is not None and not (0 < max_ppl_increase <= MAX_BUDGET):
        raise InputError(f"max_ppl_increase {max_ppl_increase} is out of range", "pass a fraction in (0, 10]")
    if target_depth is not None:
        check_target_depth(target_depth, L)
    if beam < 1 or candidates < 1:
        raise InputError("beam and candidates must be >= 1", "pass e.g. --beam 2")


def _extend_beam(
    sc: Scorer, beam_sets: list[tuple[Pairs, list[dict[int, Tensor]]]], ranked: list[tuple[int, int]], candidates: int
) -> dict[Pairs, float]:
    """One more pair on every beam set: its ``candidates`` best-ranked (by single-pair damage) disjoint
    extensions, each scored once (mean calibration NLL) from its parent's cached hidden states."""
    scored: dict[Pairs, float] = {}
    for s, states in beam_sets:
        used = {layer for p in s for layer in p}
        ext = [p for p in ranked if p[0] not in used and p[1] not in used][:candidates]
        for p in ext:
            key = tuple(sorted((*s, p)))
            if key not in scored:
                scored[key] = sc.nll(key, states, p[0])
    return scored


def best_contiguous(
    dec: Decoder, calib_windows: Tensor, max_pairs: int, batch: int = DEFAULT_BATCH
) -> list[FrontierPoint]:
    """For n = 1..max_pairs: the contiguous range S:S+2n with the lowest calibration perplexity (the baseline
    ``auto`` must beat). Ratios are against the original model on the same windows."""
    L = dec.arch.num_layers
    sc = Scorer(dec, calib_windows, batch)
    base_states = sc.states(())
    base = sc.nll_from_states(base_states)
    out = []
    for n in range(1, max_pairs + 1):
        runs = {tuple((i, i + 1) for i in range(s, s + 2 * n, 2)): s for s in range(0, L - 2 * n + 1)}
        nll = {k: sc.nll(k, base_states, s) for k, s in runs.items()}
        k = min(nll, key=nll.__getitem__)
        out.append(FrontierPoint(L - n, k, math.exp(nll[k]), math.exp(nll[k] - base)))
    return out


def _choose(frontier: list[FrontierPoint], budget: float | None, target: int | None, L: int) -> Pairs:
    if target is not None:
        pt = next((p for p in frontier if p.depth == target), None)
        if pt is None:
            raise InputError(f"the search found no set at depth {target}", "pass a larger --target-depth")
        if budget is not None and pt.ratio > 1 + budget:
            raise InputError(
                f"no pair set found reaches depth {target} within +{budget * 100:g}% perplexity "
                f"(best found: x{pt.ratio:.3f})",
                "raise --max-ppl-increase or --target-depth",
            )
        return pt.pairs
    assert budget is not None  # checked by auto_pairs
    ok = [p for p in frontier if p.ratio <= 1 + budget]
    if not ok:
        best = min((p.ratio for p in frontier), default=math.inf)
        raise InputError(
            f"no single pair stays within +{budget * 100:g}% perplexity (cheapest: x{best:.3f})",
            "raise --max-ppl-increase",
        )
    return min(ok, key=lambda p: p.depth).pairs


def save_frontier_plot(
    result: SearchResult, path: Path, extra: dict[str, Sequence[tuple[int, float]]] | None = None
) -> None:
    """PNG of depth -> perplexity ratio (log scale) for the frontier, plus optional extra curves."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            "--plot needs matplotlib", "pip install matplotlib==3.10.8 (or the project's [eval] extra)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    pts = [(result.num_layers, 1.0)] + [(p.depth, p.ratio) for p in result.frontier]
    ax.plot([d for d, _ in pts], [r for _, r in pts], "o-", label="auto (search frontier)")
    for name, curve in (extra or {}).items():
        ax.plot([d for d, _ in curve], [r for _, r in curve], "s--", label=name)
    chosen = result.num_layers - len(result.pairs)
    pt = result.point(chosen)
    if pt is not None:
        ax.plot([chosen], [pt.ratio], "r*", markersize=14, label=f"chosen (depth {chosen})")
    ax.set_xlabel("depth (layers after pairing)")
    ax.set_ylabel("perplexity ratio vs original")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(f"calibration: {result.calib_tokens} tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
