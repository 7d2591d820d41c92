"""``layerpair-export bench OUT [--baseline ORIGINAL_OUT]``: same-run latency of an export against its baseline.

    models_for -> [export, baseline]      ONNX Runtime sessions (or PyTorch Decoders with --runtime torch)
    run_rounds -> samples                  interleaved rounds, rotating start, warm-up round(s) discarded
    results_from -> rows                   median / IQR per metric, ratio beside the depth limit L / (L - pairs)
    latency_section -> report["latency"]   the schema ``layerpair-export check`` gates (layerpair/deploy/check.py)

Every timing goes through ``decode.time_decode``, i.e. the decode loop ``generate`` and the Triton model use.
``latency`` holds numbers only (``check`` treats every key as a metric): ``decode_ms_per_token`` and
``prefill_ms`` for the first ``--batch``, ``..._b<N>`` for the others, and ``same_run_baseline`` with the same
keys. Everything else (samples, IQR, ratios and limits, machine, threads, versions) goes to ``bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerpair.decode import StepFn, time_decode
from layerpair.deploy.check import SAME_RUN_KEY, load_report, write_atomic
from layerpair.deploy.generate import Export, export_from_dir, generator_from_export, read_report
from layerpair.errors import InputError, MissingDependencyError

SCHEMA = "layerpair-bench/latency/1"
METRICS = ("decode_ms_per_token", "prefill_ms")
PLOT_DECODE = 8  # tokens timed per context length for --plot: enough for a median, short next to the prefill


@dataclass
class Timed:
    """One model to time: its step function, its empty state for a batch, and what the limit needs."""

    name: str  # "export" | "baseline"
    step: StepFn
    empty: Callable[[int], Any]
    num_layers: int
    num_pairs: int
    vocab: int
    source: str


@dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...]
    prompt: int
    decode: int
    rounds: int
    warmup: int = 1


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ---- input checks --------------------------------------------------------------------------------------------
def positive_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag} must be positive integers separated by commas, got '{text}'", "e.g. 1,4") from None
    if not vals or any(v < 1 for v in vals):
        raise InputError(f"{flag} must be positive integers, got '{text}'", f"pass e.g. {flag} 1,4")
    return vals


def _positive(value: int, flag: str, example: str) -> int:
    if value < 1:
        raise InputError(f"{flag} must be >= 1, got {value}", f"pass e.g. {flag} {example}")
    return value


def _tensor(t: dict[str, Any]) -> str:
    return f"{t['name']} {t['dtype']} {t['dims']}"


def io_mismatch(ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """Why two exports' I/O specs cannot be timed against each other (None: they can).

    The cache slots may differ by design (a merged pair is one wide slot), so what must agree is everything a
    caller feeds or reads: the token inputs, the logits, the cache dtype and head size, and the layers covered.
    """
    try:
        for a, b in zip(
            ours["inputs"][:3] + ours["outputs"][:1], theirs["inputs"][:3] + theirs["outputs"][:1], strict=True
        ):
            if a != b:
                return f"{_tensor(b)} vs the export's {_tensor(a)}"
        caches = [
            (
                {(t["dtype"], t["dims"][3]) for t in io["inputs"][3:]},
                sorted(x for s in io["cache_slots"] for x in s["layers"]),
            )
            for io in (ours, theirs)
        ]
    except (KeyError, TypeError, IndexError, ValueError) as e:
        return f"unreadable 'io' section ({type(e).__name__}: {e})"
    if caches[0][0] != caches[1][0]:
        return f"cache dtype/head size {sorted(caches[1][0])} vs the export's {sorted(caches[0][0])}"
    if caches[0][1] != caches[1][1]:
        return f"cache layers {caches[1][1]} vs the export's {caches[0][1]}"
    return None


def check_baseline(export: Export, baseline: Export) -> None:
    ours, theirs = export.report["io"], baseline.report["io"]
    fix = "pass the --pairs none export of the same model as --baseline"
    try:
        v_ours, v_theirs = ours["outputs"][0]["dims"][-1], theirs["outputs"][0]["dims"][-1]
    except (KeyError, TypeError, IndexError):
        raise InputError(f"'{baseline.directory}/report.json' has an unreadable 'io' section", fix) from None
    if v_ours != v_theirs:
        raise InputError(
            f"baseline '{baseline.directory}' has a vocabulary of {v_theirs} tokens, the export '{export.directory}' "
            f"{v_ours}: not the same model",
            fix,
        )
    why = io_mismatch(ours, theirs)
    if why is not None:
        raise InputError(f"baseline '{baseline.directory}' has a different I/O spec: {why}", fix)


# ---- what is timed -------------------------------------------------------------------------------------------
def _pairs(report: dict[str, Any]) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in report.get("pairs") or []]


def _num_layers(report: dict[str, Any], io: dict[str, Any]) -> int:
    n = report.get("num_layers")
    return int(n) if isinstance(n, int) else len({x for s in io["cache_slots"] for x in s["layers"]})


def ort_timed(name: str, export: Export, threads: int | None) -> Timed:
    gen = generator_from_export(export, threads=threads)
    L = _num_layers(export.report, export.report["io"])
    V = int(export.report["io"]["outputs"][0]["dims"][-1])
    return Timed(name, gen.step, gen.io.empty_state, L, len(_pairs(export.report)), V, str(export.directory))


def torch_timed(name: str, report: dict[str, Any], source: str) -> Timed:
    """The PyTorch Decoder of ``report["model"]`` with the report's pairs (unmerged: PyTorch runs both branches)."""
    try:
        import torch

        from layerpair.exporter.loading import load_checkpoint
    except ImportError as e:
        raise MissingDependencyError(f"--runtime torch needs torch ({e})", "pip install layerpair-export") from None
    pairs = _pairs(report)
    dec = load_checkpoint(str(report["model"]), None).decoder(pairs).eval()
    a = dec.arch

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[Any]) -> tuple[np.ndarray, list[Any]]:
        with torch.no_grad():
            out = dec(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), *past)
        return out[0].numpy(), list(out[1:])

    def empty(batch: int) -> list[Any]:
        # Unmerged Decoder: one (key, value) slot per layer, in layer order (IOSpec.for_model without merge).
        return [torch.zeros(batch, a.num_kv_heads, 0, a.head_dim) for _ in range(2 * a.num_layers)]

    return Timed(name, step, empty, a.num_layers, len(pairs), a.vocab_size, source)


