"""The paper's regime (arXiv 2502.02790): two-GPU predictions for the configurations it reports, beside its figures.

Every figure of the paper comes from ``paper_figures.json`` (with its URL, version and place in the paper); every
model shape from the same file (with its config source); the prediction from ``predict.tp2_step``. Nothing here is
typed twice: the comparison rows are computed from those two inputs, and the acceptance outcome from the rows.

A figure can be compared *per configuration* only when the source names both the model and the number of paired
layers Δ. For a figure that names the model but not Δ, the comparison lists every Δ whose prediction lies within
the tolerance — that shows whether the model *can* produce the figure, not that it predicts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import latency_limit
from benchmarks.perf_model.devices import GPUS, LAUNCH_EAGER_S, LAUNCH_GRAPH_S, LAUNCH_SOURCE
from benchmarks.perf_model.predict import LlamaShape, TPParams, tp2_step

FIGURES = Path(__file__).with_name("paper_figures.json")
TOLERANCE = 0.05  # issue 17: within 0.05 of the paper's reported speed-up
NEEDED = 2  # ... for at least two of its configurations
LINK_LATENCIES_US = (5.0, 10.0, 20.0)  # the link-latency parameter of the two-GPU model (same grid as sweeps.py)
PAIR_EXTRA_KERNELS = 2  # TPParallelLlamaMLP: a second down projection and the sum of the two (implementation)


def load_figures(path: Path = FIGURES) -> dict[str, Any]:
    return json.loads(path.read_text())


def shapes(fig: dict[str, Any]) -> dict[str, LlamaShape]:
    return {
        name: LlamaShape(
            name, *(int(s[k]) for k in ("layers", "hidden", "inter", "heads", "kv_heads", "head_dim", "vocab"))
        )
        for name, s in fig["model_shapes"].items()
    }


def parameters(split: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter sets, each stated with its source, fixed before any comparison (none is fitted)."""
    out = []
    for lat in LINK_LATENCIES_US:
        for graphs in (False, True):
            out.append(
                {
                    "link_latency_us": lat,
                    "cuda_graphs": graphs,
                    "kernels_per_layer": split["gpu_kernels_per_layer"],
                    "kernels_outside": split["gpu_kernels_outside"],
                    "pair_extra_kernels": PAIR_EXTRA_KERNELS,
                    "head_split": False,
                    "matches_implementation": not graphs,
                }
            )
    return out


PARAMETER_SOURCES = {
    "device": "A100-SXM4-80GB row of devices.GPUS (datasheet bandwidth/peak/NVLink); 2 GPUs per the v1 Figure 1 "
    "caption",
    "kernels_per_layer / kernels_outside": "layer_split of the committed run (SmolLM2 export's ONNX Runtime graph, "
    "same Llama layer structure), as for every tp2 row",
    "per-kernel cost": LAUNCH_SOURCE + "; the paper's code runs eager PyTorch (no CUDA graph): the eager rows match "
    "it, the CUDA-graph rows are for reference",
    "link latency": f"{', '.join(f'{x:g}' for x in LINK_LATENCIES_US)} us per all-reduce (a parameter, not a "
    "measurement; same grid as the tp2 rows)",
    "pair structure": "paper_figures.json implementation facts: 2 all-reduces per pair (as per unpaired layer), each "
    f"GPU reads one whole layer's weights per pair, +{PAIR_EXTRA_KERNELS} kernels (second down projection, sum)",
    "LM head": "whole on each GPU, no gather (the paper's code replaces only the decoder layers)",
}


