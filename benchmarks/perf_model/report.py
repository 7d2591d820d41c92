"""Markdown table and plot, written from the result JSON only (no figure typed by hand).

README.md's prediction table is generated too: ``write_readme`` replaces what lies between the marker comments
``README_BEGIN`` and ``README_END`` with ``readme_block(res)``, and a test checks that README.md holds exactly the
block rendered from the committed JSON (a hand edit fails it). Regenerate with
``python -m benchmarks.perf_model --readme`` (no measurement) or by running the model into the committed folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

README_CONTEXT = 1024
README_BEGIN = "<!-- perf-model:begin -->"
README_END = "<!-- perf-model:end -->"
RESULTS_JSON = "benchmarks/results/perf_model/perf_model.json"  # the committed run, relative to the repository


def _cpu_table(res: dict[str, Any]) -> list[str]:
    chk = res["cpu_check"]
    lines = [
        "| model (ONNX Runtime CPU, batch 1) | predicted ms/token | measured ms/token [IQR] | error | within 15 % |",
        "|---|---|---|---|---|",
    ]
    for name, r in chk["models"].items():
        q25, q75 = r["measured_iqr_ms"]
        lines.append(
            f"| {name} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} [{q25:.2f}, {q75:.2f}] | "
            f"{100 * r['rel_error']:+.1f} % | {'yes' if r['within_tolerance'] else 'no'} |"
        )
    if "diagnostic_rel_error" in chk:
        d = ", ".join(f"{k} {100 * v:+.1f} %" for k, v in chk["diagnostic_rel_error"].items())
        lines.append(
            f"| *diagnostic, not the check:* same model with the bandwidth of 32 decode-sized GEMVs "
            f"({res['micro']['diagnostic_bandwidth_32x576x1536_Bps'] / 1e9:.2f} GB/s) | | | {d} | |"
        )
    if "lp_over_original" in chk:
        r = chk["lp_over_original"]
        lines.append(
            f"| LP / original time ratio | {r['predicted']:.3f} | {r['measured']:.3f} | "
            f"{r['abs_error']:.3f} abs | {'yes' if r['within_tolerance'] else 'no'} (0.03) |"
        )
    return lines


def _gpu_table(res: dict[str, Any], predicted_header: bool = False) -> list[str]:
    pre = "predicted " if predicted_header else ""
    lines = [
        f"| device | model | regime | batch | context | {pre}original ms/token | {pre}LP ratio eager | "
        f"{pre}LP ratio CUDA graphs | limit L/(L-p) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in res["single_gpu"] if r["context"] == README_CONTEXT]
    for dev in dict.fromkeys(r["device"] for r in rows):
        for b in dict.fromkeys(r["batch"] for r in rows):
            e = next(r for r in rows if r["device"] == dev and r["batch"] == b and not r["cuda_graphs"])
            g = next(r for r in rows if r["device"] == dev and r["batch"] == b and r["cuda_graphs"])
            lines.append(
                f"| {dev} | smollm2-135m, {e['pairs']} pairs (export) | 1 GPU | {b} | {README_CONTEXT} | "
                f"{e['orig_ms']:.3f} | {e['ratio']:.3f} | {g['ratio']:.3f} | {e['limit']:.3f} |"
            )
    tp = res["tp2"]
    p_show = res["tp2_table_pairs"]
    sel = [r for r in tp if r["pairs"] == p_show and r["link_latency_us"] == 10.0]
    for r in sel:
        if r["cuda_graphs"]:
            continue
        g = next(
            x
            for x in sel
            if x["cuda_graphs"] and x["model"] == r["model"] and x["device"] == r["device"] and x["batch"] == r["batch"]
        )
        lines.append(
            f"| 2x {r['device']} | {r['model']}, {p_show} pairs (shape) | 2 GPUs TP, link 10 us | {r['batch']} | "
            f"{r['context']} | {r['orig_ms']:.3f} | {r['speedup']:.3f} | {g['speedup']:.3f} | {r['limit']:.3f} |"
        )
    return lines


def _paper_lines(res: dict[str, Any]) -> list[str]:
    q = res["paper"]["quoted"][0]
    lines = [
        "",
        f"**Paper's regime, PREDICTION** vs the one figure available to this run: {q['speedup']}x for "
        f"{q['model']} ({q['source']}). Paired layers Δ whose predicted speed-up (2x A100-SXM4-80GB, batch 1, "
        "context 2048) is within 0.05 of it:",
        "",
        "| link latency | eager launches | CUDA graphs |",
        "|---|---|---|",
    ]
    comp = res["paper"]["comparison"]
    for lat in dict.fromkeys(c["link_latency_us"] for c in comp):
        cells = [
            ", ".join(str(x) for x in c["paired_layers_within_0.05"]) or "none"
            for g in (False, True)
            for c in comp
            if c["link_latency_us"] == lat and c["cuda_graphs"] == g
        ]
        lines.append(f"| {lat:.0f} us | Δ = {cells[0]} | Δ = {cells[1]} |")
    return lines


def paper_table(pc: dict[str, Any], full: bool = True) -> list[str]:
    """The two-GPU prediction beside the paper's reported figures (``res["paper_comparison"]``), PREDICTIONS."""
    st = pc["setup"]
    lats = sorted({p["link_latency_us"] for p in pc["parameters"]})
    lines = [
        f"**Paper's regime (arXiv 2502.02790): PREDICTION beside the paper's reported figures.** Figures from "
        f"`{pc['figures_file']}` (URL, version and place of each); 2x {st['device']}, batch {st['batch']}, mean "
        f"context {st['mean_context']} ({st['source']}). Per-kernel cost, link latency and structure as stated in "
        "`paper_comparison.parameter_sources` of the JSON, fixed before comparing (nothing fitted).",
        "",
        "| figure | model | reported | Δ in source | "
        + " | ".join(f"Δ within {pc['tolerance']}, eager, link {x:g} us" for x in lats)
        + " | per-configuration comparison |",
        "|---|---|---|---|" + "---|" * len(lats) + "---|",
    ]
    seen: set[str] = set()
    for r in pc["rows"]:
        if r["figure"] in seen:
            continue
        seen.add(r["figure"])
        same = [x for x in pc["rows"] if x["figure"] == r["figure"] and x.get("matches_implementation")]
        cells = []
        for lat in lats:
            x = next((x for x in same if x["link_latency_us"] == lat), None)
            if x is None:
                cells.append("—")
            elif x["comparable"]:
                cells.append(f"{x['predicted']:.3f} ({x['diff']:+.3f})")
            else:
                cells.append(", ".join(map(str, x["paired_layers_within_tolerance"])) or "none")
        rng = r.get("reported_range")
        rep = f"{r['reported']:.2f}x" if r["reported"] is not None else "—"
        rep = f"{rng[0]:.2f}x-{rng[1]:.2f}x" if rng else rep
        src = f"[{r['version']} {r['where']}]({r['url']})"
        cmp_ = "yes" if r["comparable"] else f"no — {r['why']}"
        lines.append(
            f"| {src} | {r.get('model') or '—'} | {rep} | {r.get('paired_layers') or 'not stated'} | "
            + " | ".join(cells)
            + f" | {cmp_} |"
        )
    if full:
        lines += [
            "",
            "Predicted speed-up by paired layers Δ (eager, as the paper's code), beside the limit L/(L-Δ/2):",
            "",
        ]
        for p in (p for p in pc["predictions"] if p["matches_implementation"]):
            ds = [d for d in p["speedup_by_paired_layers"] if int(d) % 4 == 0 and int(d) > 0]
            lines.append(
                f"- {p['model']}, link {p['link_latency_us']:g} us: "
                + ", ".join(
                    f"Δ={d}: {p['speedup_by_paired_layers'][d]:.3f} (limit {p['limit_by_paired_layers'][d]:.3f})"
                    for d in ds
                )
            )
    acc = pc["acceptance"]
    lines += [
        "",
        f"Acceptance (issue 17, within {pc['tolerance']} for at least {acc['needed']} configurations): "
        f"{acc['configurations_compared']} compared, {len(acc['configurations_within'])} within — "
        + ("met." if acc["met"] else "not met; the note says why."),
    ]
    lines += [f"- {x}" for x in pc.get("note", [])]
    return lines