def trt_refusal() -> InputError | MissingDependencyError:
    """Why ``--runtime trt`` gives no numbers here (never a made-up figure)."""
    from layerpair.engine.build import gpu_status

    ok, why = gpu_status()
    if not ok:
        return MissingDependencyError(
            f"--runtime trt times the TensorRT engine on an NVIDIA GPU, and this machine cannot run one: {why}",
            "run it on a GPU machine, or time the ONNX model here with --runtime ort",
        )
    return InputError(
        "--runtime trt: bench does not time TensorRT engines yet (a GPU is present)",
        "use python -m benchmarks.gpu for engine timings, or --runtime ort",
    )


def models_for(args: argparse.Namespace, export: Export) -> list[Timed]:
    """[export] or [export, baseline], loaded and checked before any timing."""
    if args.runtime == "trt":
        raise trt_refusal()
    baseline = export_from_dir(args.baseline) if args.baseline is not None else None
    if baseline is not None:
        check_baseline(export, baseline)
    if args.runtime == "torch":
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        ref = baseline.report if baseline is not None else {**export.report, "pairs": []}
        src = str(args.baseline) if baseline is not None else f"{export.report.get('model')} (original, no pairs)"
        return [torch_timed("export", export.report, str(export.directory)), torch_timed("baseline", ref, src)]
    models = [ort_timed("export", export, args.threads)]
    if baseline is not None:
        models.append(ort_timed("baseline", baseline, args.threads))
    return models


# ---- timing --------------------------------------------------------------------------------------------------
def prompt_ids(batch: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (batch, length)).astype(np.int64)


