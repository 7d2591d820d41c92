"""Export cost at scale: ``layerpair-export`` against onnxruntime-genai's builder on random-weight checkpoints of
real shapes (SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B), one after another in one run, under a memory watchdog.

    python -m benchmarks.scale [--shapes smollm2,llama-1b,llama-8b] [--tools layerpair,layerpair-fp16,genai]
        [--cache ~/.cache/layerpair/scale] [--out benchmarks/results/scale] [--limit-gb 22]

Shapes, not weights, set the cost, so the checkpoints are random (N(0, 0.02), norms 1 + N(0, 0.1) so that every
graph pass has work), written once as bf16 safetensors shards, one tensor at a time (an 8B checkpoint never sits
in memory), and reused from ``--cache``. Each tool runs in a fresh process under GNU ``time``
(wall, peak RSS); a watchdog thread kills the process tree above ``--limit-gb`` so an over-budget tool is
recorded as "killed: memory" instead of taking the machine down. The genai builder runs from its own venv
(docs/benchmarks.md); a missing venv is recorded as "not available", never skipped silently.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import machine, now_utc, write_json

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("layerpair", "layerpair-fp16", "genai")  # layerpair-fp16: the same job with --dtype fp16
DEFAULT_TOOLS = ("layerpair", "genai")
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
# name -> (LlamaConfig kwargs, pairs): the paper's ~20% depth cut sits in the middle-to-late layers.
SHAPES: dict[str, tuple[dict[str, Any], str]] = {
    "smollm2": (
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        ),
        "20:24",
    ),
    "llama-1b": (
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_parameters=LLAMA3_ROPE,
            max_position_embeddings=131072,
        ),
        "6:10",
    ),
    "llama-8b": (
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_parameters=LLAMA3_ROPE,
            max_position_embeddings=131072,
        ),
        "14:26",
    ),
}


def _tensors(cfg: Any) -> list[tuple[str, tuple[int, ...], bool]]:
    """(Hugging Face name, shape, is_norm) of every tensor of a Llama checkpoint."""
    h, i, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    d = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    out: list[tuple[str, tuple[int, ...], bool]] = [("model.embed_tokens.weight", (V, h), False)]
    for n in range(cfg.num_hidden_layers):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,), True), (p + "post_attention_layernorm.weight", (h,), True)]
        out += [
            (p + f"self_attn.{x}_proj.weight", s, False) for x, s in (("q", (q, h)), ("k", (kv, h)), ("v", (kv, h)))
        ]
        out += [(p + "self_attn.o_proj.weight", (h, q), False)]
        out += [(p + f"mlp.{x}_proj.weight", s, False) for x, s in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))]
    out.append(("model.norm.weight", (h,), True))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", (V, h), False))
    return out


def make_checkpoint(shape: str, dest: Path, say: Any) -> dict[str, Any]:
    """Write (once) a random bf16 checkpoint of ``shape``: config.json, one shard per ~2 GB, an index."""
    import torch
    import transformers
    from safetensors.torch import save_file

    cfg = transformers.LlamaConfig(**SHAPES[shape][0])
    if not (dest / "model.safetensors.index.json").is_file():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        gen = torch.Generator().manual_seed(0)
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, k = 0, 0
        for name, shp, is_norm in _tensors(cfg):
            t = torch.randn(shp, generator=gen) * (0.1 if is_norm else 0.02) + (1.0 if is_norm else 0.0)
            shard[name] = t.to(torch.bfloat16)
            shard_bytes += shard[name].numel() * 2
            if shard_bytes >= 2**31:
                k = _flush(shard, tmp, k, weight_map, save_file)
                shard, shard_bytes = {}, 0
        if shard:
            _flush(shard, tmp, k, weight_map, save_file)
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        cfg.save_pretrained(tmp)
        _patch_rope_theta(tmp / "config.json")
        tmp.rename(dest)
        say(f"wrote {shape} checkpoint to {dest}")
    n_params = sum(int(torch.tensor(s).prod()) for _, s, _ in _tensors(cfg))
    return {"path": str(dest), "parameters": n_params, "fp32_bytes": 4 * n_params, "pairs": SHAPES[shape][1]}


def _flush(shard: dict[str, Any], d: Path, k: int, weight_map: dict[str, str], save_file: Any) -> int:
    name = f"model-{k:05d}.safetensors"
    save_file(shard, str(d / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))
    return k + 1


def _patch_rope_theta(path: Path) -> None:
    """The genai builder reads a top-level ``rope_theta`` (transformers 5 writes only ``rope_parameters``) and
    ``architectures`` (a config saved on its own has none)."""
    cfg = json.loads(path.read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"]
    cfg["rope_scaling"] = {k: v for k, v in cfg["rope_parameters"].items() if k != "rope_theta"}
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def commands(ckpt: Path, pairs: str, work: Path, genai_venv: Path) -> dict[str, list[str]]:
    ours = Path(sys.executable).parent / "layerpair-export"
    genai = [str(genai_venv / "bin" / "python"), "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt)]
    fp16 = ["--dtype", "fp16", "-o", str(work / "layerpair-fp16")]
    return {
        "layerpair": [str(ours), str(ckpt), "--pairs", pairs, "-o", str(work / "layerpair"), "--force"],
        "layerpair-fp16": [str(ours), str(ckpt), "--pairs", pairs, *fp16],
        "genai": [*genai, "-o", str(work / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")],
    }


class Watchdog(threading.Thread):
    """Kills the process group of ``proc`` when its resident memory (children included) passes ``limit_mb``."""

    def __init__(self, proc: subprocess.Popen[bytes], limit_mb: float) -> None:
        super().__init__(daemon=True)
        self.proc, self.limit_mb, self.killed, self.peak_mb = proc, limit_mb, False, 0.0

    def run(self) -> None:
        import psutil

        while self.proc.poll() is None:
            try:
                root = psutil.Process(self.proc.pid)
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
            except psutil.Error:
                rss = 0.0
            self.peak_mb = max(self.peak_mb, rss)
            if rss > self.limit_mb:
                self.killed = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                return
            time.sleep(0.2)


def measure(tool: str, cmd: list[str], log: Path, limit_mb: float, say: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"tool": tool, "command": " ".join(cmd)}
    if not Path(cmd[0]).exists():
        return {**rec, "status": "not available", "reason": f"{cmd[0]} not found (see docs/benchmarks.md)"}
    tfile = log.with_suffix(".time")
    say(f"{tool}: {rec['command']}")
    with open(log, "w") as f:
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%e %M", "-o", str(tfile), *cmd],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
            start_new_session=True,
        )
        dog = Watchdog(proc, limit_mb)
        dog.start()
        rc = proc.wait()
        dog.join()
    if dog.killed:
        return {**rec, "status": "killed: memory", "reason": f"resident memory passed {limit_mb:.0f} MB"}
    elapsed, maxrss_kb = tfile.read_text().strip().splitlines()[-1].split()
    rec.update(rc=rc, wall_s=round(float(elapsed), 1), peak_rss_mb=round(int(maxrss_kb) / 1024, 1))
    if rc != 0:
        tail = log.read_text()[-1500:].strip()
        return {**rec, "status": "failed", "reason": tail.splitlines()[-1][:300] if tail else "no output"}
    return {**rec, "status": "ok"}


def add_tokenizer(dest: Path, say: Any) -> None:
    """The genai builder refuses a checkpoint without a tokenizer: give each random checkpoint SmolLM2's (from
    the embedded model; the vocabulary size may differ — only the export is measured, no text is generated)."""
    if (dest / "tokenizer.json").is_file():
        return
    from layerpair.exporter.loading import load_checkpoint

    tok = load_checkpoint("smollm2-135m").tokenizer
    tok.save_pretrained(str(dest))
    say(f"added SmolLM2's tokenizer to {dest}")


def run_shape(shape: str, args: argparse.Namespace, say: Any) -> list[dict[str, Any]]:
    ck = make_checkpoint(shape, args.cache / shape, say)
    add_tokenizer(Path(ck["path"]), say)
    _patch_rope_theta(Path(ck["path"]) / "config.json")  # idempotent; older cached checkpoints lack keys
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.work) as tmp:
        cmds = commands(Path(ck["path"]), ck["pairs"], Path(tmp), args.genai_venv)
        for tool in args.tools:  # one after another: never two exports competing for the cores
            rec = measure(tool, cmds[tool], args.out / f"{shape}-{tool}.log", args.limit_gb * 1024, say)
            rec.update(shape=shape, parameters=ck["parameters"], fp32_bytes=ck["fp32_bytes"], pairs=ck["pairs"])
            if "peak_rss_mb" in rec:
                rec["peak_rss_over_fp32_bytes"] = round(rec["peak_rss_mb"] * 2**20 / ck["fp32_bytes"], 3)
            report = Path(tmp) / tool / "report.json"
            if tool.startswith("layerpair") and report.is_file():
                r = json.loads(report.read_text())
                rec["stages"] = {"timings_s": r["timings_s"], "peak_rss_mb_by_stage": r["peak_rss_mb_by_stage"]}
                rec["validation"] = r.get("validation_mode", "whole graph")
            say(f"{shape} {tool}: {rec['status']} {rec.get('wall_s', '')} s {rec.get('peak_rss_mb', '')} MB")
            rows.append(rec)
            shutil.rmtree(Path(tmp) / tool, ignore_errors=True)
    return rows


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Export cost at scale, {res['date']} — {res['machine']['cpu']}, {res['machine']['logical_cores']} cores, "
        f"load average at start {res['machine']['load_average']}",
        "",
        "| shape | parameters | tool | wall s | peak RSS MB | RSS / fp32 bytes | ours / genai wall | validation "
        "| status |",
        "|---|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in res["runs"]:
        genai = next((x for x in res["runs"] if x["shape"] == r["shape"] and x["tool"] == "genai"), {})
        ratio = ""
        if r["tool"].startswith("layerpair") and r.get("wall_s") and genai.get("wall_s"):
            ratio = f"{r['wall_s'] / genai['wall_s']:.2f}"
        lines.append(
            f"| {r['shape']} | {r['parameters'] / 1e9:.2f} B | {r['tool']} | {r.get('wall_s', '')} | "
            f"{r.get('peak_rss_mb', '')} | {r.get('peak_rss_over_fp32_bytes', '')} | {ratio} | "
            f"{_mode(r)} | {r['status']}{': ' + r['reason'] if r.get('reason') else ''} |"
        )
    return "\n".join(lines) + "\n"


def _mode(run: dict[str, Any]) -> str:
    """Which validation ran (layerpair rows): whole graph or window by window."""
    v = run.get("validation")
    return str(v.get("mode", "")) if isinstance(v, dict) else ""


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for tool in TOOLS:
        rows = [r for r in res["runs"] if r["tool"] == tool and r["status"] == "ok"]
        x = [r["parameters"] / 1e9 for r in rows]
        axes[0].plot(x, [r["wall_s"] for r in rows], "o-", label=tool)
        axes[1].plot(x, [r["peak_rss_mb"] / 1024 for r in rows], "o-", label=tool)
    axes[0].set(xlabel="parameters (B)", ylabel="wall s", title="export wall time", xscale="log", yscale="log")
    axes[1].set(xlabel="parameters (B)", ylabel="peak RSS GB", title="export peak memory", xscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"measured {res['date']} ({res['machine']['cpu']}, {res['machine']['logical_cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="smollm2,llama-1b", help=f"comma list from {', '.join(SHAPES)}")
    p.add_argument("--tools", default=",".join(DEFAULT_TOOLS), type=lambda s: [t for t in s.split(",") if t])
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "layerpair" / "scale")
    p.add_argument("--work", type=Path, default=None, help="where exports are written (default: the temp dir)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "scale")
    p.add_argument("--genai-venv", type=Path, default=Path("/tmp/anchor-genai-venv"))
    p.add_argument("--limit-gb", type=float, default=21.0, help="watchdog: kill a tool above this RSS")
    args = p.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES] + [t for t in args.tools if t not in TOOLS]
    if bad:
        print(f"error: unknown shape/tool {bad} — shapes {list(SHAPES)}, tools {list(TOOLS)}", file=sys.stderr)
        return 2

    def say(msg: str) -> None:
        print(f"[scale] {msg}", file=sys.stderr, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"schema": "layerpair-scale/1", "date": now_utc(), "machine": machine(), "runs": []}
    for shape in shapes:
        res["runs"] += run_shape(shape, args, say)
    res["load_average_end"] = list(os.getloadavg())
    write_json(args.out / "scale.json", res)
    (args.out / "scale.md").write_text(markdown(res))
    plot(res, args.out / "scale.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
