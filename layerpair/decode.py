"""The decode core: the one ONNX Runtime session factory and the one decode loop, for every runtime.

    session(graph, threads, prepack, providers) -> onnxruntime.InferenceSession
        a model file, serialized bytes, or an in-memory ``ir.Model`` whose weights ONNX Runtime reads by address
    prefill(step, ids, state)           -> logits [B,S,V], Cursor        one forward over the prompt
    decode_one_token(step, tok, cursor) -> logits [B,1,V], Cursor        one forward over one token per row
    decode_n_tokens(step, tok, cursor, n, pick)                          n of those, each fed the token before
    decode(step, ids, state, n, pick)                                    prefill, then decode_n_tokens
    greedy / sampler(Sampling)          token pickers: last logits [B,V] -> tokens [B]
    time_decode                         the decode loop with a clock between tokens (deploy bench)
    DecoderIO, OrtGenerator             the I/O roles of an export and batch-1 text generation on one session

A *step* is one forward of a decoder, ``step(ids [B,S], mask [B,T], positions [B,S], state) -> (logits [B,S,V],
new state)``; the state (the KV cache) is opaque to the loop: a dict of numpy arrays keyed by past names
(``OrtGenerator``), a list in the I/O spec's slot order (``validate.OrtRunner``, PyTorch, TensorRT), or a server's
sequence. So generation, validation and every benchmark's timed decode run this one loop and differ only in
their step and their picker.

Deliberately self-contained (standard library, numpy; onnxruntime and onnx_ir imported where a session is made;
no torch, no layerpair imports): the Triton model repository copies this file as ``lp_runtime.py`` next to its
python-backend ``model.py``, where layerpair is not installed. Everything model-specific comes from a
``DecoderIO`` built from the export's I/O spec JSON (``report.json["io"]`` plus explicit ``state_pairs``), so
merged cache slots such as ``past_key_values.20_21.key`` [B,2·KVH,T,D] need no special case here.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

if TYPE_CHECKING:  # not at run time: the Triton copy has no onnx_ir
    import onnx_ir as ir

Graph: TypeAlias = "str | Path | bytes | ir.Model"  # a model file, serialized model bytes, or a graph in memory

# ---- the session factory -------------------------------------------------------------------------------------


def session(
    graph: Graph, threads: int | None = None, prepack: bool = True, providers: Sequence[Any] | None = None
) -> Any:
    """An ONNX Runtime session on ``graph``: a path, serialized model bytes, or an in-memory ``onnx_ir`` model.

    ``threads``: intra-op threads (None: ONNX Runtime's default). ``prepack=False`` reads weights in place (from
    the memory-mapped ``.onnx.data``, or the in-memory model's own tensors) instead of copying them into packed
    GEMM layouts: a session of a 1B model then starts in 0.5 s instead of 25 s, at 1.0x the weight bytes instead
    of 1.2x. ``providers``: default CPU. An in-memory model runs on the tensors its initializers already hold
    (``_bind_in_memory``): nothing is written but its graph.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    prov = list(providers or ["CPUExecutionProvider"])
    if isinstance(graph, str | Path):
        return ort.InferenceSession(str(graph), so, providers=prov)
    if isinstance(graph, bytes):
        return ort.InferenceSession(graph, so, providers=prov)
    # Extended optimisations (fp16 graphs: the cast/fusion rewrites) read some weights from the graph file instead
    # of the caller's buffers: they would see the placeholder's zeros (a loud false failure, never a false pass).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="layerpair-graph-") as d:
        path, keep = _bind_in_memory(graph, so, Path(d))
        sess = ort.InferenceSession(str(path), so, providers=prov)
    sess._layerpair_weights = keep  # the buffers ONNX Runtime reads must live as long as the session
    return sess


def _bind_in_memory(model: ir.Model, so: Any, d: Path) -> tuple[Path, list[Any]]:
    """Write ``model``'s graph (not its weights) to ``d`` and hand its weights to ``so`` by address.

    ``SessionOptions.add_initializer`` makes ONNX Runtime use a caller's buffer for an initializer without copying
    it — here the Decoder's own parameters (``onnx_graph`` stores them as the graph's layout, ``[in, out]``), so a
    graph that is never shipped (the unmerged one, before the merge) is validated at no extra memory and without
    writing the model. ``add_external_initializers`` would copy every weight (2x the model). The graph file still
    declares each weight as external data, which ONNX Runtime checks exists before it applies the override: a
    sparse placeholder file (no disk blocks) satisfies that check and is never read.
    """
    import onnx_ir as ir
    import onnxruntime as ort

    placeholder = "weights-in-memory.placeholder"
    held: dict[str, Any] = {}
    keep: list[Any] = []
    for name, v in model.graph.initializers.items():
        t = v.const_value
        if t is None or t.nbytes <= 256:  # small constants stay in the graph
            continue
        held[name] = t
        value = ort.OrtValue.ortvalue_from_numpy(t.numpy())  # a view: numpy() of a torch-backed tensor
        so.add_initializer(name, value)
        keep.append(value)
        v.const_value = ir.ExternalTensor(placeholder, 0, t.nbytes, t.dtype, shape=ir.Shape(t.shape.numpy()), name=name)
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, t in held.items():  # the caller's model is unchanged
            model.graph.initializers[name].const_value = t
    path = d / "graph.onnx"
    path.write_bytes(proto.SerializeToString())
    with open(d / placeholder, "wb") as f:
        f.truncate(max((t.nbytes for t in held.values()), default=0))
    return path, keep


# ---- the decode loop -----------------------------------------------------------------------------------------

# One forward of a decoder: (ids [B,S], mask [B,T], positions [B,S], state) -> (logits [B,S,V], new state).
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[Any, Any]]
# A token picker: the last position's logits [B,V] -> the chosen tokens [B].
Pick = Callable[[Any], np.ndarray]