def run_rounds(
    models: Sequence[Timed], ids_BS: np.ndarray, s: Settings, label: str, say: Callable[[str], None] = _say
) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds: every model once per round, the start rotating, so load drift hits all alike.

    The first ``s.warmup`` rounds are discarded (ONNX Runtime plans and allocates on its first runs).
    Returns name -> metric -> per-round values (ms).
    """
    out: dict[str, dict[str, list[float]]] = {m.name: {k: [] for k in METRICS} for m in models}
    total = s.warmup + s.rounds
    for r in range(total):
        line = []
        for j in range(len(models)):
            m = models[(r + j) % len(models)]
            prefill_s, steps_s = time_decode(m.step, m.empty(ids_BS.shape[0]), ids_BS, s.decode)
            decode_ms, prefill_ms = 1e3 * sum(steps_s) / len(steps_s), 1e3 * prefill_s
            if r >= s.warmup:
                out[m.name]["decode_ms_per_token"].append(decode_ms)
                out[m.name]["prefill_ms"].append(prefill_ms)
            line.append(f"{m.name} decode {decode_ms:.2f} ms/token, prefill {prefill_ms:.1f} ms")
        tag = " (warm-up, discarded)" if r < s.warmup else ""
        say(f"{label} round {r + 1}/{total}{tag}: " + " | ".join(line))
    return out


def summary(xs: Sequence[float]) -> dict[str, Any]:
    q = np.quantile(np.asarray(xs, float), [0.25, 0.5, 0.75]) if xs else [float("nan")] * 3
    return {"median": float(q[1]), "q25": float(q[0]), "q75": float(q[2]), "iqr": float(q[2] - q[0]), "n": len(xs)}


def depth_limit(ours: Timed, ref: Timed) -> float:
    """Latency ratio bound if time were proportional to sequential depth: baseline depth / export depth,
    i.e. L / (L - pairs) against a baseline without pairs."""
    return (ref.num_layers - ref.num_pairs) / (ours.num_layers - ours.num_pairs)


def results_from(
    models: Sequence[Timed], samples: dict[str, dict[str, list[float]]], batch: int
) -> list[dict[str, Any]]:
    """One row per metric: medians, IQR, per-round ratio (same round: slow drift cancels) beside the limit."""
    rows = []
    for metric in METRICS:
        row: dict[str, Any] = {"batch": batch, "metric": metric}
        for m in models:
            row[m.name] = {**summary(samples[m.name][metric]), "samples": samples[m.name][metric]}
        if len(models) == 2:
            ours, ref = samples[models[0].name][metric], samples[models[1].name][metric]
            row["latency_ratio"] = statistics.median(ours) / statistics.median(ref)
            row["paired_latency_ratio"] = summary([a / b for a, b in zip(ours, ref, strict=True)])
            row["speedup"] = 1.0 / row["latency_ratio"]
            row["limit"] = depth_limit(models[0], models[1])
        rows.append(row)
    return rows


def _key(metric: str, batch: int, first: int) -> str:
    return metric if batch == first else f"{metric}_b{batch}"


def latency_section(rows: Sequence[dict[str, Any]], batches: Sequence[int]) -> dict[str, Any]:
    """The numbers ``check`` gates: medians in ms, and the baseline's from the same run when it was timed."""
    sec: dict[str, Any] = {}
    same: dict[str, float] = {}
    for row in rows:
        k = _key(row["metric"], row["batch"], batches[0])
        sec[k] = row["export"]["median"]
        if "baseline" in row:
            same[k] = row["baseline"]["median"]
    if same:
        sec[SAME_RUN_KEY] = same
    return sec


