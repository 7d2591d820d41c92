"""Export cost against the anchors: wall time and peak RSS of ``layerpair-export`` vs Optimum's
``optimum-cli export onnx --task text-generation-with-past`` vs onnxruntime-genai's model builder, on the same
checkpoint (SmolLM2-135M saved as a Hugging Face directory), same machine, one run each, one after another.

    python -m benchmarks.anchors [--out DIR] [--tools layerpair,optimum,genai]
        [--optimum-venv /tmp/anchor-venv] [--genai-venv /tmp/anchor-genai-venv] [--checkpoint-dir DIR]

The anchors cannot share our environment (see docs/benchmarks.md for the pins and why):

* optimum-onnx 0.1.0 (the newest) requires transformers < 4.58 — no version supports transformers 5.24;
* onnxruntime-genai 0.18.0's builder imports transformers 5 classes (``Qwen3_5ForConditionalGeneration``), so it
  cannot share Optimum's venv either.

So each anchor runs from its own venv (torch 2.13.0 CPU in both). Every tool runs under GNU ``time`` in a fresh
process: ``wall_s`` is elapsed time, ``peak_rss_mb`` is the largest resident set of that process (children
included only if larger). Each tool does its own validation by default (layerpair: ONNX Runtime vs PyTorch;
Optimum: ONNX Runtime vs transformers; the genai builder: none) — recorded as-is, since that is what a user
waits for. Outputs go to a temporary directory that is removed afterwards; sizes and node counts are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import SCHEMA_ANCHORS, machine, now_utc, write_json

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("layerpair", "optimum", "genai")


def prepare_checkpoint(dest: Path, say: Any) -> dict[str, Any]:
    """Embedded SmolLM2 (GGUF, dequantised to fp32) saved as a HF directory; reused when already there.

    transformers 5 writes rotary settings only as ``rope_parameters``; transformers 4.57 (Optimum's venv) reads
    ``rope_theta`` at the top level and would silently fall back to 10000. The top-level key is added (same
    value) so every tool exports the same model.
    """
    info: dict[str, Any] = {"path": str(dest)}
    if not (dest / "config.json").is_file():
        from layerpair.exporter.loading import load_checkpoint, save_fp32_copy

        say(f"saving SmolLM2-135M as a Hugging Face directory to {dest}")
        ck = load_checkpoint("smollm2-135m", keep_model=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_fp32_copy(ck.model, ck.tokenizer, tmp)
        tmp.rename(dest)
    cfg_path = dest / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and cfg.get("rope_theta") != theta:
        cfg["rope_theta"] = theta
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        info["config_patch"] = f"added top-level rope_theta={theta} for transformers 4.x"
    info["rope_theta"] = cfg.get("rope_theta")
    info["bytes"] = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
    return info


def _pip_version(python: Path, dist: str) -> str | None:
    r = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or None


def commands(ckpt: Path, work: Path, optimum_venv: Path, genai_venv: Path) -> dict[str, dict[str, Any]]:
    ours = Path(sys.executable).parent / "layerpair-export"
    return {
        "layerpair": {
            "cmd": [str(ours), str(ckpt), "--pairs", "20:24", "-o", str(work / "layerpair"), "--force"],
            "out": work / "layerpair",
            "python": Path(sys.executable),
            "dists": ["layerpair-export", "transformers", "torch"],
        },
        "optimum": {
            "cmd": [
                str(optimum_venv / "bin" / "optimum-cli"),
                "export",
                "onnx",
                "--model",
                str(ckpt),
                "--task",
                "text-generation-with-past",
                str(work / "optimum"),
            ],
            "out": work / "optimum",
            "python": optimum_venv / "bin" / "python",
            "dists": ["optimum-onnx", "optimum", "transformers", "torch"],
        },
        "genai": {
            "cmd": [
                str(genai_venv / "bin" / "python"),
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(ckpt),
                "-o",
                str(work / "genai"),
                "-p",
                "fp32",
                "-e",
                "cpu",
                "-c",
                str(work / "genai-cache"),
            ],
            "out": work / "genai",
            "python": genai_venv / "bin" / "python",
            "dists": ["onnxruntime-genai", "transformers", "torch"],
        },
    }


def _onnx_facts(out: Path) -> dict[str, Any]:
    import onnx

    files = sorted(out.rglob("*.onnx"))
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    facts: dict[str, Any] = {"output_bytes": size, "onnx_files": [str(f.relative_to(out)) for f in files]}
    if files:
        m = onnx.load(str(files[0]), load_external_data=False)
        facts["nodes"] = len(m.graph.node)
        facts["matmuls"] = sum(n.op_type == "MatMul" for n in m.graph.node)
        facts["ops"] = sorted({n.op_type for n in m.graph.node})[:40]
    return facts


def measure(tool: str, spec: dict[str, Any], log_dir: Path, say: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"tool": tool, "command": " ".join(spec["cmd"])}
    py: Path = spec["python"]
    if not py.exists() or not Path(spec["cmd"][0]).exists():
        rec.update(status="not available", reason=f"{spec['cmd'][0]} not found (install: see docs/benchmarks.md)")
        return rec
    rec["versions"] = {d: _pip_version(py, d) for d in spec["dists"]}
    tfile = log_dir / f"{tool}.time"
    say(f"{tool}: {rec['command']}")
    t0 = time.perf_counter()
    with open(log_dir / f"{tool}.log", "w") as log:
        r = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", str(tfile), *spec["cmd"]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
    wall = time.perf_counter() - t0
    elapsed, maxrss_kb = tfile.read_text().strip().splitlines()[-1].split()
    rec.update(rc=r.returncode, wall_s=round(float(elapsed), 1), peak_rss_mb=round(int(maxrss_kb) / 1024, 1))
    rec["wall_s_outer"] = round(wall, 1)
    if r.returncode != 0:
        tail = (log_dir / f"{tool}.log").read_text()[-1500:]
        rec.update(status="failed", reason=tail.strip().splitlines()[-1][:300] if tail.strip() else "no output")
        rec["log_tail"] = tail
        return rec
    rec["status"] = "ok"
    rec.update(_onnx_facts(spec["out"]))
    return rec


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Export cost on {res['date']} — {res['machine']['cpu']}, {res['machine']['logical_cores']} cores; "
        f"load average at start {res['machine']['load_average']}",
        "",
        "| tool | version | wall s | peak RSS MB | ONNX nodes | MatMuls | output MB | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        v = next((x for x in (r.get("versions") or {}).values() if x), "")
        if r["status"] != "ok":
            lines.append(
                f"| {r['tool']} | {v} | {r.get('wall_s', '')} | {r.get('peak_rss_mb', '')} | | | | "
                f"{r['status']}: {r.get('reason', '')} |"
            )
            continue
        lines.append(
            f"| {r['tool']} | {v} | {r['wall_s']} | {r['peak_rss_mb']} | {r.get('nodes', '')} | "
            f"{r.get('matmuls', '')} | {r['output_bytes'] / 1e6:.0f} | ok |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.anchors", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anchors")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {', '.join(TOOLS)}")
    p.add_argument("--optimum-venv", type=Path, default=Path("/tmp/anchor-venv"))
    p.add_argument("--genai-venv", type=Path, default=Path("/tmp/anchor-genai-venv"))
    p.add_argument("--checkpoint-dir", type=Path, default=Path(tempfile.gettempdir()) / "smollm2-135m-hf")
    args = p.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        print(f"error: unknown tool(s) {bad or tools} — choose from {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    if not Path("/usr/bin/time").exists():
        print("error: /usr/bin/time (GNU time) is needed for peak RSS — apt-get install time", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        print(f"[anchors] {msg}", file=sys.stderr, flush=True)

    res: dict[str, Any] = {"schema": SCHEMA_ANCHORS, "date": now_utc(), "machine": machine()}
    res["checkpoint"] = prepare_checkpoint(args.checkpoint_dir, say)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="anchors-") as tmp:
        work = Path(tmp)
        specs = commands(args.checkpoint_dir, work, args.optimum_venv, args.genai_venv)
        res["runs"] = []
        for t in tools:  # one after another: never two exports competing for the cores
            rec = measure(t, specs[t], args.out, say)
            say(f"{t}: {rec['status']} {rec.get('wall_s', '')} s, {rec.get('peak_rss_mb', '')} MB")
            res["runs"].append(rec)
            shutil.rmtree(specs[t]["out"], ignore_errors=True)
    res["load_average_end"] = list(os.getloadavg())
    write_json(args.out / "anchors.json", res)
    (args.out / "anchors.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
