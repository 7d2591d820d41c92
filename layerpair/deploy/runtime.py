"""ONNX Runtime decode loop for an exported decoder: prefill, then one token per step with the KV cache fed back.

Deliberately self-contained (standard library, numpy, onnxruntime only; no torch, no layerpair imports): the
Triton model repository copies this file next to its python-backend ``model.py``, where layerpair is not
installed. Everything model-specific comes from a ``DecoderIO`` built from the export's I/O spec JSON
(``report.json["io"]`` plus explicit ``state_pairs``), so merged cache slots such as
``past_key_values.20_21.key`` [B,2·KVH,T,D] need no special case here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# numpy dtype names the I/O spec uses -> numpy dtypes ORT accepts as feeds.
_DTYPES = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float16": np.float16}


class RuntimeSpecError(ValueError):
    """The I/O spec JSON and the ONNX session disagree, or the spec is not a decoder spec."""


@dataclass(frozen=True)
class StateTensor:
    past: str  # input name, dims [batch, heads, past_sequence, head_dim]
    present: str  # output name, dims [batch, heads, total_sequence, head_dim]
    heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True)
class DecoderIO:
    """Roles of a decoder's tensors: token inputs, logits, and the (past -> present) state it carries."""

    input_ids: str
    attention_mask: str
    position_ids: str
    logits: str
    states: tuple[StateTensor, ...]

    @classmethod
    def from_json(cls, io: dict[str, Any], state_pairs: Sequence[Sequence[str]]) -> DecoderIO:
        """``io``: IOSpec.to_json(); ``state_pairs``: IOSpec.state_pairs() (past input, present output).

        The three token inputs and the logits are the first entries of the spec's inputs/outputs (IOSpec
        order); every other input must be the past half of a state pair, so nothing can be silently unfed.
        """
        ins = {t["name"]: t for t in io["inputs"]}
        outs = {t["name"]: t for t in io["outputs"]}
        pairs = [(str(p), str(q)) for p, q in state_pairs]
        past_names = {p for p, _ in pairs}
        token_inputs = [t["name"] for t in io["inputs"] if t["name"] not in past_names]
        if len(token_inputs) != 3:
            raise RuntimeSpecError(
                f"expected 3 non-cache inputs (ids, mask, positions), got {token_inputs}: "
                "re-export with this version of layerpair-export"
            )
        states = []
        for past, present in pairs:
            if past not in ins or present not in outs:
                raise RuntimeSpecError(f"state pair ({past}, {present}) is not an input/output of the spec")
            dims = ins[past]["dims"]
            if len(dims) != 4 or not isinstance(dims[1], int) or not isinstance(dims[3], int):
                raise RuntimeSpecError(f"cache input {past} has dims {dims}, expected [batch, heads, past, head_dim]")
            if outs[present]["dims"][1] != dims[1] or outs[present]["dims"][3] != dims[3]:
                raise RuntimeSpecError(f"{past} dims {dims} do not match {present} {outs[present]['dims']}")
            states.append(StateTensor(past, present, int(dims[1]), int(dims[3]), str(ins[past]["dtype"])))
        ids, mask, pos = token_inputs
        return cls(ids, mask, pos, str(io["outputs"][0]["name"]), tuple(states))

    @property
    def output_names(self) -> list[str]:
        return [self.logits, *(s.present for s in self.states)]

    def empty_state(self, batch: int) -> dict[str, np.ndarray]:
        """Zero-length past: [B, heads, 0, head_dim] per cache input (the prefill step)."""
        out = {}
        for s in self.states:
            if s.dtype not in _DTYPES:
                raise RuntimeSpecError(f"cache dtype {s.dtype} is not supported by the numpy ORT runtime")
            out[s.past] = np.zeros((batch, s.heads, 0, s.head_dim), _DTYPES[s.dtype])
        return out


