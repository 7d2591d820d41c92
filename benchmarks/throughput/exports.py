"""ONNX exports of the benchmark decoders (cached by shapes, pairs and weights) or given export directories,
the pair merge through ``layerpair.graph_passes`` and the check that the graph timed as ``lp_merged`` is fully
merged."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.throughput.measure import WEIGHTS, Pairs
from layerpair.arch import ArchSpec
from layerpair.errors import InputError
from layerpair.iospec import IOSpec


def _arch_key(arch: ArchSpec, pairs: Pairs) -> str:
    key = [asdict(arch), [list(p) for p in pairs], WEIGHTS]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def exported(dec: Any, cache: Path, say: Callable[[str], None]) -> tuple[Path, float | None]:
    """``dec`` exported with the project's exporter, cached by (shapes, pairs); returns (path, export seconds)."""
    from layerpair.exporter.onnx_export import export_onnx

    d = cache / f"{_arch_key(dec.arch, dec.pairs)}"
    path = d / "model.onnx"
    if path.is_file():
        return path, None
    say(f"exporting ONNX (layers {dec.arch.num_layers}, pairs {list(dec.pairs) or 'none'}) to {d}")
    t0 = time.perf_counter()
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    export_onnx(dec, tmp / "model.onnx")
    tmp.rename(d)  # only complete exports enter the cache
    return path, time.perf_counter() - t0


# Names the pair-merge pass module may expose (issue 3); the first callable found is used.
MERGE_HOOK_NAMES = ("merge_pairs",)


def find_merge_hook() -> tuple[Callable[..., Any] | None, str]:
    """(function, name) from ``layerpair.graph_passes``, or (None, why not)."""
    try:
        gp = importlib.import_module("layerpair.graph_passes")
    except ImportError as e:
        return None, f"layerpair.graph_passes cannot be imported ({e})"
    for name in MERGE_HOOK_NAMES:
        fn = getattr(gp, name, None)
        if callable(fn):
            return fn, name
    return None, f"layerpair.graph_passes exposes no pair-merge function ({', '.join(MERGE_HOOK_NAMES)}; issue 3)"


def merged_onnx(
    fn: Callable[..., Any], src: Path, dst: Path, arch: ArchSpec, pairs: Pairs
) -> tuple[IOSpec, dict[str, Any]]:
    """Merge ``src`` into ``dst`` with issue 3's ``merge_pairs(model, arch, pairs) -> (ir.Model, report)`` (the
    graph passes do no file I/O: the model is loaded and the merged one written here).

    ``merge_pairs`` itself checks the result's I/O against ``IOSpec.for_model(arch, pairs, merged=True)``.
    Returns that spec and the pass report (passes fired, node and MatMul counts).
    """
    import onnx_ir as ir

    from layerpair.exporter.onnx_export import save_model
    from layerpair.graph_passes.base import float_param_count

    model, report = fn(ir.load(str(src)), arch, pairs)
    check_fully_merged(model, arch, pairs, report)
    external = float_param_count(model.graph) * 4 >= 2**31  # weights in model.onnx unless they cannot fit
    if not external:  # weights read from the source's .data are embedded, not left as dangling references
        ir.external_data.load_to_model(model)
    save_model(model, dst, external)
    return IOSpec.for_model(arch, pairs, merged=True), report


#: Passes that must fire for every merged pair (cleanup aside): anything less is not the graph to time.
MERGE_PASSES = (
    "share_rmsnorm",
    "fold_norm_scales",
    "merge_attention",
    "merge_sibling_matmuls",
    "merge_reducing_matmuls",
)


def check_fully_merged(model: Any, arch: ArchSpec, pairs: Pairs, report: dict[str, Any]) -> None:
    """GraphPassError unless every pair is one wide layer (``wide_pair_problems``, read from the graph itself),
    the MatMul count is ``MATMULS_SAVED_PER_PAIR`` per pair lower, and every merge pass fired."""
    from layerpair.graph_passes import MATMULS_SAVED_PER_PAIR, GraphPassError
    from layerpair.graph_passes.merge import count_ops
    from layerpair.graph_passes.verify import wide_pair_problems

    problems = [f"pair {a}-{b}: {p}" for a, b in pairs for p in wide_pair_problems(model.graph, arch, (a, b))]
    expected = report["matmuls_before"] - MATMULS_SAVED_PER_PAIR * len(pairs)
    if count_ops(model.graph, "MatMul") != expected:
        problems.append(f"{count_ops(model.graph, 'MatMul')} MatMuls, expected {expected}")
    idle = [name for name in MERGE_PASSES if not report["passes"].get(name)]
    if idle:
        problems.append(f"passes that did not fire: {', '.join(idle)}")
    if problems or not pairs:
        raise GraphPassError(
            "the benchmark's merged ONNX graph is not fully merged: " + ("; ".join(problems) or "no pairs"),
            "its lp_merged rows would time another graph; fix the merge (or the benchmark weights) first",
        )


def merged_agreement(paths: dict[str, tuple[Path, IOSpec, int, str | None]], threads: int) -> dict[str, Any]:
    """ONNX Runtime: merged graph vs unmerged graph (same weights) — the merged speed is of the same function."""
    from layerpair.exporter.validate import OrtRunner, compare_runners

    m, u = paths["lp_merged"], paths["lp_unmerged"]
    res = compare_runners(OrtRunner(m[0], m[1], threads), m[1], OrtRunner(u[0], u[1], threads), u[1])
    return {k: a.to_json() for k, a in res.items()}


def given_exports(
    dirs: Sequence[Path], arch: ArchSpec
) -> tuple[Pairs, dict[str, tuple[Path, IOSpec, int, str | None]]]:
    """Existing ``layerpair-export`` outputs (original, LP unmerged) instead of fresh random-weight exports.

    Their ``report.json`` gives the pairs; the graphs' inputs must match the I/O spec of ``arch`` with those pairs.
    """
    import onnx

    paths: dict[str, tuple[Path, IOSpec, int, str | None]] = {}
    pairs: Pairs = ()
    for name, d, base in (("original", dirs[0], None), ("lp_unmerged", dirs[1], "original")):
        try:
            report = json.loads((d / "report.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(
                f"cannot read {d}/report.json ({e})", "pass directories written by layerpair-export"
            ) from None
        p = tuple((int(a), int(b)) for a, b in report.get("pairs", []))
        if (name == "original") != (not p):
            raise InputError(f"{d} has pairs {list(p)}", "pass the unpaired export first, then the paired one")
        spec = IOSpec.for_model(arch, p, merged=False)
        got = [i.name for i in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.input]
        if got != spec.input_names or report.get("num_layers") != arch.num_layers:
            raise InputError(
                f"{d}/model.onnx does not have the I/O of the {arch.num_layers}-layer main model",
                "pass exports of the same model shape as the benchmark's main model",
            )
        paths[name] = (d / "model.onnx", spec, len(p), base)
        pairs = p or pairs
    return pairs, paths
