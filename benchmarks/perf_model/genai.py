"""The onnxruntime-genai builder's SmolLM2 model (fp32, CPU), built through ``benchmarks.anchors``' own code path.

The builder runs from its own venv (see docs/benchmarks.md, "Anchor environments"); the checkpoint is the
embedded SmolLM2 saved as a Hugging Face directory by ``anchors.prepare_checkpoint``. The model is timed with
plain onnxruntime (its GroupQueryAttention etc. are ORT contrib ops), not with the genai runtime.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.anchors import commands, prepare_checkpoint


def genai_model(
    work: Path, ckpt_dir: Path, genai_venv: Path, say: Callable[[str], None]
) -> tuple[Path | None, dict[str, Any]]:
    """(path of model.onnx, facts) — built once under ``work/genai``; (None, reason) when the venv is missing."""
    spec = commands(ckpt_dir, work, Path("/nonexistent-optimum-venv"), genai_venv)["genai"]
    out: Path = spec["out"]
    info: dict[str, Any] = {"command": " ".join(spec["cmd"])}
    if not (out / "model.onnx").is_file():
        if not Path(spec["cmd"][0]).exists():
            info["status"] = f"not available: {spec['cmd'][0]} not found (install: docs/benchmarks.md)"
            return None, info
        info["checkpoint"] = prepare_checkpoint(ckpt_dir, say)
        say(f"genai builder: {info['command']}")
        r = subprocess.run(spec["cmd"], capture_output=True, text=True)
        if r.returncode != 0 or not (out / "model.onnx").is_file():
            info["status"] = f"builder failed (rc {r.returncode}): {r.stderr.strip()[-300:]}"
            return None, info
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg.get("model", {}).get("decoder", {})
    info.update(status="ok", past_present_share_buffer=cfg.get("search", {}).get("past_present_share_buffer"))
    info["inputs"] = dec.get("inputs")
    info["outputs"] = dec.get("outputs")
    return out / "model.onnx", info
