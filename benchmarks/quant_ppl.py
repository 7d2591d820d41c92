"""Perplexity of ONNX decoders on one text, one scorer for all (issue 16 item 2): ours (fp32, ``--quant int4``)
against onnxruntime-genai's builder output (fp32, int4), so that the int4/fp32 ratios are comparable.

    python -m benchmarks.quant_ppl NAME=DIR [NAME=DIR ...] --text FILE [--tokens 8192] [--window 512]
        [--tokenizer DIR] [--threads 2] [--out benchmarks/results/quant_ppl/quant_ppl.json]

The text is tokenized once (``--tokenizer``: a directory with a Hugging Face tokenizer; default the first
model's ``tokenizer/`` or the directory itself, where the genai builder copies it) with no special tokens, cut
into ``--tokens // --window`` windows; every model scores every window the same way: one prefill of the window
from an empty cache (``benchmarks.ort_decode.SessionDecoder``: feeds read from the session), float64
log-softmax of the logits, mean negative log-likelihood of tokens 1..W-1. The perplexity is exp of the mean over
all scored tokens. Ratios are taken between models named ``X`` and ``X-int4`` (or any ``--pair A,B``).
A non-finite logit makes that model's perplexity NaN, reported as such.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, now_utc, write_json
from benchmarks.ort_decode import SessionDecoder, models_from_args

DEFAULT_OUT = Path("benchmarks/results/quant_ppl/quant_ppl.json")
SCHEMA = "layerpair-bench/quant-ppl/1"


def window_nll(dec: SessionDecoder, ids: np.ndarray) -> tuple[float, int]:
    """Sum of -log p(token t | tokens < t) over t = 1..W-1 of one window [1, W], and the count."""
    logits, _ = dec.step(ids, ids.shape[1], dec.empty_past())
    z = logits[0, :-1].astype(np.float64)  # [W-1, V] predicts tokens 1..W-1
    logz = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    picked = z[np.arange(z.shape[0]), ids[0, 1:]]
    return float(np.sum(logz - picked)), int(z.shape[0])  # NaN propagates through np.sum


def tokenize(text: str, tok_dir: Path, n: int, window: int) -> np.ndarray:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tok_dir)).encode(text, add_special_tokens=False)
    w = min(n, len(ids)) // window
    if w < 1:
        raise SystemExit(f"the text has {len(ids)} tokens: fewer than one window of {window}")
    return np.asarray(ids[: w * window], np.int64).reshape(w, window)


def run(models: dict[str, Path], windows: np.ndarray, threads: int) -> dict[str, dict[str, Any]]:
    rows = {}
    for name, d in models.items():
        dec = SessionDecoder(d / "model.onnx", threads)
        t0, nll, count = time.perf_counter(), 0.0, 0
        for w in windows:
            s, c = window_nll(dec, w[None])
            nll, count = nll + s, count + c
        ppl = math.exp(nll / count) if math.isfinite(nll) else math.nan
        rows[name] = {"dir": str(d), "ppl": ppl, "tokens": count, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: perplexity {ppl:.4f} on {count} tokens ({rows[name]['seconds']} s)", flush=True)
        del dec
    return rows


def ratios(rows: dict[str, dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    auto = [(n[: -len("-int4")], n) for n in rows if n.endswith("-int4") and n[: -len("-int4")] in rows]
    return {f"{b}/{a}": rows[b]["ppl"] / rows[a]["ppl"] for a, b in [*auto, *pairs]}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("models", nargs="+", help="NAME=DIR: a directory with model.onnx")
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--tokenizer", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pair", action="append", default=[], help="A,B: also report ppl(B)/ppl(A)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    models = models_from_args(a.models)
    first = next(iter(models.values()))
    tok_dir = a.tokenizer or (first / "tokenizer" if (first / "tokenizer").is_dir() else first)
    windows = tokenize(a.text.read_text(), tok_dir, a.tokens, a.window)
    rows = run(models, windows, a.threads)
    doc = {
        "schema": SCHEMA,
        "date": now_utc(),
        "text": str(a.text),
        "settings": {"tokens": int(windows.size), "window": a.window, "threads": a.threads},
        "machine": machine(),
        "models": rows,
        "ratios": ratios(rows, [tuple(x.split(",", 1)) for x in a.pair]),  # type: ignore[misc]
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(a.out, doc)
    for k, v in doc["ratios"].items():
        print(f"{k}: x{v:.4f}")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
