"""``merge_pairs``: rewrite each pair's two branches into one wide layer (``ir.Model -> ir.Model``), and report
what changed; ``run_passes`` is the driver; ``merge_report`` the export report's entries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from layerpair.arch import ArchSpec
from layerpair.graph_passes.base import FIRED, CountingPass, GraphPassError, float_param_count
from layerpair.graph_passes.cleanup import CleanupPass
from layerpair.graph_passes.fold_norm_scales import FoldNormScalesPass
from layerpair.graph_passes.merge_attention import MergeAttentionPass
from layerpair.graph_passes.merge_gated_mlp import MergeGatedMLPPass
from layerpair.graph_passes.merge_reducing_matmuls import MergeReducingMatMulsPass
from layerpair.graph_passes.merge_sibling_matmuls import MergeSiblingMatMulsPass
from layerpair.graph_passes.share_norm import ShareRMSNormPass
from layerpair.graph_passes.verify import wide_pair_problems
from layerpair.iospec import IOSpec

#: MatMuls one pair loses: 2 x (q, k, v, QK, PV, o, gate, up, down) = 18 become
#: QKV, QK, PV, o, gate/up, down = 6.
MATMULS_SAVED_PER_PAIR = 12
#: ``parameters`` report keys of the parameters the passes remove on purpose (``removed_parameters``).
REMOVED_KEYS = ("folded_norm_scales", "summed_biases", "deduplicated")


def pair_passes(arch: ArchSpec, pairs: Sequence[tuple[int, int]], cleanup: bool = True) -> list[CountingPass]:
    """The pair-merge pipeline, in order. Sibling merging is scoped to the activations the pairs share, and runs
    last: the Concats the attention and gated-MLP merges leave become its contiguous weight runs."""
    fold = FoldNormScalesPass(shared_only=True)
    passes: list[CountingPass] = [
        ShareRMSNormPass(),
        fold,
        MergeAttentionPass(arch, pairs),
        MergeReducingMatMulsPass(),
        MergeGatedMLPPass(),
        MergeSiblingMatMulsPass(scope=fold.activations),
    ]
    if cleanup:
        passes.append(CleanupPass())
    return passes


def count_ops(graph: ir.Graph, op_type: str) -> int:
    return sum(n.op_type == op_type for n in graph)


def merge_pairs(model: ir.Model, arch: ArchSpec, pairs: Sequence[tuple[int, int]]) -> tuple[ir.Model, dict[str, Any]]:
    """Merge every pair of ``model`` (modified in place; no file is read or written here).

    Returns the model and a report: ``passes`` {name: times fired}, ``rejections`` {name: ["where: reason", ...]}
    (each candidate a pass matched but left alone, and why), ``pairs`` {"a-b": ``pair_results``}, node/MatMul
    counts, ``parameters`` {before, after, folded_norm_scales, summed_biases, deduplicated, equal} (``equal``:
    before == after + the parameters the passes removed on purpose), ``seconds``, ``pass_seconds``. All or
    nothing: raises ``GraphPassError`` naming the pair and the reasons when a pair is not fully wide or the
    MatMul count is not ``matmuls_expected_after``; also when the I/O is not
    ``IOSpec.for_model(arch, pairs, merged=True)`` or the parameter count changed.
    """
    t0 = time.perf_counter()
    g = model.graph
    nodes_before, matmuls_before = len(g), count_ops(g, "MatMul")
    params_before = float_param_count(g)
    passes = pair_passes(arch, pairs) if pairs else []  # no pairs: the model comes back exactly as it went in
    fired, seconds = run_passes(model, passes)
    fired = {p.name: fired.get(p.name, 0) for p in pair_passes(arch, pairs)}
    rejections = {name: [r for p in passes if p.name == name for r in p.rejections] for name in fired}
    per_pair = pair_results(g, arch, pairs, passes)
    expected = matmuls_before - MATMULS_SAVED_PER_PAIR * len(pairs)
    other = {p.name: p.rejections for p in passes if not p.per_pair}  # per-pair reasons are in the problems
    _check_pairs(per_pair, expected, count_ops(g, "MatMul"), other)
    _check_io(model, IOSpec.for_model(arch, pairs, merged=True))
    report: dict[str, Any] = {
        "passes": fired,
        "rejections": rejections,
        "nodes_before": nodes_before,
        "nodes_after": len(g),
        "matmuls_before": matmuls_before,
        "matmuls_after": count_ops(g, "MatMul"),
        "matmuls_expected_after": expected,
        "pairs": per_pair,
        "parameters": _check_parameters(params_before, float_param_count(g), passes),
        "seconds": round(time.perf_counter() - t0, 3),
        "pass_seconds": seconds,
    }
    return model, report


def run_passes(model: ir.Model, passes: Sequence[CountingPass]) -> tuple[dict[str, int], dict[str, float]]:
    """The driver: each pass in order on ``model``; a pass that ``needs_rewrites`` runs only when an earlier one
    fired. Returns {name: times fired} and {name: seconds} of the passes that ran."""
    fired: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for p in passes:
        if p.needs_rewrites and not any(fired.values()):
            continue
        t = time.perf_counter()
        p(model)
        fired[p.name] = p.fired
        seconds[p.name] = round(time.perf_counter() - t, 3)
    return fired, seconds


def _check_parameters(before: int, after: int, passes: Sequence[CountingPass]) -> dict[str, Any]:
    """Parameters are only moved, except those the passes remove on purpose (``removed_parameters``): the norm
    scales folded into weights, the biases summed into one, and identical small initializers the cleanup keeps
    once (e.g. the all-ones norm scales of a fresh checkpoint)."""
    removed = {key: 0 for key in REMOVED_KEYS}
    for p in passes:
        for key, n in p.removed_parameters.items():
            removed[key] = removed.get(key, 0) + n
    if before != after + sum(removed.values()):
        extra = ", ".join(f"+{n} {key.replace('_', ' ')}" for key, n in removed.items())
        raise GraphPassError(
            f"parameter count changed from {before} to {after} ({extra}) while merging",
            "report this model as a bug, or export with --no-merge",
        )
    return {"before": before, "after": after, **removed, "equal": True}


def pair_results(
    graph: ir.Graph, arch: ArchSpec, pairs: Sequence[tuple[int, int]], passes: Sequence[CountingPass]
) -> dict[str, dict[str, Any]]:
    """Per pair ("a-b"): ``wide`` (one wide layer), one entry per pass that works pair by pair (``per_pair``:
    ``merge_attention``, ``fired`` or why not) and ``problems`` (why the pair is not wide: that pass's reason,
    or the structural checks of ``wide_pair_problems``, which name the pass that did not fire)."""
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        outcomes = {p.name: p.pair_outcomes.get((a, b), "not run") for p in passes if p.per_pair}
        problems = [f"{name}: {why}" for name, why in outcomes.items() if why != FIRED]
        problems = problems or wide_pair_problems(graph, arch, (a, b))
        out[f"{a}-{b}"] = {"wide": not problems, **outcomes, "problems": problems}
    return out


def _check_pairs(
    per_pair: dict[str, dict[str, Any]], matmuls_expected: int, matmuls_after: int, rejections: dict[str, list[str]]
) -> None:
    """All or nothing: every requested pair fully wide, and the MatMul count what that implies. The error names
    the pairs' problems, then the first candidates the other passes rejected (and why)."""
    bad = {k: r["problems"] for k, r in per_pair.items() if r["problems"]}
    if not bad and per_pair and matmuls_after != matmuls_expected:
        bad = {"all": [f"{matmuls_after} MatMuls after merging, expected {matmuls_expected}"]}
    if bad:
        rejected = [f"{name}: {r}" for name, rs in rejections.items() for r in rs]
        raise GraphPassError(
            "pairs not merged into wide layers: "
            + "; ".join(f"pair {k}: " + ", ".join(v) for k, v in bad.items())
            + (f" (rejected by the passes: {'; '.join(rejected[:6])})" if rejected else ""),
            "export with --no-merge (the pairs still run in parallel, as two branches) and report this model",
        )