def _predict(m: LlamaShape, setup: dict[str, Any], prm: dict[str, Any]) -> dict[int, float]:
    """Predicted speed-up (original / LP time per token) for every even Δ, 2 GPUs, from the analytic model."""
    dev = GPUS[setup["device"]]
    tp = TPParams(
        prm["kernels_per_layer"],
        prm["kernels_outside"],
        prm["link_latency_us"] * 1e-6,
        prm["cuda_graphs"],
        head_split=prm["head_split"],
        pair_extra_kernels=prm["pair_extra_kernels"],
    )
    b, t = int(setup["batch"]), int(setup["mean_context"])
    base = tp2_step(m, dev, b, t, 0, tp)
    return {2 * p: base / tp2_step(m, dev, b, t, p, tp) for p in range(m.layers // 2 + 1)}


def compare(split: dict[str, Any], fig: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison block of the result JSON: parameters, predictions per model x Δ, rows per paper figure,
    and the acceptance outcome."""
    fig = fig if fig is not None else load_figures()
    ms = shapes(fig)
    setup = fig["setup"]
    params = parameters(split)
    predictions = []
    for name, m in ms.items():
        for prm in params:
            sp = _predict(m, setup, prm)
            predictions.append(
                {
                    "model": name,
                    **{k: prm[k] for k in ("link_latency_us", "cuda_graphs", "matches_implementation")},
                    "speedup_by_paired_layers": {str(d): round(v, 4) for d, v in sp.items()},
                    "limit_by_paired_layers": {str(d): round(latency_limit(m.layers, d // 2), 4) for d in sp},
                }
            )
    rows = []
    for f in fig["figures"]:
        base = {"figure": f["id"], "url": f["url"], "version": f["version"], "where": f["where"]}
        if f.get("speedup_range") is not None:
            base["reported_range"] = f["speedup_range"]
        value, model, delta = f.get("speedup"), f.get("model"), f.get("paired_layers")
        if value is None or model is None or model not in ms:
            why = "no single speed-up" if value is None else "no model named"
            rows.append({**base, "reported": value, "comparable": False, "why": f"{why}: {f['not_stated_there']}"})
            continue
        for p in (p for p in predictions if p["model"] == model):
            sp = {int(d): v for d, v in p["speedup_by_paired_layers"].items()}
            row = {
                **base,
                "model": model,
                "reported": value,
                **{k: p[k] for k in ("link_latency_us", "cuda_graphs", "matches_implementation")},
            }
            if delta is not None:
                d = round(sp[int(delta)] - value, 4)
                row.update(paired_layers=delta, predicted=sp[int(delta)], diff=d, within=abs(d) <= TOLERANCE)
                row["comparable"] = True
            else:
                hits = [d for d, v in sp.items() if d > 0 and abs(v - value) <= TOLERANCE]
                row.update(
                    comparable=False,
                    why=f"Δ not stated: {f['not_stated_there']}",
                    paired_layers_within_tolerance=hits,
                    predicted_range=[sp[2], sp[max(sp)]],
                )
            rows.append(row)
    compared = [r for r in rows if r["comparable"] and r.get("matches_implementation")]
    within = sorted({(r["model"], r["paired_layers"]) for r in compared if r["within"]})
    out = {
        "figures_file": "benchmarks/perf_model/paper_figures.json",
        "setup": setup,
        "tolerance": TOLERANCE,
        "parameters": params,
        "parameter_sources": PARAMETER_SOURCES,
        "predictions": predictions,
        "rows": rows,
        "acceptance": {
            "configurations_compared": len({(r["model"], r["paired_layers"]) for r in compared}),
            "configurations_within": [list(x) for x in within],
            "needed": NEEDED,
            "met": len(within) >= NEEDED,
        },
    }
    out["note"] = [] if out["acceptance"]["met"] else note(out, fig)
    return out


def _pred(pc: dict[str, Any], model: str, lat: float, graphs: bool, delta: int) -> float:
    p = next(
        p
        for p in pc["predictions"]
        if p["model"] == model and p["link_latency_us"] == lat and p["cuda_graphs"] == graphs
    )
    return float(p["speedup_by_paired_layers"][str(delta)])


def note(pc: dict[str, Any], fig: dict[str, Any] | None = None) -> list[str]:
    """The explanation the acceptance point asks for when fewer than NEEDED configurations lie within tolerance;
    every number in it is read from ``pc`` (the computed comparison), none typed."""
    fig = fig if fig is not None else load_figures()
    acc = pc["acceptance"]
    lines = [
        f"{acc['configurations_compared']} configuration(s) of the paper could be compared per configuration "
        f"(needed: {acc['needed']} within {pc['tolerance']}): no text available here gives a speed-up together with "
        "the model and Δ. The per-Δ timings are in Figure 1 (a plot: not read) and in the results section, which "
        "the stored copies do not hold.",
    ]
    for r in (r for r in pc["rows"] if r.get("model") and not r["comparable"] and r["matches_implementation"]):
        hits = r["paired_layers_within_tolerance"]
        lo, hi = r["predicted_range"]
        lines.append(
            f"{r['model']} {r['reported']}x ({r['version']} {r['where']}), eager as the paper's code, link "
            f"{r['link_latency_us']:g} us: predicted {lo:.3f}-{hi:.3f} over Δ = 2..all layers; within "
            f"{pc['tolerance']} at Δ = {', '.join(map(str, hits)) or 'none'}."
        )
    shapes_ = shapes(fig)
    model = next((r["model"] for r in pc["rows"] if r.get("model")), None)
    if model is not None:
        half = shapes_[model].layers // 2
        lats = sorted({p["link_latency_us"] for p in pc["parameters"]})
        e = [_pred(pc, model, lat, False, half) for lat in lats]
        g = [_pred(pc, model, lat, True, half) for lat in lats]
        lines.append(
            "Which assumption breaks: none is shown to, because nothing could be compared; the model *can* give the "
            "abstract's figure with about half the layers paired, so it is consistent with the paper, not checked "
            f"by it. What a per-Δ figure would test, with the predicted speed-up of {model} at Δ = {half}: "
            f"(a) link latency {lats[0]:g}-{lats[-1]:g} us moves it only {min(e):.3f}-{max(e):.3f} (eager); "
            f"(b) launch cost per kernel moves it most — CUDA graphs ({LAUNCH_GRAPH_S * 1e6:g} us) give "
            f"{min(g):.3f}-{max(g):.3f}, and Hugging Face eager PyTorch likely pays more than the assumed "
            f"{LAUNCH_EAGER_S * 1e6:g} us of host time per op, which would raise it (a pair saves one layer's "
            "launches and 2 all-reduces, so the saved share grows with the fixed cost per layer); "
            "(c) kernels per layer come from our ONNX Runtime graph, not Hugging Face's op list (same direction as "
            "b); (d) batch 1 and mean context 2048 are assumed (the caption gives 4096 tokens, not the batch); "
            "(e) the timing harness is not public: if its unpaired layers ran unsharded, as in the authors' demo "
            "script, the baseline is not tensor parallel and this two-GPU model does not describe it."
        )
    return lines