# ---- facts beside the numbers --------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    """CPU, cores, memory, load: the same facts as benchmarks/common.machine() (benchmarks/ is not installed)."""
    facts: dict[str, Any] = {"cpu": platform.processor() or "", "logical_cores": os.cpu_count(), "memory_gb": None}
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines() + Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        info = []
    names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    facts["cpu"] = names[0] if names else facts["cpu"]
    for line in info:
        if line.startswith("MemTotal"):
            facts["memory_gb"] = round(int(line.split()[1]) / 2**20, 1)
    facts["platform"] = platform.platform()
    facts["python"] = platform.python_version()
    facts["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return facts


def runtime_facts(runtime: str, threads: int | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(threads, versions) of the runtime that was timed."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"numpy": np.__version__}
    for pkg in ("layerpair-export", "onnxruntime", "torch"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    if runtime == "torch":
        import torch

        return {"torch_intra_op": torch.get_num_threads()}, versions
    # ORT's default (0) is one intra-op thread per physical core; say which one ran.
    return {"ort_intra_op": threads or 0, "ort_default": not threads, "logical_cores": os.cpu_count()}, versions


# ---- output --------------------------------------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["batch  metric               export (median, IQR)      baseline (median, IQR)    ratio   limit"]
    for r in rows:
        e = r["export"]
        b = r.get("baseline")
        base = f"{b['median']:9.3f} ms ±{b['iqr']:7.3f}" if b else "-".ljust(22)
        ratio = f"x{r['latency_ratio']:.3f}  x{r['limit']:.3f}" if "limit" in r else "-       -"
        lines.append(f"{r['batch']:5d}  {r['metric']:<19}  {e['median']:9.3f} ms ±{e['iqr']:7.3f}    {base}    {ratio}")
    lines.append("ratio: export latency / baseline latency (lower is faster); limit: L/(L-pairs), the depth speed-up")
    return "\n".join(lines)


def plot_contexts(models: Sequence[Timed], contexts: Sequence[int], rounds: int) -> dict[str, Any]:
    """Per-token decode time after a prompt of each context length (batch 1), interleaved like the main rounds."""
    s = Settings((1,), 0, PLOT_DECODE, rounds, warmup=0)  # sessions are warm from the main rounds
    per: dict[str, list[float]] = {m.name: [] for m in models}
    for c in contexts:
        got = run_rounds(models, prompt_ids(1, c, models[0].vocab), s, f"plot context {c}")
        for m in models:
            per[m.name].append(statistics.median(got[m.name]["decode_ms_per_token"]))
    return {"contexts": list(contexts), "decode_tokens": PLOT_DECODE, "rounds": rounds, "decode_ms_per_token": per}


def write_plot(data: dict[str, Any], title: str, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib", "pip install 'layerpair-export[bench]'") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in data["decode_ms_per_token"].items():
        ax.plot(data["contexts"], ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(data["contexts"], [str(c) for c in data["contexts"]])
    ax.set_xlabel("context length (tokens already in the cache)")
    ax.set_ylabel("decode time per token (ms, median)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerpair-export bench",
        description="Time prefill and per-token decode of an export against its baseline in the same run, and "
        "write the 'latency' section that 'layerpair-export check' gates.",
    )
    p.add_argument("export_dir", type=Path, metavar="OUT", help="directory written by layerpair-export")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="ORIGINAL_OUT",
        help="export of the original model (--pairs none) timed in the same run; without it --runtime ort times "
        "the export alone and --runtime torch times the original PyTorch model",
    )
    p.add_argument(
        "--runtime", choices=("ort", "trt", "torch"), default="ort", help="what runs the model (default ort)"
    )
    p.add_argument(
        "--batch", default="1", help="batch sizes, comma-separated; the first gives the plain keys (default 1)"
    )
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens prefilled per round (default 128)")
    p.add_argument("--decode", type=int, default=64, help="decode tokens timed per round (default 64)")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds after one warm-up round (default 5)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the runtime's own)")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="R.json",
        help="write the sections here instead of OUT/report.json (added to the file's object when it exists)",
    )
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="also plot decode time vs context length")
    p.add_argument("--plot-contexts", default="128,512,2048", help="context lengths for --plot (default 128,512,2048)")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Every flag checked before a model is loaded (a bad value must not cost a session)."""
    if args.threads is not None:
        _positive(args.threads, "--threads", "2")
    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        if path is not None and not Path(path).parent.is_dir():
            raise InputError(f"{flag} '{path}': directory '{Path(path).parent}' does not exist", "create it first")
    return Settings(
        positive_ints(args.batch, "--batch"),
        _positive(args.prompt, "--prompt", "128"),
        _positive(args.decode, "--decode", "64"),
        _positive(args.rounds, "--rounds", "5"),
    )


def existing_json(path: Path) -> dict[str, Any]:
    """--json adds its sections to an existing object (e.g. the ``eval --json`` file, so one ``check`` gates
    accuracy and latency together) or starts a new one."""
    return load_report(path, "--json file") if Path(path).exists() else {}


def bench_cli(argv: Sequence[str]) -> int:
    args = bench_parser().parse_args(argv)
    s = settings_from_args(args)
    contexts = positive_ints(args.plot_contexts, "--plot-contexts") if args.plot is not None else ()
    export = export_from_dir(args.export_dir)  # no report / no model: one InputError line
    models = models_for(args, export)
    rows: list[dict[str, Any]] = []
    for b in s.batches:
        ids = prompt_ids(b, s.prompt, models[0].vocab)
        rows += results_from(models, run_rounds(models, ids, s, f"batch {b}"), b)
    threads, versions = runtime_facts(args.runtime, args.threads)
    details: dict[str, Any] = {
        "schema": SCHEMA,
        "runtime": args.runtime,
        "export": models[0].source,
        "baseline": models[1].source if len(models) > 1 else None,
        "settings": {"batches": list(s.batches), "prompt": s.prompt, "decode": s.decode, "rounds": s.rounds},
        "warmup_rounds_discarded": s.warmup,
        "statistics": "median and IQR over rounds; rounds interleave the models with a rotating start",
        "results": rows,
        "machine": machine(),
        "threads": threads,
        "versions": versions,
    }
    if args.plot is not None:
        details["plot"] = plot_contexts(models, contexts, max(3, min(s.rounds, 5)))
        write_plot(details["plot"], f"{export.directory.name} vs {details['baseline']} ({args.runtime})", args.plot)
    latency = latency_section(rows, s.batches)
    print(table(rows))
    if SAME_RUN_KEY not in latency:
        _say("no baseline timed: 'check' will compare against the BASELINE file's latency (another run)")
    # Written last and atomically: an interrupted bench (Ctrl-C) leaves the report as it was.
    target = args.json or export.directory / "report.json"
    data = read_report(export.directory) if args.json is None else existing_json(args.json)
    write_atomic(target, json.dumps({**data, "latency": latency, "bench": details}, indent=2) + "\n")
    _say(f"latency written to {target}")
    return 0
