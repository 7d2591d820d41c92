"""``merge_pairs``: rewrite each pair's two branches into one wide layer, and report what changed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from layerpair.arch import ArchSpec
from layerpair.graph_passes.base import CountingPass, GraphPassError, float_param_count
from layerpair.graph_passes.cleanup import CleanupPass
from layerpair.graph_passes.fold_norm_scales import FoldNormScalesPass
from layerpair.graph_passes.merge_attention import FIRED, MergeAttentionPass
from layerpair.graph_passes.merge_reducing_matmuls import MergeReducingMatMulsPass
from layerpair.graph_passes.merge_sibling_matmuls import MergeSiblingMatMulsPass
from layerpair.graph_passes.share_norm import ShareRMSNormPass
from layerpair.graph_passes.verify import wide_pair_problems
from layerpair.iospec import IOSpec

#: MatMuls one pair loses: 2 x (q, k, v, QK, PV, o, gate, up, down) = 18 become
#: QKV, QK, PV, o, gate/up, down = 6.
MATMULS_SAVED_PER_PAIR = 12
TWO_GB = 2**31


def pair_passes(arch: ArchSpec, pairs: Sequence[tuple[int, int]], cleanup: bool = True) -> list[CountingPass]:
    """The pair-merge pipeline, in order. Sibling merging is scoped to the activations the pairs share."""
    fold = FoldNormScalesPass(shared_only=True)
    passes: list[CountingPass] = [
        ShareRMSNormPass(),
        fold,
        MergeAttentionPass(arch, pairs),
        MergeSiblingMatMulsPass(scope=fold.activations),
        MergeReducingMatMulsPass(),
    ]
    if cleanup:
        passes.append(CleanupPass())
    return passes


def count_ops(graph: ir.Graph, op_type: str) -> int:
    return sum(n.op_type == op_type for n in graph)


def merge_pairs(
    model: ir.Model | str | Path, arch: ArchSpec, pairs: Sequence[tuple[int, int]]
) -> tuple[ir.Model, dict[str, Any]]:
    """Merge every pair of ``model`` (an ``ir.Model`` — modified in place — or a path, loaded lazily).

    Returns the model and a report: ``passes`` {name: times fired}, ``pairs`` {"a-b": ``pair_results``},
    node/MatMul counts, ``parameters`` {before, after, folded_norm_scales, summed_biases, equal} (``equal``:
    before == after + folded norm scales + the biases summed by ``merge_reducing_matmuls``), ``seconds`` (load
    included), ``pass_seconds``. All or nothing: raises ``GraphPassError`` naming the pair and the reasons when
    a pair is not fully wide or the MatMul count is not ``matmuls_expected_after``; also when the I/O is not
    ``IOSpec.for_model(arch, pairs, merged=True)`` or the parameter count changed.
    """
    t0 = time.perf_counter()
    if not isinstance(model, ir.Model):
        model = ir.load(str(model))
    g = model.graph
    nodes_before, matmuls_before = len(g), count_ops(g, "MatMul")
    passes = pair_passes(arch, pairs)
    if not pairs:  # nothing to merge: an unpaired model comes back exactly as it went in
        passes = []
    params_before = float_param_count(g)
    fired: dict[str, int] = {p.name: 0 for p in pair_passes(arch, pairs)}
    seconds: dict[str, float] = {}
    for p in passes:
        if isinstance(p, CleanupPass) and not any(fired.values()):
            continue  # nothing merged: leave the model exactly as it came
        t = time.perf_counter()
        p(model)
        fired[p.name] = p.fired
        seconds[p.name] = round(time.perf_counter() - t, 3)
    per_pair = pair_results(g, arch, pairs, passes)
    _check_pairs(per_pair, matmuls_before - MATMULS_SAVED_PER_PAIR * len(pairs), count_ops(g, "MatMul"))
    spec = IOSpec.for_model(arch, pairs, merged=True)
    _check_io(model, spec)
    report: dict[str, Any] = {
        "passes": fired,
        "nodes_before": nodes_before,
        "nodes_after": len(g),
        "matmuls_before": matmuls_before,
        "matmuls_after": count_ops(g, "MatMul"),
        "matmuls_expected_after": matmuls_before - MATMULS_SAVED_PER_PAIR * len(pairs),
        "pairs": per_pair,
        "parameters": _check_parameters(params_before, float_param_count(g), passes),
        "seconds": round(time.perf_counter() - t0, 3),
        "pass_seconds": seconds,
    }
    return model, report


def _check_parameters(before: int, after: int, passes: Sequence[CountingPass]) -> dict[str, Any]:
    """Parameters are only moved, except the norm scales folded into weights, the biases summed into one, and
    identical small initializers the cleanup keeps once (e.g. the all-ones norm scales of a fresh checkpoint)."""
    folded = sum(p.folded_parameters for p in passes if isinstance(p, FoldNormScalesPass))
    summed = sum(p.summed_bias_parameters for p in passes if isinstance(p, MergeReducingMatMulsPass))
    dedup = sum(p.deduplicated_parameters for p in passes if isinstance(p, CleanupPass))
    if before != after + folded + summed + dedup:
        raise GraphPassError(
            f"parameter count changed from {before} to {after} (+{folded} folded, +{summed} biases summed, "
            f"+{dedup} deduplicated) while merging",
            "report this model as a bug, or export with --no-merge",
        )
    return {
        "before": before,
        "after": after,
        "folded_norm_scales": folded,
        "summed_biases": summed,
        "deduplicated": dedup,
        "equal": True,
    }


def pair_results(
    graph: ir.Graph, arch: ArchSpec, pairs: Sequence[tuple[int, int]], passes: Sequence[CountingPass]
) -> dict[str, dict[str, Any]]:
    """Per pair ("a-b"): ``wide`` (one wide layer), ``merge_attention`` (``fired`` or why not) and
    ``problems`` (why the pair is not wide: the attention pass's reason, or the structural checks of
    ``wide_pair_problems``, which name the pass that did not fire)."""
    attention = next((p for p in passes if isinstance(p, MergeAttentionPass)), None)
    out: dict[str, dict[str, Any]] = {}
    for a, b in pairs:
        fired = attention.results.get((a, b), "not run") if attention is not None else "not run"
        problems = [f"merge_attention: {fired}"] if fired != FIRED else wide_pair_problems(graph, arch, (a, b))
        out[f"{a}-{b}"] = {"wide": not problems, "merge_attention": fired, "problems": problems}
    return out


def _check_pairs(per_pair: dict[str, dict[str, Any]], matmuls_expected: int, matmuls_after: int) -> None:
    """All or nothing: every requested pair fully wide, and the MatMul count what that implies."""
    bad = {k: r["problems"] for k, r in per_pair.items() if r["problems"]}
    if not bad and per_pair and matmuls_after != matmuls_expected:
        bad = {"all": [f"{matmuls_after} MatMuls after merging, expected {matmuls_expected}"]}
    if bad:
        raise GraphPassError(
            "pairs not merged into wide layers: " + "; ".join(f"pair {k}: " + ", ".join(v) for k, v in bad.items()),
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


def save_model(model: ir.Model, path: Path, external_data: bool | None = None) -> None:
    """Write ``model``; weights to ``<name>.data`` when asked, or automatically at >= 2 GB."""
    if external_data is None:
        external_data = float_param_count(model.graph) * 4 >= TWO_GB
    path.parent.mkdir(parents=True, exist_ok=True)
    if not external_data:  # weights read from another file's .data are embedded, not left as dangling references
        ir.external_data.load_to_model(model)
    ir.save(model, str(path), external_data=path.name + ".data" if external_data else None)
