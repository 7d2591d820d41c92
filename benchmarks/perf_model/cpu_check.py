"""The check on this CPU: the model, fed this machine's measured parameters, against measured ORT decode time."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.common import quantiles
from benchmarks.perf_model.costs import Cost, graph_costs
from benchmarks.perf_model.devices import Device
from benchmarks.perf_model.graph import Node
from benchmarks.perf_model.predict import step_time

TOLERANCE = 0.15  # each prediction within 15 % of the measurement (issue 17)
RATIO_TOLERANCE = 0.03  # LP/original ratio within 0.03


def step_costs(nodes: Sequence[Node], prompt: int, steps: int) -> list[list[Cost]]:
    """Node costs of each timed decode step (past = prompt .. prompt+steps-1), computed once for every round."""
    return [graph_costs(nodes, 1, past) for past in range(prompt, prompt + steps)]


def predict_cpu(per_step: Sequence[Sequence[Cost]], dev: Device) -> dict[str, float]:
    """Mean predicted seconds/token over the timed steps, and the terms it is made of."""
    ts, mem, comp, over = [], 0.0, 0.0, 0.0
    for costs in per_step:
        ts.append(step_time(costs, dev))
        for c in costs:  # which term wins per node, summed: says what the prediction is made of
            m, f = c.traffic / dev.bandwidth, c.flops / dev.peak_flops
            mem += m if m >= f else 0.0
            comp += f if f > m else 0.0
            over += dev.launch_eager_s
    n = len(ts)
    return {
        "predicted_s": sum(ts) / n,
        "memory_term_s": mem / n,
        "compute_term_s": comp / n,
        "overhead_term_s": over / n,
    }


def compare(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per model: median measured vs median predicted over rounds (each timing predicted from the micro
    parameters measured around it), and the median per-timing error; the LP/original time ratio: median over
    rounds, measured vs predicted with the round's common parameters. Pass/fail per the issue's tolerances."""
    names = list(rounds[0]["models"])
    rows = {}
    for name in names:
        meas = [r["models"][name]["seconds_per_token"] for r in rounds]
        pred = [r["models"][name]["predicted"]["predicted_s"] for r in rounds]
        q25, med, q75 = quantiles(meas)
        err = statistics.median(p / m - 1.0 for p, m in zip(pred, meas, strict=True))
        rows[name] = {
            "predicted_ms": 1e3 * statistics.median(pred),
            "measured_ms": 1e3 * med,
            "measured_iqr_ms": [1e3 * q25, 1e3 * q75],
            "rel_error": err,
            "within_tolerance": abs(err) <= TOLERANCE,
        }
    out: dict[str, Any] = {"models": rows, "tolerance": TOLERANCE, "ratio_tolerance": RATIO_TOLERANCE}
    if "original" in rows and "lp" in rows:
        m = [{k: v["seconds_per_token"] for k, v in r["models"].items()} for r in rounds]
        p = [r["predicted_common"] for r in rounds]
        rm = statistics.median(x["lp"] / x["original"] for x in m)
        rp = statistics.median(x["lp"] / x["original"] for x in p)
        out["lp_over_original"] = {
            "measured": rm,
            "predicted": rp,
            "abs_error": abs(rp - rm),
            "within_tolerance": abs(rp - rm) <= RATIO_TOLERANCE,
        }
    ok = out.get("lp_over_original", {}).get("within_tolerance", False)
    out["all_within_tolerance"] = all(r["within_tolerance"] for r in rows.values()) and ok
    diag = [r["models"][n].get("diagnostic_predicted_s") for r in rounds for n in names]
    if all(d is not None for d in diag):
        out["diagnostic_rel_error"] = {
            n: statistics.median(
                r["models"][n]["diagnostic_predicted_s"] / r["models"][n]["seconds_per_token"] - 1.0 for r in rounds
            )
            for n in names
        }
    return out
