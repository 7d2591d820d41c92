"""python -m benchmarks.perf_model: count, predict, measure on this CPU, write JSON + markdown + plot."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import onnx

from benchmarks.common import latency_limit, machine, now_utc, write_json
from benchmarks.perf_model import cpu_check, micro, paper
from benchmarks.perf_model.costs import Cost, graph_costs, totals
from benchmarks.perf_model.devices import GPUS, cpu_device
from benchmarks.perf_model.engine import SOURCE_ORT, EngineCosts, engine_kernels
from benchmarks.perf_model.genai import genai_model
from benchmarks.perf_model.graph import load_graph, optimized_model
from benchmarks.perf_model.measure import decode_timer, measure_rounds
from benchmarks.perf_model.predict import step_time
from benchmarks.perf_model.report import README_CONTEXT, markdown, paper_table, plot, write_readme
from benchmarks.perf_model.sweeps import single_gpu, tp2_rows
from benchmarks.perf_model.units import layer_split

REPO = Path(__file__).resolve().parents[2]
SCHEMA = "layerpair-bench/perf-model/1"
VOCAB = 49152  # SmolLM2 (all three models): the random prompt's token range
TP2_TABLE_PAIRS = 4  # README table: 4 pairs (8 of 32 layers paired); every pair count is in the JSON
# The one per-model figure (from paper_figures.json, with its source), for the tp2 grid's comparison and the plot;
# the per-configuration comparison is paper.compare (res["paper_comparison"]).
PAPER_QUOTED: list[dict[str, Any]] = [
    {
        "model": f["model"],
        "speedup": f["speedup"],
        "source": f"arXiv 2502.02790{f['version']} {f['where']} ({f['url']}): {f['states']}; not stated there: "
        f"{f['not_stated_there']}",
    }
    for f in paper.load_figures()["figures"]
    if f.get("model") and f.get("speedup") is not None
]
PAPER: dict[str, Any] = {
    "quoted": PAPER_QUOTED,
    "other_quotes": [f"{p['version']} {p['where']}: {p['caption_facts']}" for p in paper.load_figures()["plot_only"]],
}

KernelCosts = Callable[[int, int], Sequence[Cost]]  # (batch, past) -> per-kernel costs of one decode step
ORT_KERNELS = (
    "GPU kernels = nodes of ONNX Runtime's CPU-optimized graph minus alias/shape ops (no TensorRT / CUDA EP fusion)"
)
ENGINE_KERNELS = (
    "GPU kernels = the TensorRT engine's layers in its decode profile (source per model in kernel_source), each "
    "costed as one fused kernel from the ONNX nodes its metadata names"
)
ASSUMPTIONS = [
    ORT_KERNELS,
    "GPU bytes = the fp32 graph's bytes x 0.5 (bf16 weights, activations and KV cache)",
    "GPU bandwidth and peak = datasheet figures (no efficiency factor): predicted times are lower bounds",
    "GPU per-kernel cost 5 us eager, 1.5 us in a CUDA graph: assumed, not measured",
    "1 GPU vs pairs: time per pair saved taken from the real 2-pair export and extrapolated linearly in pairs",
    "2 GPUs: Llama-2-7B / Llama-3-8B bytes and FLOPs from their published shapes; kernels per layer and outside "
    "the layers from the SmolLM2 export's optimized graph (same Llama structure); Megatron TP with 2 all-reduces "
    "per layer, a pair = one branch per GPU + 2 all-reduces; context 2048 = mean while generating 4096 tokens",
    "CPU: bandwidth and per-node overhead measured right before and after each decode timing and averaged",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.perf_model", description=__doc__)
    p.add_argument("--orig", type=Path, default=Path("/tmp/pm/orig"), help="layerpair-export --pairs none output")
    p.add_argument("--lp", type=Path, default=Path("/tmp/pm/lp"), help="layerpair-export --pairs S:E output")
    p.add_argument("--work", type=Path, default=Path("/tmp/pm"), help="optimized graphs and the genai model")
    p.add_argument("--genai-venv", type=Path, default=Path("/tmp/anchor-genai-venv"))
    p.add_argument("--checkpoint-dir", type=Path, default=Path("/tmp/smollm2-135m-hf"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "perf_model")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument(
        "--kernels",
        choices=("auto", "ort"),
        default="auto",
        help="GPU kernel list: auto = the TensorRT engine's layers where an export has model.plan "
        "(layerpair-export --trt), else ONNX Runtime's optimized graph; ort = always the graph",
    )
    p.add_argument(
        "--paper",
        action="store_true",
        help="only (re)compute the two-GPU comparison with the paper's figures (paper_figures.json) from "
        "OUT/perf_model.json's layer split and the analytic model (no measurement); writes it into the JSON, "
        "OUT/paper_comparison.md and, for the committed folder, README.md's generated block",
    )
    p.add_argument(
        "--readme",
        action="store_true",
        help="only regenerate README.md's prediction table from OUT/perf_model.json (no measurement)",
    )
    return p.parse_args(argv)


def load_models(a: argparse.Namespace, say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{name: (onnx path, fixed dims, nodes)} for original, LP and (if it builds) genai; plus facts."""
    facts: dict[str, Any] = {}
    paths: dict[str, tuple[Path, dict[str, int]]] = {
        "original": (a.orig / "model.onnx", {}),
        "lp": (a.lp / "model.onnx", {}),
    }
    for name, d in (("original", a.orig), ("lp", a.lp)):
        facts[name] = {
            "dir": str(d),
            "report": {
                k: json.loads((d / "report.json").read_text()).get(k)
                for k in (
                    "pairs",
                    "num_layers",
                    "depth",
                    "nodes_before",
                    "nodes_after",
                    "onnx",
                    "versions",
                    "timings_s",
                )
            },
        }
    gpath, ginfo = genai_model(a.work, a.checkpoint_dir, a.genai_venv, say)
    facts["genai"] = ginfo
    if gpath is not None:
        head = json.loads((gpath.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
        paths["genai"] = (gpath, {"kv_cache_dim": int(head)})
    models: dict[str, Any] = {}
    for name, (p, fixed) in paths.items():
        say(f"{name}: ORT optimized graph and shapes")
        opt = optimized_model(p, a.work / f"opt-{name}.onnx", a.threads)
        models[name] = (p, fixed, load_graph(opt, a.threads, fixed))
    return models, facts


def gpu_kernel_lists(
    a: argparse.Namespace, models: dict[str, Any], say: Callable[[str], None]
) -> tuple[dict[str, KernelCosts], dict[str, Any]]:
    """Per export (original, LP): the GPU kernel list's cost function and where the list came from."""
    fns: dict[str, KernelCosts] = {}
    info: dict[str, Any] = {}
    for name, d in (("original", a.orig), ("lp", a.lp)):
        nodes = models[name][2]
        ort_fn: KernelCosts = partial(graph_costs, nodes)
        ek = engine_kernels(d, say) if a.kernels == "auto" else None
        if ek is None or not ek.layers:
            fns[name] = ort_fn
            why = "no model.plan in the export" if ek is None else "; ".join(ek.notes)
            if a.kernels == "ort":
                why = "--kernels ort"
            info[name] = {"source": SOURCE_ORT, "why": why, "ort_counts_at_readme_context": None}
            continue
        onnx_path = models[name][0]
        say(f"{name}: shapes of model.onnx's own nodes (the ONNX nodes the engine layers name)")
        raw = load_graph(onnx_path, a.threads, models[name][1])
        outs = [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]
        ec = EngineCosts(ek, raw, outs)
        fns[name] = ec.costs
        info[name] = {
            **ek.to_json(),
            "coverage_at_readme_context": ec.coverage(1, README_CONTEXT),
            "engine_totals_at_readme_context": totals(ec.costs(1, README_CONTEXT)).to_json(),
        }
    for name in fns:
        info[name]["ort_counts_at_readme_context"] = totals(graph_costs(models[name][2], 1, README_CONTEXT)).to_json()
    return fns, info


def pairs_sweep(orig: KernelCosts, lp: KernelCosts, layers: int, pairs: int) -> list[dict[str, Any]]:
    """1 GPU, batch 1, context README_CONTEXT: time per pair saved, from the two real exports, extrapolated
    linearly to p pairs (t(p) = t_orig - p * (t_orig - t_lp) / pairs) — each pair is the same wide layer."""
    co, cl = orig(1, README_CONTEXT), lp(1, README_CONTEXT)
    rows = []
    for dev in GPUS.values():
        for graphs in (False, True):
            to, tl = step_time(co, dev, graphs), step_time(cl, dev, graphs)
            for p in range(layers // 2):
                t = to - p * (to - tl) / pairs
                rows.append(
                    {
                        "device": dev.name,
                        "cuda_graphs": graphs,
                        "pairs": p,
                        "speedup": to / t,
                        "limit": latency_limit(layers, p),
                    }
                )
    return rows


def paper_comparison(tp: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each quoted figure: per link latency and launch mode, the paired-layer counts predicted within 0.05."""
    out = []
    for q in PAPER_QUOTED:
        sel = [r for r in tp if r["model"] == q["model"] and r["device"] == "A100-SXM4-80GB" and r["batch"] == 1]
        for lat in sorted({r["link_latency_us"] for r in sel}):
            for graphs in (False, True):
                pts = [r for r in sel if r["link_latency_us"] == lat and r["cuda_graphs"] == graphs]
                hit = [r["paired_layers"] for r in pts if abs(r["speedup"] - q["speedup"]) <= 0.05]
                out.append(
                    {
                        "model": q["model"],
                        "quoted": q["speedup"],
                        "link_latency_us": lat,
                        "cuda_graphs": graphs,
                        "paired_layers_within_0.05": hit,
                        "predicted_by_paired_layers": {r["paired_layers"]: round(r["speedup"], 4) for r in pts},
                    }
                )
    return out


def _predict_rounds(rounds: list[dict[str, Any]], costs: dict[str, Any]) -> None:
    """Add to each timing the prediction from the parameters measured around it (and the diagnostic one)."""
    for r in rounds:
        # The ratio is a property of the two graphs: predict both with the round's common parameters (mean of
        # all its brackets), so that load drift between two timings does not enter the predicted ratio.
        common = {
            k: statistics.mean(m["micro"][k] for m in r["models"].values())
            for k in ("bandwidth_Bps", "node_overhead_s")
        }
        dev_r = cpu_device({**common, "peak_flops": r["peak_flops"]})
        r["predicted_common"] = {k: cpu_check.predict_cpu(c, dev_r)["predicted_s"] for k, c in costs.items()}
        for k, m in r["models"].items():
            mic = {**m["micro"], "peak_flops": r["peak_flops"]}
            m["predicted"] = cpu_check.predict_cpu(costs[k], cpu_device(mic))
            # Diagnostic, not the check: the same model with the bandwidth of decode-sized GEMVs (32 x 3.5 MiB).
            diag = cpu_device({**mic, "bandwidth_Bps": mic["diagnostic_bandwidth_32x576x1536_Bps"]})
            m["diagnostic_predicted_s"] = cpu_check.predict_cpu(costs[k], diag)["predicted_s"]


def cpu_part(a: argparse.Namespace, models: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Rounds of (micro-benchmarks, decode of every model), rotated; each round predicted from its own micro."""
    timers = {k: decode_timer(v[0], a.threads, a.prompt, a.steps, VOCAB, v[1]) for k, v in models.items()}
    costs = {k: cpu_check.step_costs(v[2], a.prompt, a.steps) for k, v in models.items()}
    say(
        f"decode: {', '.join(models)} + micro-benchmarks — {a.rounds} rounds x {a.steps} steps, {a.prompt}-token prompt"
    )
    rounds = measure_rounds(timers, micro.Micro(a.threads), a.rounds)
    _predict_rounds(rounds, costs)
    ms = [m["micro"] for r in rounds for m in r["models"].values()]
    med = {k: statistics.median(x[k] for x in ms) for k in ms[0]}
    med["peak_flops"] = statistics.median(r["peak_flops"] for r in rounds)
    mid = {k: totals(c[len(c) // 2]).to_json() for k, c in costs.items()}
    return {
        "micro": {**med, "numpy_copy_Bps_reference": micro.numpy_copy_bandwidth()},
        "cpu_device": cpu_device(med).to_json(),
        "rounds": rounds,
        "counts_at_mid_context": mid,
        "cpu_check": cpu_check.compare(rounds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)

    def say(msg: str) -> None:
        print(f"[perf_model] {msg}", file=sys.stderr, flush=True)

    if a.paper:
        path = a.out / "perf_model.json"
        saved = json.loads(path.read_text())
        saved["paper_comparison"] = paper.compare(saved["layer_split"])
        write_json(path, saved)
        (a.out / "paper_comparison.md").write_text("\n".join(paper_table(saved["paper_comparison"])) + "\n")
        say(f"paper comparison written into {path} and {a.out / 'paper_comparison.md'}")
        if a.out.resolve() == (REPO / "benchmarks" / "results" / "perf_model").resolve():
            write_readme(saved, path, REPO / "README.md")
        print("\n".join(paper_table(saved["paper_comparison"])))
        return 0

    if a.readme:
        saved = json.loads((a.out / "perf_model.json").read_text())
        say(f"README.md: prediction table regenerated from {a.out / 'perf_model.json'}")
        write_readme(saved, a.out / "perf_model.json", REPO / "README.md")
        return 0

    res: dict[str, Any] = {
        "schema": SCHEMA,
        "date": now_utc(),
        "machine": machine(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m benchmarks.perf_model " + " ".join(argv or sys.argv[1:]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
    }
    models, res["artifacts"] = load_models(a, say)
    orig = models["original"][2]
    split = layer_split(orig, graph_costs(orig, 1, a.prompt))
    pairs = len(res["artifacts"]["lp"]["report"]["pairs"])
    res["layer_split"] = split.to_json()
    fns, res["kernel_source"] = gpu_kernel_lists(a, models, say)
    res.update(cpu_part(a, models, say))
    res["devices"] = {**{k: d.to_json() for k, d in GPUS.items()}, "this-cpu": res["cpu_device"]}
    res["single_gpu"] = single_gpu(fns["original"], fns["lp"], split.layers, pairs)
    res["single_gpu_pairs"] = pairs_sweep(fns["original"], fns["lp"], split.layers, pairs)
    res["tp2"] = tp2_rows(split)
    res["tp2_table_pairs"] = TP2_TABLE_PAIRS
    res["paper"] = {**PAPER, "comparison": paper_comparison(res["tp2"])}
    res["paper_comparison"] = paper.compare(res["layer_split"])
    engine_used = any(v["source"] != SOURCE_ORT for v in res["kernel_source"].values())
    res["assumptions"] = [ENGINE_KERNELS if engine_used else ORT_KERNELS, *ASSUMPTIONS[1:]]
    if engine_used:
        res["assumptions"].append(
            "2 GPUs (tp2): kernels per layer still from ONNX Runtime's graph (layer_split), not from the engine"
        )
    inspected = [k for k, v in res["kernel_source"].items() if v.get("inspection", {}).get("ran")]
    res["not_done"] = [
        *(
            [f"engine inspection NOT run for {', '.join(sorted(set(fns) - set(inspected)))}: see kernel_source"]
            if len(inspected) < len(fns)
            else []
        ),
        "no GPU run of benchmarks/gpu.py exists "
        "(benchmarks/results/gpu/gpu.json absent): no GPU figure to compare with",
    ]
    res["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "perf_model.json", res)
    (a.out / "perf_model.md").write_text(markdown(res))
    (a.out / "paper_comparison.md").write_text("\n".join(paper_table(res["paper_comparison"])) + "\n")
    plot(res, a.out)
    if a.out.resolve() == (REPO / "benchmarks" / "results" / "perf_model").resolve():
        write_readme(res, a.out / "perf_model.json", REPO / "README.md")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