@dataclass(frozen=True)
class Sampling:
    """None (greedy) or temperature / nucleus sampling with a seeded generator."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


def next_token(logits_V: np.ndarray, sampling: Sampling | None, rng: np.random.Generator | None) -> int:
    """Greedy argmax, or a draw from softmax(logits / T) restricted to the smallest top-p mass."""
    if sampling is None:
        return int(np.argmax(logits_V))
    rng = rng if rng is not None else np.random.default_rng(sampling.seed)
    z = logits_V.astype(np.float64) / max(sampling.temperature, 1e-6)
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p  # always keeps the most likely token
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.shape[0], p=p))


# One forward of a decoder: (ids [B,S], mask [B,T], positions [B,S], state) -> (logits [B,S,V] numpy, new state).
# The state is opaque to the loop (a dict of numpy arrays for ONNX Runtime, a list of torch tensors for PyTorch).
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


def decode_steps(
    step: StepFn, state: Any, ids_BS: np.ndarray, max_steps: int, pick: Callable[[np.ndarray], np.ndarray]
) -> Iterator[np.ndarray]:
    """The decode loop: prefill ``ids_BS`` (positions 0..S-1), then feed back one token per row per forward.

    Yields ``pick(last logits [B,V])`` -> tokens [B] after each forward; the caller stops by not asking for more,
    so generation (stop tokens, sampling) and timing (``time_decode``) share this one loop.
    """
    B, S = ids_BS.shape
    pos_BS = np.tile(np.arange(S, dtype=np.int64), (B, 1))
    mask_BT = np.ones((B, S), np.int64)  # [B,T]: past + this step's tokens
    for _ in range(max_steps):
        logits_BSV, state = step(ids_BS, mask_BT, pos_BS, state)
        consumed = mask_BT.shape[1]  # positions now in the cache
        tok_B = pick(logits_BSV[:, -1])
        yield tok_B
        ids_BS = np.asarray(tok_B, np.int64).reshape(B, 1)
        pos_BS = np.full((B, 1), consumed, np.int64)
        mask_BT = np.ones((B, consumed + 1), np.int64)


def greedy(logits_BV: np.ndarray) -> np.ndarray:
    return np.asarray(logits_BV.argmax(-1))


def time_decode(
    step: StepFn, state: Any, ids_BS: np.ndarray, decode: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, list[float]]:
    """Seconds of the prefill forward and of each of ``decode`` greedy decode forwards, through ``decode_steps``.

    Each interval runs from one token to the next, so it holds what a real generation pays per token (input
    arrays, the forward, the argmax), not the forward alone.
    """
    times: list[float] = []
    t0 = clock()
    for _ in decode_steps(step, state, ids_BS, decode + 1, greedy):
        t1 = clock()
        times.append(t1 - t0)
        t0 = t1
    return times[0], times[1:]


class OrtGenerator:
    """Batch-1 generation with one ONNX Runtime session; the cache lives in numpy between steps."""

    def __init__(
        self,
        model_path: str | Path,
        io: DecoderIO,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(model_path), so, providers=list(providers or ["CPUExecutionProvider"]))
        self.io = io
        have_in = {i.name for i in self.session.get_inputs()}
        have_out = {o.name for o in self.session.get_outputs()}
        want_in = {io.input_ids, io.attention_mask, io.position_ids, *(s.past for s in io.states)}
        if want_in != have_in or not set(io.output_names) <= have_out:
            raise RuntimeSpecError(
                f"{model_path}: graph inputs/outputs differ from the I/O spec "
                f"(missing {sorted((want_in - have_in) | (set(io.output_names) - have_out))[:4]}, "
                f"unexpected {sorted(have_in - want_in)[:4]}): use the report.json written with this model"
            )

    def step(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One forward: logits [B,S,V] and the new state keyed by *past* names (ready to feed back)."""
        feeds = {self.io.input_ids: ids_BS, self.io.attention_mask: mask_BT, self.io.position_ids: pos_BS, **state}
        out = self.session.run(self.io.output_names, feeds)
        return out[0], {s.past: t for s, t in zip(self.io.states, out[1:], strict=True)}

    def stream(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        sampling: Sampling | None = None,
    ) -> Iterator[int]:
        """Yield generated token ids one at a time (a stop token is yielded, then generation ends)."""
        if not prompt_ids:
            raise ValueError("empty prompt: at least one token is needed")
        rng = np.random.default_rng(sampling.seed) if sampling is not None else None
        ids_BS = np.asarray([list(prompt_ids)], np.int64)  # [1,S]
        stop = set(stop_ids)

        def pick(logits_BV: np.ndarray) -> np.ndarray:
            return np.asarray([next_token(logits_BV[0], sampling, rng)], np.int64)

        for tok_B in decode_steps(self.step, self.io.empty_state(1), ids_BS, max_new_tokens, pick):
            tok = int(tok_B[0])
            yield tok
            if tok in stop:
                return

    def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        sampling: Sampling | None = None,
    ) -> list[int]:
        return list(self.stream(prompt_ids, max_new_tokens, stop_ids, sampling))
