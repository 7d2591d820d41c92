"""The accuracy study behind docs/accuracy.md: on SmolLM2 (or any model), compare at equal depth

* the best contiguous range (chosen on calibration text),
* ``--pairs auto`` (the search frontier, chosen on calibration text),
* ``--pairs auto`` + ``--heal``,

on held-out text: the first ``--eval-tokens`` tokens of the default text (pydoc topics), while calibration
reads its last tokens (search: ``--calib-tokens``; contiguous selection: ``--contig-calib-tokens``; healing:
``--heal-tokens``). Prints a markdown table and writes JSON.

    python -m layerpair.evaluation.study --depths 28,26,24 --json study.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from layerpair.evaluation.data import default_text, encoder, windows_from_tokens
from layerpair.evaluation.heal import DEFAULT_DAMPING, heal_pairs
from layerpair.evaluation.metrics import TorchBackend, text_metrics
from layerpair.evaluation.search import Scorer, auto_pairs
from layerpair.evaluation.selection import calibration_windows
from layerpair.exporter.model import Decoder


def contiguous_choice(dec: Decoder, cal: torch.Tensor, n: int) -> tuple[tuple[tuple[int, int], ...], float]:
    """Best range S:S+2n on ``cal`` (every start tried)."""
    L = dec.arch.num_layers
    sc = Scorer(dec, cal, 4)
    st = sc.states(())
    base = sc.nll_from_states(st)
    runs = {tuple((i, i + 1) for i in range(s, s + 2 * n, 2)): s for s in range(0, L - 2 * n + 1)}
    nll = {k: sc.nll(k, st, s) for k, s in runs.items()}
    k = min(nll, key=nll.__getitem__)
    return k, math.exp(nll[k] - base)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m layerpair.evaluation.study")
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--depths", default="28,26,24")
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--contig-calib-tokens", type=int, default=1024)
    p.add_argument("--heal-tokens", type=int, default=16384)
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="PNG: calibration frontier and held-out points")
    a = p.parse_args(argv)
    from layerpair.exporter.loading import load_checkpoint

    depths = sorted({int(x) for x in a.depths.split(",")}, reverse=True)
    ck = load_checkpoint(a.model)
    dec = ck.decoder(())
    toks = encoder(ck.tokenizer)(default_text())
    ev = windows_from_tokens(toks, 512, a.eval_tokens)
    cal = calibration_windows(toks, a.calib_tokens, 512, ev)
    ref = TorchBackend(dec, ())

    def held_out(backend: TorchBackend) -> dict[str, Any]:
        m = text_metrics(backend, ev, ref)
        return {"ratio": m.ppl_ratio, "kl": m.kl, "top1": m.top1, "ppl": m.ppl, "ref_ppl": m.ref_ppl}

    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[study {time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    say(f"searching pairs down to depth {min(depths)} on {cal.numel()} calibration tokens")
    res = auto_pairs(dec, cal, target_depth=min(depths), beam=a.beam, candidates=a.candidates, progress=say)
    print(res.table(), file=sys.stderr)
    rows: dict[int, dict[str, Any]] = {}
    for d in depths:
        pt = res.point(d)
        assert pt is not None
        row = rows.setdefault(d, {})
        row["auto"] = {"pairs": pt.pairs, "calib_ratio": pt.ratio, **held_out(TorchBackend(dec, pt.pairs))}
        say(f"depth {d}: healing {len(pt.pairs)} pairs on {a.heal_tokens} tokens")
        cal_h = calibration_windows(toks, a.heal_tokens, 512, ev)
        healed, _ = heal_pairs(dec, pt.pairs, cal_h, damping=DEFAULT_DAMPING)  # the damping of the documented study
        row["auto_heal"] = {"pairs": pt.pairs, **held_out(TorchBackend(healed))}
        say(f"depth {d}: best contiguous range")
        pairs, r = contiguous_choice(
            dec, calibration_windows(toks, a.contig_calib_tokens, 512, ev), dec.arch.num_layers - d
        )
        row["contiguous"] = {"pairs": pairs, "calib_ratio": r, **held_out(TorchBackend(dec, pairs))}
    out = {"rows": rows, "auto": res.to_json(), "seconds": time.perf_counter() - t0, "args": vars(a)}
    print(markdown_table(rows))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    if a.plot:
        plot_study(out, a.plot)
    return 0


def plot_study(out: dict[str, Any], path: Path) -> None:
    """Depth -> perplexity ratio: the search frontier on calibration text, and the held-out points of the best
    contiguous range, ``--pairs auto`` and ``--pairs auto --heal`` (``out`` as written by ``--json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {int(d): r for d, r in out["rows"].items()}
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    front = sorted((p["depth"], p["ratio"]) for p in out["auto"]["frontier"])
    ax.plot([d for d, _ in front], [r for _, r in front], "o-", color="#999", label="auto, calibration text")
    for key, style, label in (
        ("contiguous", "s--", "best contiguous range, held out"),
        ("auto", "o-", "--pairs auto, held out"),
        ("auto_heal", "^-", "--pairs auto --heal, held out"),
    ):
        pts = sorted((d, r[key]["ratio"]) for d, r in rows.items() if key in r)
        ax.plot([d for d, _ in pts], [r for _, r in pts], style, label=label)
    ax.axhline(1.15, color="#c44", lw=0.8, ls=":", label="goal x1.15 at depth 24")
    ax.set_xlabel("depth (layers after pairing)")
    ax.set_ylabel("perplexity ratio vs original")
    ax.set_yscale("log")
    fmt = matplotlib.ticker.FormatStrFormatter("x%.2f")  # ratios, not powers of ten
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.invert_xaxis()
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{out['args']['model']}: held-out = first {out['args']['eval_tokens']} tokens", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_table(rows: dict[int, dict[str, Any]]) -> str:
    from layerpair.exporter.pairs import format_pairs

    lines = [
        "| depth | best contiguous (pairs) | auto (pairs) | auto + heal |",
        "|---:|---|---|---:|",
    ]
    for d in sorted(rows, reverse=True):
        r = rows[d]

        def cell(k: str, r: dict[str, Any] = r) -> str:
            if k not in r:
                return "—"
            pairs = format_pairs(tuple(tuple(p) for p in r[k]["pairs"]))
            return f"x{r[k]['ratio']:.3f} ({pairs})"

        heal = f"x{r['auto_heal']['ratio']:.3f}" if "auto_heal" in r else "—"
        lines.append(f"| {d} | {cell('contiguous')} | {cell('auto')} | {heal} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
