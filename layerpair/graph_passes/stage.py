"""Pipeline stage ``merged_onnx_from_onnx``: merge the pairs of an exported ``model.onnx`` in place."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from layerpair.arch import ArchSpec
from layerpair.errors import disk_full_as_output_error
from layerpair.graph_passes.merge import count_ops, merge_pairs, save_model
from layerpair.iospec import IOSpec


def merged_onnx_from_onnx(
    path: Path, arch: ArchSpec, pairs: Sequence[tuple[int, int]], dtype: str = "float32"
) -> tuple[IOSpec, dict[str, Any]]:
    """Replace ``path`` (and its ``.data`` file, if any) by the merged graph, keeping the data layout.

    Returns the merged I/O spec and the report entries: ``merged``, ``passes``, ``pairs_merged`` (per pair:
    wide, merge_attention fired or why not, problems), ``nodes_before/after``,
    ``matmuls_before/after``, ``parameters_check``, ``merge_seconds`` and ``onnx`` (updated file facts).
    The merged model is written next to the original first, so a failure leaves the original intact.
    """
    data = path.with_name(path.name + ".data")
    external = data.exists()
    model, rep = merge_pairs(path, arch, pairs)
    staging = path.parent / ".merged"
    staging.mkdir(exist_ok=True)
    with disk_full_as_output_error(f"the merged model in {staging}"):
        save_model(model, staging / path.name, external_data=external)
    nodes, matmuls = len(model.graph), count_ops(model.graph, "MatMul")
    del model  # releases the lazily read sources before the files move
    for f in (path, data):
        f.unlink(missing_ok=True)
    for f in staging.iterdir():
        shutil.move(str(f), str(path.parent / f.name))
    staging.rmdir()
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    info = merge_report(rep)
    info["onnx"] = {"nodes": nodes, "matmuls": matmuls, "bytes": size}
    return IOSpec.for_model(arch, pairs, merged=True, dtype=dtype), info


def merge_report(rep: dict[str, Any]) -> dict[str, Any]:
    """The report entries of a ``merge_pairs`` run (see ``merged_onnx_from_onnx``), without the file facts."""
    return {
        "merged": True,
        "passes": rep["passes"],
        "pairs_merged": rep["pairs"],
        "nodes_before": rep["nodes_before"],
        "nodes_after": rep["nodes_after"],
        "matmuls_before": rep["matmuls_before"],
        "matmuls_after": rep["matmuls_after"],
        "parameters_check": rep["parameters"],
        "merge_seconds": rep["seconds"],
    }


__all__ = ["merge_report", "merged_onnx_from_onnx"]