def _check_io(model: ir.Model, spec: IOSpec) -> None:
    got_in = [v.name for v in model.graph.inputs]
    got_out = [v.name for v in model.graph.outputs]
    if got_in != spec.input_names or got_out != spec.output_names:
        missing = sorted(set(spec.input_names + spec.output_names) - set(got_in + got_out))
        raise GraphPassError(
            "merged graph does not have the merged I/O spec's inputs/outputs"
            + (f" (missing {', '.join(missing[:4])})" if missing else ""),
            "a pair's attention did not match the exporter's structure; export with --no-merge and report it",
        )


def merge_report(rep: dict[str, Any]) -> dict[str, Any]:
    """The export report's merge entries from a ``merge_pairs`` report: ``merged``, ``passes``, ``rejections``
    ({pass: ["where: reason", ...]}), ``pairs_merged`` (per pair: wide, merge_attention fired or why not,
    problems), ``nodes_before/after``, ``matmuls_before/after``, ``parameters_check``, ``merge_seconds``."""
    return {
        "merged": True,
        "passes": rep["passes"],
        "rejections": rep["rejections"],
        "pairs_merged": rep["pairs"],
        "nodes_before": rep["nodes_before"],
        "nodes_after": rep["nodes_after"],
        "matmuls_before": rep["matmuls_before"],
        "matmuls_after": rep["matmuls_after"],
        "parameters_check": rep["parameters"],
        "merge_seconds": rep["seconds"],
    }
