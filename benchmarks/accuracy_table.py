"""Issue 15's acceptance table: depth x {no heal, heal on the default calibration, heal in-domain} x held-out domain.

One ``--pairs auto`` search on the default search calibration (the last ``--search-tokens`` of the pydoc topics
text, beam 1, 3 candidates) down to the smallest depth gives every depth's pairs (its frontier). At each depth:

* ``none``: those pairs, not healed;
* ``default``: healed on the default heal calibration, text sampled from the model itself
  (``layerpair.evaluation.generated``, 64 x 256 tokens, seed 0);
* ``indomain``: healed on the end of the held-out text itself (up to ``--heal-tokens``, capped by what the text
  holds after its first ``--eval-tokens``), scored on that text only.

Held-out = the first ``--eval-tokens`` tokens of pydoc topics, news (``../shared/data/lee_background.txt``) and
legal prose (``/usr/share/common-licenses/GPL-3``). Prints a markdown table; ``--json`` is rewritten after every
cell, so an interrupted run keeps what it measured.

    python -m benchmarks.accuracy_table --threads 1 --json docs/accuracy_table.json

``--columns`` / ``--indomain`` run a subset and ``--search FILE`` reuses the search of an earlier ``--json``
(to split the work across processes); ``--merge A.json B.json`` combines such runs into one table.
``--search-mix [mean|worst]`` searches on pydoc end + generated samples (issue 15 lever 2) and ``--heal-inputs
b|ab`` also refits input projections when healing (lever 4; ``heal_pairs(refit_inputs=...)``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.calib_transfer import HELD_OUT
from layerpair.evaluation.cli import add_heal_inputs_arg
from layerpair.evaluation.data import default_text, encoder, read_text, windows_from_tokens
from layerpair.evaluation.generated import DEFAULT_LENGTH, GenSpec, bos_id, generated_windows
from layerpair.evaluation.heal import heal_pairs, refit_inputs_flag
from layerpair.evaluation.metrics import TorchBackend, text_metrics_many
from layerpair.evaluation.search import OBJECTIVES, auto_pairs
from layerpair.evaluation.selection import calibration_windows
from layerpair.exporter.model import Decoder
from layerpair.exporter.pairs import format_pairs

COLUMNS = ("none", "default", "indomain")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.accuracy_table")
    p.add_argument("--depths", default="28,26,24,22")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--search-tokens", type=int, default=2048)
    p.add_argument("--heal-tokens", type=int, default=16384)
    p.add_argument("--damping", type=float, default=None, help="fixed ridge damping (default: heal_pairs' choice)")
    p.add_argument("--indomain-damping", type=float, default=None, help="the in-domain column's, if different")
    add_heal_inputs_arg(p)  # issue 15 lever 4, --heal's default (tables before 2026-12-03 noon: none)
    p.add_argument("--columns", default=",".join(COLUMNS), help="subset of none,default,indomain")
    p.add_argument("--indomain", default=",".join(HELD_OUT), help="domains healed in-domain (subset)")
    p.add_argument("--search", type=Path, default=None, help="reuse the 'search' entry of an earlier --json")
    p.add_argument(
        "--search-mix",
        nargs="?",
        const="mean",
        default=None,
        choices=OBJECTIVES,
        help="search on a mixture: the pydoc-end windows (cut to 256) plus as many generated-sample tokens; "
        "the pair set's score is the mean over all windows (default) or the worst source's ratio ('worst')",
    )
    p.add_argument("--merge", type=Path, nargs="+", default=None, help="combine the cells of earlier --json runs")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared machine)")
    return p.parse_args(argv)


class Run:
    """The model, the held-out windows and the JSON being filled in."""

    def __init__(self, a: argparse.Namespace) -> None:
        from layerpair.exporter.loading import load_checkpoint

        self.a, self.t0 = a, time.perf_counter()
        ck = load_checkpoint("smollm2-135m", self.say)
        self.tokenizer, self.dec = ck.tokenizer, ck.decoder(())
        self.enc = encoder(ck.tokenizer)
        self.tokens = {k: self.enc(default_text() if f is None else read_text(f)) for k, f in HELD_OUT.items()}
        self.evs = {k: windows_from_tokens(t, 512, a.eval_tokens) for k, t in self.tokens.items()}
        self.ref = TorchBackend(self.dec, ())
        self.out: dict[str, Any] = {
            "args": vars(a),
            "held_out": {k: str(f or "pydoc_data.topics") for k, f in HELD_OUT.items()},
            "tokens": {k: len(t) for k, t in self.tokens.items()},
            "cells": {},
        }

    def say(self, msg: str) -> None:
        print(f"[table {time.perf_counter() - self.t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.out["seconds"] = round(time.perf_counter() - self.t0, 1)
        if self.a.json:
            self.a.json.write_text(json.dumps(self.out, indent=1, default=str))

    def score(self, depth: int, models: dict[str, TorchBackend], domains: Sequence[str]) -> None:
        """Every model of ``models`` (column -> model) on each of ``domains``, against one reference pass."""
        for dom in domains:
            t = time.perf_counter()
            for (column, _), m in zip(
                models.items(), text_metrics_many(list(models.values()), self.evs[dom], self.ref), strict=True
            ):
                cell = {"ratio": m.ppl_ratio, "kl": m.kl, "top1": m.top1, "ref_ppl": m.ref_ppl}
                self.out["cells"].setdefault(str(depth), {}).setdefault(column, {})[dom] = cell
                self.say(f"depth {depth} {column} {dom}: x{m.ppl_ratio:.3f}")
            self.say(f"scored {len(models)} model(s) on {dom} in {time.perf_counter() - t:.0f} s")
            self.save()


def search_pairs(run: Run, depths: list[int]) -> dict[int, tuple[tuple[int, int], ...]]:
    a = run.a
    if a.search is not None:
        res_json = json.loads(a.search.read_text())["search"]
    else:
        cal = calibration_windows(run.tokens["pydoc"], a.search_tokens, 512, run.evs["pydoc"])
        groups = None
        if a.search_mix:  # issue 15 lever 2 (mixture, mean or worst-source objective): pydoc end + own samples
            gen, _ = generated_windows(run.dec, bos_id(run.tokenizer, run.enc), run.enc, GenSpec(), run.say)
            cal = cal.reshape(-1, gen.shape[1])
            gen = gen[: cal.shape[0]]
            groups = torch.cat([torch.zeros(cal.shape[0]), torch.ones(gen.shape[0])])  # 0: pydoc, 1: generated
            cal = torch.cat([cal, gen])
        run.say(f"searching down to depth {min(depths)} on {cal.numel()} tokens ({cal.shape[0]} windows)")
        res = auto_pairs(
            run.dec,
            cal,
            target_depth=min(depths),
            beam=1,
            candidates=3,
            progress=run.say,
            groups=groups,
            objective=a.search_mix or "mean",
        )
        res_json = res.to_json()
    run.out["search"] = res_json
    front = {p["depth"]: tuple(tuple(q) for q in p["pairs"]) for p in res_json["frontier"]}
    run.out["pairs"] = {str(d): format_pairs(front[d]) for d in depths}
    run.save()
    return {d: front[d] for d in depths}  # type: ignore[misc]


def heal_timed(
    run: Run, pairs: tuple[tuple[int, int], ...], cal: torch.Tensor, what: str, damping: float | None
) -> Decoder:
    t = time.perf_counter()
    run.say(f"{what}: healing {format_pairs(pairs)} on {cal.numel()} tokens")
    healed, rep = heal_pairs(
        run.dec, pairs, cal, damping=damping, refit_inputs=refit_inputs_flag(run.a.heal_inputs), progress=run.say
    )
    run.out.setdefault("heal_seconds", {})[what] = round(time.perf_counter() - t, 1)
    run.out.setdefault("heal_damping", {})[what] = rep.to_json()["chosen_damping"] or rep.damping
    if rep.input_damping:
        run.out.setdefault("heal_input_damping", {})[what] = rep.input_damping
    return healed


def indomain_calibration(run: Run, dom: str) -> torch.Tensor:
    """The end of the held-out text itself: ``--heal-tokens``, or what it holds after its first ``--eval-tokens``."""
    toks, ev = run.tokens[dom], run.evs[dom]
    n = min(run.a.heal_tokens, (len(toks) - ev.numel()) // 512 * 512)
    return calibration_windows(toks, n, 512, ev)


def table_run(a: argparse.Namespace) -> dict[str, Any]:
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Run(a)
    depths = sorted({int(x) for x in a.depths.split(",")}, reverse=True)
    columns = [c for c in a.columns.split(",") if c]
    pairs = search_pairs(run, depths)
    gen: torch.Tensor | None = None
    if "default" in columns:
        spec = GenSpec(sequences=-(-a.heal_tokens // DEFAULT_LENGTH))  # enough rows for --heal-tokens (default 64)
        gen, info = generated_windows(run.dec, bos_id(run.tokenizer, run.enc), run.enc, spec, run.say)
        run.out["generation"] = info.to_json()
    for depth in depths:
        p = pairs[depth]
        models: dict[str, TorchBackend] = {}
        if "none" in columns:
            models["none"] = TorchBackend(run.dec, p)
        if gen is not None:
            cal = gen[: -(-a.heal_tokens // gen.shape[1])]
            models["default"] = TorchBackend(heal_timed(run, p, cal, f"{depth} default", a.damping))
        if models:
            run.score(depth, models, list(HELD_OUT))
        if "indomain" in columns:
            for dom in [d for d in a.indomain.split(",") if d]:
                cal = indomain_calibration(run, dom)
                run.out.setdefault("indomain_heal_tokens", {})[dom] = int(cal.numel())
                run.score(
                    depth,
                    {"indomain": TorchBackend(heal_timed(run, p, cal, f"{depth} {dom}", a.indomain_damping))},
                    [dom],
                )
    run.save()
    return run.out


def merge(paths: Sequence[Path]) -> dict[str, Any]:
    """The cells of several runs (same search) in one result; a cell measured twice keeps the later file's."""
    runs = [json.loads(p.read_text()) for p in paths]
    out: dict[str, Any] = {**runs[0], "cells": {}, "pairs": {}, "merged_from": [str(p) for p in paths]}
    for r in runs:
        for depth, pairs in r["pairs"].items():
            if out["pairs"].setdefault(depth, pairs) != pairs:
                raise SystemExit(f"the runs used different pairs at depth {depth}: {out['pairs'][depth]} vs {pairs}")
        for depth, cols in r["cells"].items():
            for col, doms in cols.items():
                out["cells"].setdefault(depth, {}).setdefault(col, {}).update(doms)
        for key in ("heal_seconds", "heal_damping", "indomain_heal_tokens"):
            out.setdefault(f"{key}_all", {}).update(r.get(key, {}))
    return out


def markdown(out: dict[str, Any]) -> str:
    doms = list(out["held_out"])
    head = " | ".join(f"{c} {d}" for c in COLUMNS for d in doms)
    lines = [f"| depth | pairs | {head} |", "|---:|---|" + "---:|" * (len(COLUMNS) * len(doms))]
    for depth in sorted(out["cells"], key=int, reverse=True):
        cols = out["cells"][depth]
        vals = [cols.get(c, {}).get(d) for c in COLUMNS for d in doms]
        cells = " | ".join("—" if v is None else f"x{v['ratio']:.3f}" for v in vals)
        lines.append(f"| {depth} | {out['pairs'][depth]} | {cells} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    out = merge(a.merge) if a.merge else table_run(a)
    if a.merge and a.json:
        a.json.write_text(json.dumps(out, indent=1, default=str))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
