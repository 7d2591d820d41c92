"""Cost of the pair-merge graph passes on an existing export: wall time per pass, save time, peak RSS.

    python -m benchmarks.graph_passes EXPORT_DIR [--model smollm2-135m] [--external-data]

EXPORT_DIR holds an *unmerged* ``model.onnx`` (``layerpair-export ... --no-merge``) and its ``report.json``
(pairs are read from it). Runs in this process once; peak RSS is this process's maximum resident set, so
run it in a fresh process. The merged model is written to a temporary directory and removed.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--model", default="smollm2-135m", help="checkpoint whose config gives the architecture")
    ap.add_argument("--external-data", action="store_true", help="write the merged weights to model.onnx.data")
    args = ap.parse_args(argv)

    import onnx_ir as ir

    from layerpair.arch import ArchSpec
    from layerpair.exporter.loading import load_config, resolve_source
    from layerpair.exporter.onnx_export import save_model
    from layerpair.graph_passes import merge_pairs

    report = json.loads((args.export_dir / "report.json").read_text())
    pairs = [tuple(p) for p in report["pairs"]]
    arch = ArchSpec.from_hf_config(load_config(resolve_source(args.model)))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    model, rep = merge_pairs(ir.load(str(args.export_dir / "model.onnx")), arch, pairs)  # type: ignore[arg-type]
    merge_s = time.perf_counter() - t
    rss_merge = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if not args.external_data:  # weights read from the export's .data are embedded
            ir.external_data.load_to_model(model)
        save_model(model, Path(tmp) / "model.onnx", args.external_data)
        save_s = time.perf_counter() - t
    out = {
        "pairs": report["pairs"],
        "merge_s": round(merge_s, 2),
        "save_s": round(save_s, 2),
        "pass_seconds": rep["pass_seconds"],
        "nodes": [rep["nodes_before"], rep["nodes_after"]],
        "matmuls": [rep["matmuls_before"], rep["matmuls_after"]],
        "passes": rep["passes"],
        "rss_mb": {
            "after_imports": round(rss0),
            "peak_after_merge": round(rss_merge),
            "peak_after_save": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        },
        "model_bytes": report["onnx"]["bytes"],
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
