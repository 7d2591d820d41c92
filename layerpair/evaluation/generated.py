"""Data-free calibration: text sampled from the original model itself (issue 15, lever 1).

    generated_windows(dec, bos_id, encode, spec, progress) -> (windows [N,L] int64, GenInfo)

``spec.sequences`` rows of ``spec.length`` tokens each, every row starting with the document-start token
(``bos_id``); a share of the rows is steered by one of a few neutral prompts (``NEUTRAL_PROMPTS``: the
prompt's tokens are forced after it), the rest continue from it alone. Tokens are drawn at ``spec.temperature``
from the original model through the project's one decode loop (``layerpair.decode.decode``) on the PyTorch
Decoder and its KV cache, all rows in one batch, with a numpy generator seeded by ``spec.seed``: the same model,
spec and seed give the same tokens (on the same torch build; the cache key holds its version).

The windows are cached as ``.npy`` under ``<cache root>/calib/`` (the root of the fp32 GGUF cache,
``~/.cache/layerpair`` or ``LAYERPAIR_CACHE_DIR``), keyed by a fingerprint of the weights, the spec, the prompt
tokens and the torch version; ``LAYERPAIR_CALIB_CACHE=0`` disables it. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerpair.decode import Sampling, decode, sampler
from layerpair.errors import InputError
from layerpair.exporter.model import Decoder

NEUTRAL_PROMPTS = ("The", "In", "A", "It is", "This")
DEFAULT_SEQUENCES = 64
DEFAULT_LENGTH = 256  # 64 x 256 = 16384 tokens: the default --heal-tokens


@dataclass(frozen=True)
class GenSpec:
    sequences: int = DEFAULT_SEQUENCES
    length: int = DEFAULT_LENGTH  # tokens per row, BOS and prompt included
    temperature: float = 1.0
    seed: int = 0
    prompt_share: float = 0.5  # rows steered by a neutral prompt; the rest start from BOS alone

    def check(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"the calibration seed must be an integer, got {self.seed!r}", "pass e.g. --calib-seed 0")
        if self.sequences < 1 or self.length < 2:
            raise InputError(
                f"a generated calibration of {self.sequences} x {self.length} tokens is empty",
                "pass at least 1 sequence of at least 2 tokens (e.g. 64 x 256)",
            )
        if not self.temperature > 0:
            raise InputError(f"the sampling temperature must be positive, got {self.temperature}", "pass e.g. 1.0")


@dataclass
class GenInfo:
    tokens: int
    sequences: int
    length: int
    seconds: float  # generation time (0 when read from the cache)
    cached: bool
    path: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def cache_root() -> Path:
    return Path(os.environ.get("LAYERPAIR_CACHE_DIR") or Path.home() / ".cache" / "layerpair").expanduser()


def _fingerprint(dec: Decoder, spec: GenSpec, prompts: Sequence[Sequence[int]], bos: int) -> str:
    h = hashlib.sha256(json.dumps([asdict(spec), [list(p) for p in prompts], bos, torch.__version__]).encode())
    h.update(repr(dec.arch).encode())
    for _, p in sorted(dec.named_parameters()):  # every weight, a strided sample of each (fast, content-keyed)
        flat = p.detach().reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 4096)].float().numpy().tobytes())
    return h.hexdigest()[:20]


def _row_prompts(spec: GenSpec, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """The forced tokens after BOS of each row: round-robin over ``prompts`` for the prompted share."""
    n_prompted = round(spec.sequences * spec.prompt_share) if prompts else 0
    rows = [list(prompts[i % len(prompts)])[: spec.length - 1] for i in range(n_prompted)]
    return rows + [[] for _ in range(spec.sequences - n_prompted)]


def sample_rows(
    dec: Decoder, bos: int, forced: Sequence[Sequence[int]], spec: GenSpec, progress: Callable[[str], None]
) -> np.ndarray:
    """[N, L] tokens: BOS, then each row's forced tokens, then draws from ``dec`` (one batch, one KV cache)."""
    B, L = len(forced), spec.length
    pick_sampled = sampler(Sampling(temperature=spec.temperature, seed=spec.seed))
    t = 0  # index of the token being chosen (after BOS)

    def pick(logits_BV: Any) -> np.ndarray:
        nonlocal t
        tok = pick_sampled(np.asarray(logits_BV, np.float32))
        for r, f in enumerate(forced):
            if t < len(f):
                tok[r] = f[t]
        t += 1
        if t % 64 == 0 or t == L - 1:
            progress(f"calibration: sampled {t}/{L - 1} tokens of {B} sequences")
        return tok

    def step(ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[torch.Tensor]) -> tuple[Any, Any]:
        out = dec(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), *past)
        return out[0][:, -1:].numpy(), list(out[1:])

    ids = np.full((B, 1), bos, np.int64)
    with torch.no_grad():
        cols = [tok for tok, _ in decode(step, ids, dec.empty_past(B), L - 1, pick)]
    return np.concatenate([ids, np.stack(cols, 1)], 1)


def generated_windows(
    dec: Decoder,
    bos: int,
    encode: Callable[[str], list[int]],
    spec: GenSpec = GenSpec(),
    progress: Callable[[str], None] | None = None,
    use_cache: bool | None = None,
) -> tuple[torch.Tensor, GenInfo]:
    """Calibration windows sampled from ``dec`` (the original model), read from / written to the cache."""
    spec.check()
    say = progress or (lambda msg: None)
    prompts = [encode(p) for p in NEUTRAL_PROMPTS]
    use = os.environ.get("LAYERPAIR_CALIB_CACHE", "1") != "0" if use_cache is None else use_cache
    path = cache_root() / "calib" / f"sampled-{_fingerprint(dec, spec, prompts, bos)}.npy" if use else None
    if path is not None and path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == (spec.sequences, spec.length):
                say(f"calibration: {arr.size} generated tokens read from {path}")
                return torch.from_numpy(arr.astype(np.int64)), GenInfo(
                    arr.size, spec.sequences, spec.length, 0.0, True, str(path)
                )
        except (OSError, ValueError):
            pass  # unreadable: generate again and overwrite
    say(f"calibration: sampling {spec.sequences} x {spec.length} tokens from the model (T={spec.temperature:g})")
    t0 = time.perf_counter()
    arr = sample_rows(dec, bos, _row_prompts(spec, prompts), spec, say)
    secs = round(time.perf_counter() - t0, 2)
    say(f"calibration: generated {arr.size} tokens in {secs:.1f} s")
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.npy")
            np.save(tmp, arr.astype(np.int32))
            tmp.replace(path)
        except OSError as e:  # the cache is an optimisation: never fail because of it
            say(f"calibration: could not cache in {path} ({e.strerror})")
            path = None
    return torch.from_numpy(arr), GenInfo(
        arr.size, spec.sequences, spec.length, secs, False, str(path) if path else None
    )


def bos_id(tokenizer: Any, encode: Callable[[str], list[int]]) -> int:
    """The token a document starts with: the one ``tokenizer`` prepends (Llama's BOS), else its EOS (documents
    are separated by it in SmolLM2/GPT-style corpora), else its BOS, else the first token of the first neutral
    prompt (a tokenizer without special tokens)."""
    try:
        first = list(tokenizer("", add_special_tokens=True)["input_ids"])
    except Exception:  # a tokenizer without the call convention: fall back on the attributes
        first = []
    if first:
        return int(first[0])
    for name in ("eos_token_id", "bos_token_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    start = encode(NEUTRAL_PROMPTS[0])
    if not start:
        raise InputError("the tokenizer has no BOS/EOS token and encodes no text", "pass --calib-text FILE instead")
    return start[0]