@dataclass(frozen=True)
class Cursor:
    """Where a batch stands after a forward: the step's state (its cache), the attention mask over every cached
    position [B,T] (0 marks padding), and the position id of each row's next token [B,1]."""

    state: Any
    mask_BT: np.ndarray
    next_pos_B1: np.ndarray


def prefill(
    step: StepFn, ids_BS: np.ndarray, state: Any, mask_BS: np.ndarray | None = None, pos_BS: np.ndarray | None = None
) -> tuple[Any, Cursor]:
    """One forward over the prompt on the cache ``state``: logits [B,S,V] and the cursor after it.

    Without ``mask_BS``/``pos_BS``: every token is real and positions run 0..S-1. Left-padded prompts (or a cache
    that already holds masked positions) pass their own: the mask covers the cache and the prompt, positions count
    real tokens only.
    """
    B, S = ids_BS.shape
    mask_BS = np.ones((B, S), np.int64) if mask_BS is None else mask_BS
    pos_BS = np.tile(np.arange(S, dtype=np.int64), (B, 1)) if pos_BS is None else pos_BS
    logits_BSV, state = step(ids_BS, mask_BS, pos_BS, state)
    return logits_BSV, Cursor(state, mask_BS, pos_BS[:, -1:] + 1)


def decode_one_token(step: StepFn, tok_B: Any, cur: Cursor) -> tuple[Any, Cursor]:
    """One forward over one token per row at the cursor: logits [B,1,V] and the cursor one position on."""
    B = cur.mask_BT.shape[0]
    ids_B1 = np.asarray(tok_B, np.int64).reshape(B, 1)
    mask_BT = np.concatenate([cur.mask_BT, np.ones((B, 1), np.int64)], axis=1)
    logits_B1V, state = step(ids_B1, mask_BT, cur.next_pos_B1, cur.state)
    return logits_B1V, Cursor(state, mask_BT, cur.next_pos_B1 + 1)


def decode_n_tokens(
    step: StepFn,
    tok_B: Any,
    cur: Cursor,
    n: int,
    pick: Pick,
    feed: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """``n`` forwards from ``cur``, the first on ``tok_B``, each next one on the token picked before it.

    Yields ``(pick(last logits), last logits [B,V])`` after each forward. Lazy: the caller stops (a stop token, a
    length, a clock) by not asking for more, and no forward runs past what was asked. ``feed`` (teacher forcing)
    maps the picked tokens to the ones fed instead.
    """
    for i in range(n):
        logits_B1V, cur = decode_one_token(step, tok_B, cur)
        last_BV = logits_B1V[:, -1]
        chosen_B = pick(last_BV)
        yield chosen_B, last_BV
        if i + 1 < n:
            tok_B = chosen_B if feed is None else feed(chosen_B)


def decode(
    step: StepFn,
    ids_BS: np.ndarray,
    state: Any,
    n: int,
    pick: Pick,
    mask_BS: np.ndarray | None = None,
    pos_BS: np.ndarray | None = None,
    feed: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """The decode loop: ``prefill`` the prompt, then ``decode_n_tokens``; ``n`` forwards and ``n`` tokens at most,
    yielded as ``decode_n_tokens`` yields them (the first comes from the prefill's last position)."""
    if n < 1:
        return
    logits_BSV, cur = prefill(step, ids_BS, state, mask_BS, pos_BS)
    chosen_B = pick(logits_BSV[:, -1])
    yield chosen_B, logits_BSV[:, -1]
    if n > 1:
        tok_B = chosen_B if feed is None else feed(chosen_B)
        yield from decode_n_tokens(step, tok_B, cur, n - 1, pick, feed)


def greedy(logits_BV: Any) -> np.ndarray:
    """The argmax of each row (numpy, or anything with ``argmax`` that numpy can read, e.g. a CPU torch tensor)."""
    return np.asarray(logits_BV.argmax(-1))


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


def sampler(sampling: Sampling | None) -> Pick:
    """A picker drawing each row's token with ``next_token`` from one generator seeded by ``sampling.seed``
    (greedy when ``sampling`` is None)."""
    rng = np.random.default_rng(sampling.seed) if sampling is not None else None

    def pick(logits_BV: np.ndarray) -> np.ndarray:
        return np.asarray([next_token(row, sampling, rng) for row in logits_BV], np.int64)

    return pick


def time_decode(
    step: StepFn, state: Any, ids_BS: np.ndarray, decode_n: int, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, list[float]]:
    """Seconds of the prefill forward and of each of ``decode_n`` greedy decode forwards, through ``decode``.

    Each interval runs from one token to the next, so it holds what a real generation pays per token (input
    arrays, the forward, the argmax), not the forward alone.
    """
    times: list[float] = []
    t0 = clock()
    for _ in decode(step, ids_BS, state, decode_n + 1, greedy):
        t1 = clock()
        times.append(t1 - t0)
        t0 = t1
    return times[0], times[1:]


# ---- an export's I/O roles and text generation on one ONNX Runtime session ---------------------------------

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


class OrtGenerator:
    """Batch-1 generation with one ONNX Runtime session; the cache lives in numpy between steps."""

    def __init__(
        self,
        model_path: str | Path,
        io: DecoderIO,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
    ) -> None:
        self.session = session(model_path, threads, providers=providers)
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
        ids_BS = np.asarray([list(prompt_ids)], np.int64)  # [1,S]
        stop = set(stop_ids)
        for tok_B, _ in decode(self.step, ids_BS, self.io.empty_state(1), max_new_tokens, sampler(sampling)):
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