def markdown(res: dict[str, Any]) -> str:
    la0, la1 = res["load_average_start"], res["load_average_end"]
    head = [
        f"Performance model run {res['date']} — {res['machine']['cpu']}, {res['machine']['logical_cores']} cores, "
        f"{res['settings']['threads']} threads; load average (1/5/15 min) {la0} at the start, {la1} at the end "
        "(the machine is shared: measurements are disturbed by other work).",
        "",
        f"Command: `{res['command']}`",
        "",
        "**Check on this CPU** (parameters measured in the same run: "
        f"bandwidth {res['micro']['bandwidth_Bps'] / 1e9:.2f} GB/s, peak {res['micro']['peak_flops'] / 1e9:.1f} "
        f"GFLOP/s, per-node {1e6 * res['micro']['node_overhead_s']:.2f} us):",
        "",
    ]
    body = [
        "",
        "**PREDICTIONS** (not measurements) — decode, datasheet bandwidth/peak, assumed launch costs "
        "(devices table in the JSON).",
        _kernel_source_line(res),
        *[f"- {note}" for v in res.get("kernel_source", {}).values() for note in v.get("notes", [])],
        "",
    ]
    extra = ["", *paper_table(res["paper_comparison"])] if "paper_comparison" in res else []
    return "\n".join(head + _cpu_table(res) + body + _gpu_table(res) + _paper_lines(res) + extra) + "\n"


