"""``auto_pairs`` on a tiny model: exact scores despite the caching, optimal under exhaustive settings,
budget/depth rules and bad inputs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from layerpair.errors import InputError
from layerpair.evaluation.metrics import TorchBackend, text_metrics
from layerpair.evaluation.search import (
    auto_pairs,
    best_contiguous,
    check_target_depth,
    parse_budget,
    save_frontier_plot,
)
from layerpair.exporter.model import Decoder
from tests.evaluation.conftest import sample_text


@pytest.fixture(scope="module")
def calib(tiny_llama: Decoder) -> torch.Tensor:
    """Text sampled from the original model itself: the original is near-optimal on it, so pairs hurt (on random
    tokens a pair is as likely to help as to hurt, and budget rules could not be tested)."""
    return sample_text(tiny_llama, 3, 24, seed=7)


def _ratio(dec: Decoder, pairs: tuple[tuple[int, int], ...], w: torch.Tensor) -> float:
    r = text_metrics(TorchBackend(dec, pairs), w, ref=TorchBackend(dec, ())).ppl_ratio
    assert r is not None
    return r


def test_scores_equal_plain_evaluation(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    res = auto_pairs(tiny_llama, calib, target_depth=3, batch=2)
    assert [p.depth for p in res.frontier] == [5, 4, 3]
    assert res.num_layers - len(res.pairs) == 3
    for p in res.frontier:  # the cached, resumed evaluation equals a from-scratch one
        assert p.ratio == pytest.approx(_ratio(tiny_llama, p.pairs, calib), rel=1e-5)
    for pair, r in res.singles.items():
        assert r == pytest.approx(_ratio(tiny_llama, (pair,), calib), rel=1e-5)
    used = [x for p in res.pairs for x in p]
    assert len(used) == len(set(used)) and all(b == a + 1 for a, b in res.pairs)
    assert "<- chosen" in res.table()


def test_wide_beam_finds_the_exhaustive_optimum(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    res = auto_pairs(tiny_llama, calib, target_depth=4, beam=50, candidates=5)
    all_pairs = [(i, i + 1) for i in range(5)]
    sets = [s for s in itertools.combinations(all_pairs, 2) if s[0][1] < s[1][0]]
    best = min(sets, key=lambda s: _ratio(tiny_llama, s, calib))
    assert res.pairs == best
    assert any(s[0][1] + 1 != s[1][0] for s in sets)  # non-contiguous sets were candidates


def test_budget_picks_deepest_within(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    res = auto_pairs(tiny_llama, calib, max_ppl_increase=10.0)
    chosen = res.point(res.num_layers - len(res.pairs))
    assert chosen is not None and chosen.ratio <= 11.0
    assert all(p.ratio > 11.0 for p in res.frontier if p.depth < chosen.depth)
    with pytest.raises(InputError, match="no single pair stays within"):
        auto_pairs(tiny_llama, calib, max_ppl_increase=1e-9)


def test_budget_and_depth_together(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    res = auto_pairs(tiny_llama, calib, target_depth=3)
    worst = res.frontier[-1].ratio
    with pytest.raises(InputError, match="depth 3 within"):
        auto_pairs(tiny_llama, calib, target_depth=3, max_ppl_increase=(worst - 1) / 2)
    ok = auto_pairs(tiny_llama, calib, target_depth=3, max_ppl_increase=worst - 1 + 1e-3)
    assert ok.pairs == res.pairs


def test_best_contiguous(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    pts = best_contiguous(tiny_llama, calib, 2)
    for p in pts:
        firsts = [a for a, _ in p.pairs]
        assert firsts == list(range(firsts[0], firsts[0] + 2 * len(firsts), 2))
    runs = [tuple((i, i + 1) for i in range(s, s + 4, 2)) for s in range(3)]
    assert pts[1].ratio == pytest.approx(min(_ratio(tiny_llama, r, calib) for r in runs), rel=1e-5)


def test_plot_is_png(tiny_llama: Decoder, calib: torch.Tensor, tmp_path: Path) -> None:
    res = auto_pairs(tiny_llama, calib, target_depth=4)
    save_frontier_plot(res, tmp_path / "f.png", {"contiguous": [(5, 1.5), (4, 2.0)]})
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res.to_json()["depth"] == 4


@pytest.mark.parametrize("text", ["0", "-5%", "abc", "2000%", "nan"])
def test_budget_out_of_range(text: str) -> None:
    with pytest.raises(InputError, match="--max-ppl-increase"):
        parse_budget(text)


def test_budget_parsing() -> None:
    assert parse_budget("5%") == pytest.approx(0.05) and parse_budget("0.1") == pytest.approx(0.1)


@pytest.mark.parametrize("depth", [2, 6, 0, -1])
def test_target_depth_out_of_range(depth: int) -> None:
    with pytest.raises(InputError, match="--target-depth"):
        check_target_depth(depth, 6)


def test_needs_budget_or_depth(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    with pytest.raises(InputError, match="needs a budget or a depth"):
        auto_pairs(tiny_llama, calib)
    assert math.isfinite(auto_pairs(tiny_llama, calib, target_depth=5).base_ppl)


def test_worst_source_objective(tiny_llama: Decoder, calib: torch.Tensor) -> None:
    """Two sources (the sampled text and random tokens): ``worst`` scores every set by its worst source's ratio,
    ``mean`` with groups is the plain search."""
    noise = torch.randint(0, tiny_llama.arch.vocab_size, calib.shape, generator=torch.Generator().manual_seed(3))
    mix, groups = torch.cat([calib, noise]), torch.arange(2 * calib.shape[0]) // calib.shape[0]
    res = auto_pairs(tiny_llama, mix, target_depth=3, batch=2, groups=groups, objective="worst")
    scored = [(p.pairs, p.ratio) for p in res.frontier] + [((q,), r) for q, r in res.singles.items()]
    for pairs, ratio in scored:
        worst = max(_ratio(tiny_llama, pairs, calib), _ratio(tiny_llama, pairs, noise))
        assert ratio == pytest.approx(worst, rel=1e-5)
    assert res.to_json()["settings"]["objective"] == "worst"
    plain, grouped = auto_pairs(tiny_llama, mix, target_depth=3), auto_pairs(tiny_llama, mix, None, 3, groups=groups)
    assert [p.ratio for p in grouped.frontier] == pytest.approx([p.ratio for p in plain.frontier], rel=1e-9)
    with pytest.raises(InputError, match="objective"):
        auto_pairs(tiny_llama, mix, target_depth=3, groups=groups, objective="median")
