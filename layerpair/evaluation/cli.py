"""``layerpair-export eval``: accuracy of a layer-parallel model against the original, on PyTorch and ONNX.

    layerpair-export eval MODEL --pairs SPEC [--text FILE] [--tokens N] [--mc FILE.jsonl] [--onnx OUT_DIR]
                          [--heal] [--json OUT.json]
    layerpair-export eval MODEL --pairs auto --max-ppl-increase 5% [--target-depth N] [--plot frontier.png]

Evaluation reads the first ``--tokens`` tokens of the text. Each calibration use has a source, ``text`` (the last
tokens of the same text, or of ``--calib-text``, never overlapping the evaluation) or ``generated`` (text sampled
from the original model itself, ``layerpair/evaluation/generated.py``):

* the ``--pairs auto`` search reads ``--calib-tokens`` (default 2048); its source defaults to ``text``;
* ``--heal`` reads ``--heal-tokens`` (default 16384, capped by a text); its source defaults to ``generated``
  (healing on the model's own samples transfers to other domains; healing on one text does not:
  docs/accuracy.md).

``--calib-text FILE`` (in-domain text) is used for both; ``--calib generated|text`` sets both;
``--heal-calib generated|text`` sets healing's alone (it wins over ``--calib``). report.json ``calibration``
records the source of each use (``search``, ``heal``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerpair.errors import InputError, OutputError, ValidationError
from layerpair.evaluation.data import (
    DEFAULT_WINDOW,
    Encode,
    MCItem,
    check_text_arg,
    encoder,
    read_mc_arg,
    text_from_arg,
    windows_from_tokens,
)
from layerpair.evaluation.generated import DEFAULT_LENGTH, DEFAULT_SEQUENCES
from layerpair.evaluation.heal import DEFAULT_INPUT_REFIT, INPUT_REFITS
from layerpair.evaluation.metrics import (
    DEFAULT_BATCH,
    OnnxBackend,
    TextMetrics,
    TorchBackend,
    mc_metrics,
    onnx_disagreement,
    ppl_rel_diff,
)
from layerpair.evaluation.metrics import text_metrics_many as compute_text_metrics_many
from layerpair.evaluation.selection import (
    CALIB_SOURCES,
    DEFAULT_HEAL_CALIB,
    DEFAULT_SEARCH_CALIB,
    calibration,
    check_selection_args,
    select_pairs,
)

DEFAULT_TOKENS = 8192
DEFAULT_CALIB_TOKENS = 2048
ONNX_REL_TOL = 1e-3


def say(msg: str) -> None:
    print(f"[layerpair] {msg}", file=sys.stderr, flush=True)


def add_heal_inputs_arg(p: Any) -> None:  # a parser or an argument group
    """``--heal-inputs none|b|ab`` (``refit_inputs_flag`` turns it into ``heal_pairs``' argument)."""
    p.add_argument(
        "--heal-inputs",
        choices=("none", *INPUT_REFITS),
        default=DEFAULT_INPUT_REFIT,
        help="--heal also refits the input projections the parallel pair feeds another residual: b = layer b's "
        f"q/k/v and gate/up, ab = also layer a's gate/up (default {DEFAULT_INPUT_REFIT}); none = o_proj/down_proj only",
    )


def add_selection_args(p: argparse.ArgumentParser) -> None:
    """``--pairs auto`` search and ``--heal`` flags, shared by ``eval`` and (when wired) the export CLI."""
    g = p.add_argument_group("automatic pairs and healing (calibration text)")
    g.add_argument("--max-ppl-increase", default=None, help="--pairs auto budget, e.g. 5%% (calibration perplexity)")
    g.add_argument("--target-depth", type=int, default=None, help="--pairs auto: layers left after pairing")
    g.add_argument("--beam", type=int, default=2, help="--pairs auto beam width (default 2)")
    g.add_argument("--plot", type=Path, default=None, help="--pairs auto: save the frontier as this PNG")
    g.add_argument("--heal", action="store_true", help="refit each pair's o_proj/down_proj on calibration text")
    add_heal_inputs_arg(g)
    g.add_argument(
        "--heal-damping",
        type=float,
        default=None,
        help="ridge damping of --heal (default: chosen per fit from 1e-3..0.3 on held-out calibration windows)",
    )
    g.add_argument(
        "--calib-text",
        default=None,
        help="calibration text file or hf:PATH[:CONFIG]:SPLIT, used by the search and healing (implies --calib text)",
    )
    g.add_argument(
        "--calib",
        choices=CALIB_SOURCES,
        default=None,
        help="calibration source of both the search and healing: text sampled from the model itself, or text "
        f"(--calib-text, else the end of the default text) (default: search {DEFAULT_SEARCH_CALIB}, "
        f"heal {DEFAULT_HEAL_CALIB})",
    )
    g.add_argument(
        "--heal-calib",
        choices=CALIB_SOURCES,
        default=None,
        help=f"calibration source of --heal alone, overriding --calib (default {DEFAULT_HEAL_CALIB}; "
        "text with --calib-text)",
    )
    g.add_argument("--calib-samples", type=int, default=DEFAULT_SEQUENCES, help="generated calibration: sequences")
    g.add_argument("--calib-length", type=int, default=DEFAULT_LENGTH, help="generated calibration: tokens each")
    g.add_argument("--calib-seed", type=int, default=0, help="generated calibration: sampling seed (default 0)")
    g.add_argument(
        "--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS, help=f"--pairs auto (default {DEFAULT_CALIB_TOKENS})"
    )
    g.add_argument(
        "--heal-tokens", type=int, default=None, help="--heal calibration tokens (default 16384, capped by the text)"
    )


def eval_parser() -> argparse.ArgumentParser:
    from layerpair.exporter.loading import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="layerpair-export eval",
        description="Perplexity, top-1 agreement and KL against the original, and multiple-choice accuracy of a "
        "layer-parallel model (PyTorch, and an exported ONNX with --onnx).",
    )
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"checkpoint (default: {DEFAULT_MODEL})")
    p.add_argument("--pairs", default="none", help="S:E, a list like 10-11,14-15, none, or auto")
    p.add_argument(
        "--text",
        default=None,
        help="UTF-8 text file, or hf:PATH[:CONFIG]:SPLIT (datasets) (default: CPython's pydoc_data.topics prose)",
    )
    p.add_argument("--text-field", default="text", help="column of an hf: --text / --calib-text (default: text)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to score (default {DEFAULT_TOKENS})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"window length (default {DEFAULT_WINDOW})")
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="windows per forward (default 4)")
    p.add_argument(
        "--mc", default=None, help="multiple-choice JSONL {question, choices, answer}, or hf:PATH[:CONFIG]:SPLIT"
    )
    p.add_argument("--onnx", type=Path, default=None, help="export directory (model.onnx) to evaluate as well")
    p.add_argument("--json", type=Path, default=None, help="write all figures to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    add_selection_args(p)
    return p


def _check_args(a: argparse.Namespace) -> None:
    """Everything that can be checked before the model is loaded."""
    from layerpair.exporter.pairs import parse_pairs

    for name in ("tokens", "window", "batch", "calib_tokens", "heal_tokens"):
        v = getattr(a, name)
        if v is not None and v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {v}", "pass a positive integer")
    if a.tokens < a.window:
        raise InputError(f"--tokens {a.tokens} is shorter than one window ({a.window})", f"pass --tokens >= {a.window}")
    check_selection_args(a)
    if a.pairs.strip().lower() != "auto":
        parse_pairs(a.pairs, 1 << 30)  # syntax only; the range check runs once the depth is known
    for f, flag in ((a.text, "--text"), (a.calib_text, "--calib-text"), (a.mc, "--mc")):
        check_text_arg(f, flag)
    if a.onnx is not None and not (a.onnx / "model.onnx").is_file() and a.onnx.suffix != ".onnx":
        raise InputError(f"'{a.onnx}' holds no model.onnx", "pass an export directory written by layerpair-export")
    if a.json is not None and a.json.parent.exists() and not os.access(a.json.parent, os.W_OK):
        raise OutputError(f"cannot write '{a.json}'", "choose a writable --json location")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / float(np.maximum(abs(b), 1e-30))  # NaN-propagating (Python's max(nan, x) may drop it)


def run_eval_cli(argv: Sequence[str]) -> int:
    a = eval_parser().parse_args(argv)
    _check_args(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    mc_items: list[MCItem] | None = read_mc_arg(a.mc) if a.mc else None
    text = text_from_arg(a.text, a.text_field)  # empty / unreadable text fails before the model loads

    from layerpair.exporter.loading import load_checkpoint

    t0 = time.perf_counter()
    say(f"loading {a.model}")
    ck = load_checkpoint(a.model, say)
    dec0 = ck.decoder(())  # read tensor by tensor; the checkpoint keeps no copy
    if ck.tokenizer is None:
        raise InputError(f"model '{a.model}' has no tokenizer", "use a checkpoint that ships one")
    encode = encoder(ck.tokenizer)
    tokens = encode(text)
    ev = windows_from_tokens(tokens, a.window, a.tokens)
    calibs = calibration(a, dec0, ck.tokenizer, encode, tokens, say)
    sel = select_pairs(a, dec0, calibs, eval_windows=ev, progress=say)
    sel.report.update(calibs.report)
    report: dict[str, Any] = {
        "model": a.model,
        "pairs": [list(p) for p in sel.pairs],
        "depth": ck.arch.num_layers - len(sel.pairs),
        "num_layers": ck.arch.num_layers,
        "text": str(a.text) if a.text else "pydoc_data.topics (sorted keys, joined by blank lines)",
        "eval_tokens": {"first": int(ev.numel()), "window": a.window, "scored_per_window": a.window - 1},
        **sel.report,
    }
    metrics = _score(a, report, TorchBackend(sel.decoder), TorchBackend(dec0, ()), ev, mc_items, encode)
    report["seconds_total"] = round(time.perf_counter() - t0, 2)
    print(summary(report))
    if a.json is not None:
        write_json(a.json, report)
    why = onnx_disagreement(metrics[1], metrics[0], ONNX_REL_TOL) if a.onnx is not None else None
    if why is not None:
        raise ValidationError(why, "the export does not match these --pairs/--heal flags, or one runtime is broken")
    return 0


def _score(
    a: argparse.Namespace,
    report: dict[str, Any],
    lp: TorchBackend,
    ref: TorchBackend,
    ev: torch.Tensor,
    mc_items: list[MCItem] | None,
    encode: Encode,
) -> list[TextMetrics]:
    """Text metrics of the LP model (and of ``--onnx``) against the original ``ref`` on the windows ``ev``
    [N,W], plus multiple choice with ``--mc``; the figures go into ``report`` ("pytorch", "onnx",
    "onnx_vs_pytorch_rel", "seconds_text_metrics"). Returns the text metrics, PyTorch first."""
    onnx: OnnxBackend | None = None
    if a.onnx is not None:
        path = a.onnx if a.onnx.suffix == ".onnx" else a.onnx / "model.onnx"
        onnx = OnnxBackend(path)
        say(f"scoring {ev.numel()} tokens ({ev.shape[0]} windows of {a.window}) on PyTorch and ONNX Runtime ({path})")
    else:
        say(f"scoring {ev.numel()} tokens ({ev.shape[0]} windows of {a.window}) on PyTorch")
    # One pass: the original model runs once per batch and serves as the reference of both backends.
    t = time.perf_counter()
    metrics = compute_text_metrics_many([lp] if onnx is None else [lp, onnx], ev, ref, batch=a.batch)
    text_s = time.perf_counter() - t
    onnx_s = onnx.seconds if onnx is not None else 0.0
    tm = metrics[0]
    report["pytorch"] = {"text": tm.to_json(), "seconds": round(text_s - onnx_s, 2)}
    if mc_items is not None:
        report["pytorch"]["mc"] = mc_metrics(lp, mc_items, encode).to_json()
        report["pytorch"]["mc_original"] = mc_metrics(ref, mc_items, encode).to_json()
    if onnx is not None:
        om = metrics[1]
        report["onnx"] = {"text": om.to_json(), "seconds": round(onnx_s, 2)}
        if mc_items is not None:
            report["onnx"]["mc"] = mc_metrics(onnx, mc_items, encode).to_json()
        report["onnx_vs_pytorch_rel"] = {"ppl": ppl_rel_diff(om, tm), "kl": _rel(om.kl or 0.0, tm.kl or 0.0)}
    report["seconds_text_metrics"] = round(text_s, 2)
    return metrics


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a temporary sibling renamed into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:
        raise OutputError(f"cannot write '{path}' ({e.strerror})", "choose a writable --json location") from None


def summary(r: dict[str, Any]) -> str:
    from layerpair.exporter.pairs import format_pairs

    pt = r["pytorch"]["text"]
    lines = [
        f"{r['model']}: {r['num_layers']} layers -> depth {r['depth']}, pairs "
        f"{format_pairs(tuple(tuple(p) for p in r['pairs']))}" + ("  (healed)" if r.get("heal") else ""),
        f"  text: {r['text']}, {pt['scored_tokens']} scored tokens ({pt['windows']} windows of {pt['window']})",
        "  backend   ppl      original  ratio   top1    KL",
    ]
    for name in ("pytorch", "onnx"):
        if name in r:
            m = r[name]["text"]
            lines.append(
                f"  {name:8s}  {m['ppl']:<8.3f} {m['ref_ppl']:<9.3f} {m['ppl_ratio']:<7.4f} {m['top1']:<7.4f} "
                f"{m['kl']:.4f}   ({r[name]['seconds']:.1f} s)"
            )
    for name in ("pytorch", "onnx"):
        if name in r and "mc" in r[name]:
            mc = r[name]["mc"]
            orig = r["pytorch"].get("mc_original")
            extra = f"  (original: acc {orig['acc']:.4f} acc_norm {orig['acc_norm']:.4f})" if orig else ""
            lines.append(
                f"  {name:8s}  MC {mc['items']} items: acc {mc['acc']:.4f} acc_norm {mc['acc_norm']:.4f}{extra}"
            )
    if "seconds_text_metrics" in r:
        rest = r["seconds_total"] - r["seconds_text_metrics"]
        lines.append(
            f"  scoring took {r['seconds_text_metrics']:.1f} s (the original model runs once, as the reference of "
            f"every backend; onnx = its own session time); load and pair selection {rest:.1f} s"
        )
    if "onnx_vs_pytorch_rel" in r:
        lines.append(f"  ONNX vs PyTorch: ppl rel diff {r['onnx_vs_pytorch_rel']['ppl']:.2e}")
    return "\n".join(lines)