def plot(res: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    ax = axes[0]
    for dev in dict.fromkeys(r["device"] for r in res["single_gpu_pairs"]):
        for graphs, ls in ((False, "-"), (True, "--")):
            pts = [r for r in res["single_gpu_pairs"] if r["device"] == dev and r["cuda_graphs"] == graphs]
            ax.plot(
                [r["pairs"] for r in pts], [r["speedup"] for r in pts], ls, label=f"{dev}{' graphs' if graphs else ''}"
            )
    first = res["single_gpu_pairs"][0]
    lim = [
        r
        for r in res["single_gpu_pairs"]
        if r["device"] == first["device"] and r["cuda_graphs"] == first["cuda_graphs"]
    ]
    ax.plot([r["pairs"] for r in lim], [r["limit"] for r in lim], "k:", label="limit L/(L-p)")
    ax.set(
        title=f"PREDICTION: SmolLM2-135M, 1 GPU, batch 1, context {README_CONTEXT}\n"
        "(time saved per pair from the real 2-pair export, linear in pairs)",
        xlabel="pairs",
        ylabel="predicted speed-up",
    )
    ax.legend(fontsize=6)
    ax = axes[1]
    for r0 in [r for r in res["tp2"] if r["pairs"] == 0 and r["device"] == "A100-SXM4-80GB" and r["batch"] == 1]:
        pts = [
            r
            for r in res["tp2"]
            if all(r[k] == r0[k] for k in ("model", "device", "batch", "link_latency_us", "cuda_graphs"))
        ]
        ax.plot(
            [r["paired_layers"] for r in pts],
            [r["speedup"] for r in pts],
            "--" if r0["cuda_graphs"] else "-",
            label=f"{r0['model']} link {r0['link_latency_us']:.0f}us{' graphs' if r0['cuda_graphs'] else ''}",
        )
    for q in res["paper"]["quoted"]:
        ax.axhline(q["speedup"], color="red", lw=0.8)
    ax.set(
        title="PREDICTION: 2x A100 tensor parallel, batch 1, context 2048\n"
        "(red line: 1.19x, quoted from the paper's abstract; pair count unknown)",
        xlabel="paired layers (Δ)",
        ylabel="predicted speed-up",
    )
    ax.legend(fontsize=5)
    fig.suptitle("Predicted decode speed-up from layer pairing — predictions, not measurements")
    fig.tight_layout()
    path = out / "perf_model.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _kernel_source_line(res: dict[str, Any]) -> str:
    src = res.get("kernel_source")
    if not src:
        return f"GPU kernel list: {res['assumptions'][0]}."
    parts = []
    for name, v in src.items():
        c = v.get("counts")
        n = f", {c['kernels']} kernels per decode step" if c else ""
        parts.append(f"{name} from {v['source']}{n}")
    return "GPU kernel list: " + "; ".join(parts) + "."


def _launch_costs(res: dict[str, Any]) -> str:
    gpus = [d for d in res["devices"].values() if d.get("launch_graph_s") is not None]
    eager = sorted({1e6 * d["launch_eager_s"] for d in gpus})
    graph = sorted({1e6 * d["launch_graph_s"] for d in gpus})
    return (
        f"assumed per-kernel costs ({'/'.join(f'{x:g}' for x in eager)} us eager, "
        f"{'/'.join(f'{x:g}' for x in graph)} us in a CUDA graph)"
    )


def readme_block(res: dict[str, Any], json_rel: str = RESULTS_JSON) -> str:
    """The README's prediction table (between the markers, markers included), from the result JSON only."""
    lines = [
        README_BEGIN,
        f"<!-- generated from {json_rel} by `python -m benchmarks.perf_model --readme`; do not edit by hand -->",
        "",
        f"**PREDICTION — not a measurement.** Performance model run {res['date']} (`{json_rel}`): predicted decode "
        "time per token and LP/original speed-up per device x model x batch, beside the depth limit L/(L-p). "
        f"Datasheet bandwidth and peak, {_launch_costs(res)}; no GPU has checked these figures. "
        f"{_kernel_source_line(res)}",
        "",
        *_gpu_table(res, predicted_header=True),
        "",
        *([*paper_table(res["paper_comparison"], full=False), ""] if "paper_comparison" in res else []),
        README_END,
    ]
    return "\n".join(lines)


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with the span from README_BEGIN to README_END (inclusive) replaced by ``block``."""
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"README.md must hold {README_BEGIN} and {README_END} exactly once each")
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    if end < start:
        raise ValueError(f"{README_END} comes before {README_BEGIN} in README.md")
    return text[:start] + block + text[end:]


def readme_span(text: str) -> str:
    """What README.md holds from README_BEGIN to README_END (inclusive)."""
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    return text[start:end]


def write_readme(res: dict[str, Any], json_path: Path, readme: Path) -> None:
    repo = readme.resolve().parent
    try:
        rel = str(json_path.resolve().relative_to(repo))
    except ValueError:
        rel = str(json_path)
    readme.write_text(replace_readme_block(readme.read_text(), readme_block(res, rel)))
