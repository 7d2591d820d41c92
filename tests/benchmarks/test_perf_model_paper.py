"""The two-GPU comparison with the paper (arXiv 2502.02790) is computed from the recorded figures and the model.

No speed-up of the paper is typed outside ``benchmarks/perf_model/paper_figures.json`` (each with its source), and
no predicted speed-up is typed anywhere: the committed JSON's ``paper_comparison`` must equal what ``paper.compare``
computes now from that file and ``predict.tp2_step``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks.perf_model import paper
from benchmarks.perf_model.devices import GPUS
from benchmarks.perf_model.predict import PAPER_MODELS, TPParams, tp2_step
from benchmarks.perf_model.report import RESULTS_JSON, paper_table

REPO = Path(__file__).resolve().parents[2]
SPLIT = {"gpu_kernels_per_layer": 40, "gpu_kernels_outside": 20}


def test_every_recorded_figure_and_shape_has_its_source() -> None:
    fig = paper.load_figures()
    assert fig["figures"], "no paper figure recorded"
    for f in fig["figures"]:
        assert f["url"].startswith("https://arxiv.org/html/2502.02790v"), f["id"]
        assert f["version"] in f["url"] and f["where"] and f["states"] and f["not_stated_there"], f["id"]
        assert (f["speedup"] is None) != ("speedup_range" not in f), f["id"]
    for p in fig["plot_only"]:
        assert p["why_not_used"] and p["url"].startswith("https://arxiv.org/")
    for name, s in fig["model_shapes"].items():
        assert s["source"], name
    assert fig["setup"]["source"] and fig["setup"]["batch_source"] and fig["setup"]["mean_context_source"]
    # the shape the tp2 grid uses and the one recorded with its source are the same
    assert paper.shapes(fig)["llama-2-7b"] == PAPER_MODELS["llama-2-7b"]


def _with(figures: list[dict[str, object]]) -> dict[str, object]:
    fig = copy.deepcopy(paper.load_figures())
    fig["figures"] = figures
    return fig


def _fig(fid: str, model: str, delta: int | None, value: float) -> dict[str, object]:
    return {
        "id": fid,
        "speedup": value,
        "model": model,
        "paired_layers": delta,
        "url": "https://arxiv.org/html/2502.02790v9",
        "version": "v9",
        "where": "Table 9",
        "states": "test",
        "not_stated_there": "nothing",
    }


def test_a_figure_with_model_and_delta_is_compared_with_the_model_prediction() -> None:
    """predicted = tp2_step(original) / tp2_step(Δ/2 pairs) with the stated parameters; diff = predicted - reported;
    the acceptance counts configurations within the tolerance (eager rows, the paper's implementation)."""
    fig = _with([_fig("a", "llama-2-7b", 16, 1.19), _fig("b", "llama-3.2-3b", 8, 3.0)])
    res = paper.compare(SPLIT, fig)
    m = paper.shapes(fig)["llama-2-7b"]
    tp = TPParams(40, 20, 10e-6, False, head_split=False, pair_extra_kernels=paper.PAIR_EXTRA_KERNELS)
    dev = GPUS[fig["setup"]["device"]]
    expect = tp2_step(m, dev, 1, 2048, 0, tp) / tp2_step(m, dev, 1, 2048, 8, tp)
    row = next(r for r in res["rows"] if r["figure"] == "a" and r["link_latency_us"] == 10.0 and not r["cuda_graphs"])
    assert row["comparable"] and row["paired_layers"] == 16
    assert row["predicted"] == pytest.approx(expect, abs=1e-4)
    assert row["diff"] == pytest.approx(expect - 1.19, abs=1e-4)
    assert row["within"] == (abs(expect - 1.19) <= paper.TOLERANCE)
    far = next(r for r in res["rows"] if r["figure"] == "b")
    assert far["comparable"] and not far["within"]  # 3.0x is beyond the depth limit of 8 paired layers
    acc = res["acceptance"]
    assert acc["configurations_compared"] == 2
    assert acc["configurations_within"] == ([["llama-2-7b", 16]] if row["within"] else [])
    assert acc["met"] is False and res["note"]


def test_two_configurations_within_tolerance_meet_the_acceptance_and_need_no_note() -> None:
    base = paper.compare(SPLIT, _with([]))
    pred = {
        (p["model"], p["link_latency_us"]): p["speedup_by_paired_layers"]
        for p in base["predictions"]
        if not p["cuda_graphs"]
    }
    figs = [
        _fig("a", "llama-2-7b", 16, pred[("llama-2-7b", 10.0)]["16"] + 0.01),
        _fig("b", "llama-3.2-3b", 8, pred[("llama-3.2-3b", 10.0)]["8"] - 0.02),
    ]
    res = paper.compare(SPLIT, _with(figs))
    assert res["acceptance"]["met"] is True and res["note"] == []
    assert sorted(map(tuple, res["acceptance"]["configurations_within"])) == [("llama-2-7b", 16), ("llama-3.2-3b", 8)]


def test_a_figure_without_delta_lists_the_delta_that_reach_it_and_is_not_counted() -> None:
    res = paper.compare(SPLIT, _with([_fig("a", "llama-2-7b", None, 1.19)]))
    for r in res["rows"]:
        assert not r["comparable"]
        sp = next(
            p["speedup_by_paired_layers"]
            for p in res["predictions"]
            if p["model"] == "llama-2-7b"
            and p["link_latency_us"] == r["link_latency_us"]
            and p["cuda_graphs"] == r["cuda_graphs"]
        )
        assert r["paired_layers_within_tolerance"] == [
            int(d) for d, v in sp.items() if int(d) > 0 and abs(v - 1.19) <= paper.TOLERANCE
        ]
    assert res["acceptance"]["configurations_compared"] == 0


def test_committed_comparison_is_the_one_computed_from_the_figures_file_and_the_model() -> None:
    """A hand edit of the JSON, or a figures-file / model change without ``python -m benchmarks.perf_model
    --paper``, fails here."""
    res = json.loads((REPO / RESULTS_JSON).read_text())
    assert res["paper_comparison"] == json.loads(json.dumps(paper.compare(res["layer_split"])))
    md = (REPO / RESULTS_JSON).with_name("paper_comparison.md").read_text()
    assert md == "\n".join(paper_table(res["paper_comparison"])) + "\n"
    reported = {f["id"]: f["speedup"] for f in paper.load_figures()["figures"]}
    for r in res["paper_comparison"]["rows"]:
        assert r["reported"] == reported[r["figure"]]
