"""``AgreementFromOnnx``: run ONNX Runtime and the PyTorch reference on the same inputs and measure how far
apart they are. Runs on every export; the caller fails hard above tolerance.

Four cases, each through the *returned* cache of its own runtime (ONNX Runtime's presents are fed back into
ONNX Runtime, PyTorch's into PyTorch), so a cache bug accumulates instead of hiding:

* ``prefill`` — one prompt of >= 16 tokens, empty cache.
* ``decode``  — 4 greedy steps after that prefill (both runtimes are fed PyTorch's argmax token, so they stay
  on the same path even if a near-tie flips).
* ``chunked`` — a prompt chunk of 5 tokens fed on top of that cache (a multi-token step with a non-empty
  past), and the same chunk after one masked zero cache position (the first request of a Triton sequence).
* ``padded``  — a batch of 2 prompts of different lengths, left-padded, then 2 decode steps.

Metrics on logits: ``max_abs``; ``max_rel`` = max_abs / max|reference| (normwise — elementwise relative error
is meaningless for logits near zero); ``top1`` = fraction of positions whose argmax agrees. Logits at pad
positions are excluded (they are well-defined but meaningless), and so are cache entries at positions the mask
drops (left padding, a masked first slot): every later step masks them too, so a finite value there cannot change
a real position's output (the fill absorbs its score; its softmax weight is 0). They are computed by attention rows
that see no key at all, where kernels legitimately differ (GroupQueryAttention's causal rows). ``present_max_abs``
covers every present tensor at every position the mask keeps. A NaN or inf in either runtime's logits or compared
caches is an error of NaN or inf, which fails any tolerance; ``max_abs_at`` / ``present_max_abs_at`` name the
output, step and position of the worst error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from layerpair.decode import session
from layerpair.errors import ValidationError
from layerpair.iospec import IOSpec

VALIDATION_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a system that could produce books "
    "far faster than any scribe."
)
SHORT_TEXT = "Rain is expected across the coast tomorrow afternoon."


def worse(new: float, old: float) -> bool:
    """``new`` is a worse error than ``old``: NaN is the worst, then the larger value (inf included)."""
    if math.isnan(old):
        return False
    return math.isnan(new) or new > old


def _value(x: float) -> str:
    return f"{x:.6g}"


@dataclass
class Agreement:
    """Worst-case agreement over the steps of one case. A non-finite value in either runtime's logits or
    caches makes the error non-finite (NaN or inf, never dropped), so ``within_tolerance`` fails; ``*_at``
    name the output, step and position of the worst error (the first non-finite one, if any)."""

    max_abs: float = 0.0
    max_rel: float = 0.0
    top1: float = 1.0
    present_max_abs: float = 0.0
    positions: int = 0
    max_abs_at: str = ""
    present_max_abs_at: str = ""
    #: (step, row) pairs whose *key* cache was not compared: ours rotates at cache index and the row's
    #: position_ids are not its cache indices (left padding), so its keys are rotated otherwise by design
    #: (IOSpec.rotary_positions). Their values and the logits that read them are compared.
    keys_not_compared: int = 0
    _agree: int = field(default=0, repr=False)

    def update(
        self, ours: np.ndarray, ref: np.ndarray, valid: np.ndarray, where: str = "", pos: np.ndarray | None = None
    ) -> None:
        """ours/ref: logits [B,S,V]; valid: bool [B,S]; pos: position ids [B,S] (for the message)."""
        o, r = ours[valid], ref[valid]
        self.positions += int(valid.sum())
        if o.size:
            diff = np.abs(o.astype(np.float64) - r.astype(np.float64))
            idx = int(np.argmax(diff))  # the first NaN if there is one, else the largest error
            err = float(diff.flat[idx])
            ref_max = float(np.max(np.abs(r)))  # NaN-propagating, unlike Python's max()
            rel = err / max(ref_max, 1e-30) if math.isfinite(ref_max) else math.nan  # then err is too
            if worse(err, self.max_abs):
                self.max_abs = err
                row, col = divmod(idx, o.shape[-1])
                b, s = (int(i) for i in np.argwhere(valid)[row])
                p = int(pos[b, s]) if pos is not None else s
                self.max_abs_at = (
                    f"logits, {where}, batch {b} position {p} vocab {col} "
                    f"(ours {_value(float(o[row, col]))}, reference {_value(float(r[row, col]))})"
                )
            if worse(rel, self.max_rel):
                self.max_rel = rel
            self._agree += int((o.argmax(-1) == r.argmax(-1)).sum())
        self.top1 = self._agree / max(self.positions, 1)

    def update_present(
        self,
        ours: Sequence[np.ndarray],
        ref: Sequence[np.ndarray],
        where: str = "",
        names: Sequence[str] = (),
        key_rows: np.ndarray | None = None,
        kept_BT: np.ndarray | None = None,
    ) -> None:
        """Per-layer K/V [B,KVH,T,D] in ``per_layer`` order (names default to ``layer i key|value``). ``kept_BT``
        (bool [B,T], default all): the cache positions the attention mask keeps — a dropped one is never read again
        (every later step masks it too), so it is not compared. ``key_rows`` (bool [B], default all): the rows whose
        keys are compared (values always are)."""
        if key_rows is not None:
            self.keys_not_compared += int((~key_rows).sum())
        for i, (o, r) in enumerate(zip(ours, ref, strict=True)):
            if not o.size:
                continue
            diff = np.abs(o.astype(np.float64) - r.astype(np.float64))
            compared = _compared(o.shape, kept_BT, key_rows if i % 2 == 0 else None)
            if compared is not None:
                diff = np.where(compared, diff, 0.0)
            idx = int(np.argmax(diff))
            err = float(diff.flat[idx])
            if worse(err, self.present_max_abs):
                self.present_max_abs = err
                b, h, t, _ = np.unravel_index(idx, diff.shape)
                name = names[i] if names else f"KV cache of layer {i // 2} ({('key', 'value')[i % 2]})"
                self.present_max_abs_at = (
                    f"{name}, {where}, batch {b} head {h} position {t} "
                    f"(ours {_value(float(o.flat[idx]))}, reference {_value(float(r.flat[idx]))})"
                )

    def to_json(self) -> dict[str, float | int | str]:
        d = asdict(self)
        d.pop("_agree")
        return d


def _compared(shape: tuple[int, ...], kept_BT: np.ndarray | None, rows_B: np.ndarray | None) -> np.ndarray | None:
    """Which entries of a [B,KVH,T,D] cache tensor are compared (broadcastable bool), or None for all."""
    out = None if kept_BT is None else np.asarray(kept_BT, bool)[:, None, -shape[2] :, None]
    if rows_B is not None:
        rows = np.asarray(rows_B, bool)[:, None, None, None]
        out = rows if out is None else out & rows
    return out


class Runner:
    """One decoder behind ``step(ids, mask, pos, past) -> (logits, presents)``, numpy in and out."""

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        raise NotImplementedError


class TorchRunner(Runner):
    """A PyTorch decoder behind the Runner contract, in ``dtype`` (default: the module's own). Numpy in and out is
    float32 for 16-bit modules (numpy has no bfloat16 that torch can wrap): caches are cast on the way in."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype | None = None) -> None:
        self.module = module
        self.dtype = dtype or next(module.parameters()).dtype

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        past_t = [torch.from_numpy(np.asarray(p, np.float32)).to(self.dtype) for p in past]
        with torch.no_grad():
            out = self.module(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(pos), *past_t)
        return out[0].float().numpy(), [t.float().numpy() for t in out[1:]]


Graph = Path | str | ir.Model  # a written model.onnx, or a graph in memory whose weights are the Decoder's own


def ort_session(graph: Graph, threads: int | None = None, prepack: bool = True) -> Any:
    """An ONNX Runtime CPU session from the one factory (``decode.session``), on PyTorch's thread count unless
    ``threads`` is given; ``prepack=False`` reads weights in place (see ``OrtRunner``). An in-memory ``ir.Model``
    runs on the tensors its initializers already hold: nothing is written but its graph."""
    return session(graph, threads or torch.get_num_threads(), prepack)


class OrtRunner(Runner):
    """ONNX Runtime CPU session. ``prepack=False`` (validation): weights are read in place from the memory-mapped
    ``model.onnx.data`` (or the Decoder's tensors, for an in-memory graph) instead of being copied into packed GEMM
    layouts — a Llama-3.2-1B session then starts in 0.5 s instead of 25 s and peaks at 1.0x the weight bytes
    instead of 1.2x; the few validation steps do not need the packed kernels' speed."""

    def __init__(self, graph: Graph, spec: IOSpec, threads: int | None = None, prepack: bool = True) -> None:
        self.session = ort_session(graph, threads, prepack)
        self.spec = spec

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = dict(zip(self.spec.input_names, [ids, mask, pos, *past], strict=True))
        out = self.session.run(self.spec.output_names, feeds)
        return out[0], list(out[1:])


class RecordedRunner(Runner):
    """A reference recorded once and replayed: the PyTorch model runs one time for every graph validated
    against it (unmerged and merged), and can be freed before any ONNX Runtime session holds the weights.

    Replay returns the recorded outputs call by call and checks that the inputs are the recorded ones: the
    validation script is deterministic given the reference, so a mismatch is a bug, never a silent reuse.
    """

    def __init__(self, inner: Runner | None) -> None:
        self.inner = inner
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]] = []
        self.i = 0
        #: record_reference(check_repeat=True): the first forward against a repeat of it (report.json).
        self.repeat: dict[str, Any] | None = None

    def rewind(self) -> None:
        self.i = 0

    def last(self) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.calls[self.i - 1][3], self.calls[self.i - 1][4]

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        if self.i < len(self.calls):
            r_ids, r_mask, r_pos, logits, presents = self.calls[self.i]
            if not (np.array_equal(ids, r_ids) and np.array_equal(mask, r_mask) and np.array_equal(pos, r_pos)):
                raise RuntimeError(f"validation step {self.i} differs from the recorded reference step")
        elif self.inner is None:
            raise RuntimeError(f"validation step {self.i} was never recorded")
        else:
            logits, presents = self.inner.step(ids, mask, pos, past)
            self.calls.append((ids.copy(), mask.copy(), pos.copy(), logits, presents))
        self.i += 1
        return logits, presents

    def cache_max(self) -> float:
        """Largest |K|,|V| the reference produced on the first (prefill) step: the scale of 16-bit tolerances."""
        return max(float(np.max(np.abs(t))) for t in self.calls[0][4] if t.size)


class _Echo(Runner):
    """Returns the reference's own last outputs: drives ``compare_runners`` once just to record the reference."""

    def __init__(self, ref: RecordedRunner) -> None:
        self.ref = ref

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        return self.ref.last()


#: A repeat of the reference's first forward may differ from it by reduction order at most (MKL's GEMM is not
#: reproducible run to run across buffer alignments: ~1e-7 of the largest value); a larger normwise difference
#: means the reference disagrees with itself.
REPEAT_RTOL = 1e-5


def record_reference(
    ref: Runner, spec: IOSpec, tokenizer: Any = None, say: Any = None, check_repeat: bool = False
) -> RecordedRunner:
    """Run ``ref`` through every validation case once and keep its outputs (it is not used after this).

    ``check_repeat`` (the PyTorch reference): its first forward is run once more and the two compared
    (``RecordedRunner.repeat``), because a reference that disagrees with itself makes validation blame the graph
    for the reference's own error — a first-call MKL race did once (``model.resolve_vml_dispatch``). On a
    mismatch the whole script is recorded again, said through ``say``, and the new recording must agree with the
    repeat; if it does not either, ValidationError: the reference is not reproducible.
    """
    rec = _record(ref, spec, tokenizer)
    if not check_repeat:
        return rec
    ids, mask, pos = rec.calls[0][:3]
    again = ref.step(ids, mask, pos, [t[:, :, :0] for t in _zero_slot(spec, 1)])
    err = repeat_error(rec.calls[0][3:], again)
    rec.repeat = {"first_forward_vs_repeat": err, "recorded": 1}
    if err <= REPEAT_RTOL:
        return rec
    if say is not None:
        say(f"the PyTorch reference's first forward differed from a repeat by {err:.1e} (normwise; bound "
            f"{REPEAT_RTOL:.0e}): recording the reference again")  # fmt: skip
    rec = _record(ref, spec, tokenizer)
    err2 = repeat_error(rec.calls[0][3:], again)
    rec.repeat = {"first_forward_vs_repeat": err, "recorded": 2, "second_recording_vs_repeat": err2}
    if not err2 <= REPEAT_RTOL:  # NaN-safe: a NaN error is a disagreement
        raise ValidationError(
            f"the PyTorch reference does not reproduce itself: three runs of its first forward differ by "
            f"{err:.1e} and {err2:.1e} (normwise), so no graph can be validated against it",
            "run the export again, then with OMP_NUM_THREADS=1; if it persists, report it with the output of "
            "python -c 'import torch; print(torch.__config__.show())'",
        )
    return rec


def _record(ref: Runner, spec: IOSpec, tokenizer: Any) -> RecordedRunner:
    rec = RecordedRunner(ref)
    compare_runners(_Echo(rec), spec, rec, spec, tokenizer)
    rec.inner = None
    return rec


def repeat_error(first: tuple[Any, ...], again: tuple[Any, ...]) -> float:
    """Worst normwise difference (max |a-b| / max |b|) between two runs' logits and caches; equal NaNs agree, a NaN
    on one side only is NaN (a disagreement under ``not err <= bound``)."""
    errs = []
    for a, b in zip([first[0], *first[1]], [again[0], *again[1]], strict=True):
        if not a.size:
            continue
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = np.where((a64 == b64) | (np.isnan(a64) & np.isnan(b64)), 0.0, np.abs(a64 - b64))
        scale = float(np.max(np.abs(b64), initial=0.0, where=np.isfinite(b64)))
        errs.append(float(np.max(diff)) / max(scale, 1e-30))
    return float(np.max(errs)) if errs else 0.0


def empty_past(spec: IOSpec, batch: int, dtype: Any = None) -> list[np.ndarray]:
    """Zero-length K/V for every slot, in the spec's cache dtype unless ``dtype`` is given."""
    if dtype is None:
        import ml_dtypes  # numpy has no bfloat16; ml_dtypes (an onnx dependency) provides it

        dtype = ml_dtypes.bfloat16 if spec.dtype == "bfloat16" else np.dtype(spec.dtype)
    d = spec.arch.head_dim
    return [np.zeros((batch, s.num_kv_heads, 0, d), dtype) for s in spec.slots for _ in (0, 1)]


def validation_tokens(tokenizer: Any, text: str, n_min: int, vocab: int, seed: int) -> list[int]:
    if tokenizer is not None:
        ids = list(tokenizer(text)["input_ids"])
        if len(ids) >= n_min:
            return ids
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=max(n_min, 16)).tolist()


class _Pair:
    """``ours`` and ``ref`` stepped side by side, each through its own returned cache, into one Agreement."""

    def __init__(self, ours: Runner, ours_spec: IOSpec, ref: Runner, ref_spec: IOSpec) -> None:
        self.ours, self.ours_spec, self.ref, self.ref_spec = ours, ours_spec, ref, ref_spec
        self.po: list[np.ndarray] = []
        self.pr: list[np.ndarray] = []
        self.lr = np.zeros((0, 0, 0), np.float32)  # the reference's last logits (it picks the next token)

    def reset(self, batch: int, past_len: int = 0) -> None:
        """Caches of ``past_len`` zero positions (0: empty) for both runtimes."""
        self.po, self.pr = (
            [np.repeat(t, past_len, axis=2) if past_len else t[:, :, :0] for t in _zero_slot(spec, batch)]
            for spec in (self.ours_spec, self.ref_spec)
        )

    def step(self, agr: Agreement, where: str, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray) -> None:
        self.lr, self.pr = self.ref.step(ids, mask, pos, self.pr)  # the reference first: see ``_Echo``
        lo, self.po = self.ours.step(ids, mask, pos, self.po)
        valid = mask[:, -ids.shape[1] :].astype(bool)
        agr.update(lo, self.lr, valid, where, pos)
        po, pr = per_layer(self.po, self.ours_spec), per_layer(self.pr, self.ref_spec)
        agr.update_present(po, pr, where, key_rows=self._key_rows(mask, pos), kept_BT=mask.astype(bool))

    def _key_rows(self, mask: np.ndarray, pos: np.ndarray) -> np.ndarray | None:
        """Rows whose cached keys both sides rotate alike: all, unless ours rotates at cache index; then the rows
        whose every position, cached or new, is its cache index (a row with leading masked slots is not)."""
        if self.ours_spec.rotary_positions != "cache_index":
            return None
        T, S = mask.shape[1], pos.shape[1]
        index_BS = np.broadcast_to(np.arange(T - S, T), pos.shape)
        return np.asarray(mask[:, : T - S].all(1) & ((pos == index_BS) | ~mask[:, T - S :].astype(bool)).all(1))

    def greedy(self) -> np.ndarray:
        return self.lr[:, -1:].argmax(-1).astype(np.int64)


def _zero_slot(spec: IOSpec, batch: int) -> list[np.ndarray]:
    """One zero cache position per slot (``reset`` repeats or drops it), in the spec's cache dtype."""
    return [np.zeros((*t.shape[:2], 1, t.shape[3]), t.dtype) for t in empty_past(spec, batch)]


CHUNK = 5  # tokens of the "chunked" case


def compare_runners(
    ours: Runner, ours_spec: IOSpec, ref: Runner, ref_spec: IOSpec, tokenizer: Any = None, decode_steps: int = 4
) -> dict[str, Agreement]:
    """Agreement of ``ours`` against ``ref`` on prefill, decode, a chunk after a cache, and a padded batch.

    The two may have different cache layouts (unmerged vs merged pairs): caches are never exchanged, and
    presents are compared after mapping both to per-layer slices (see ``per_layer``).
    """
    vocab = ours_spec.arch.vocab_size
    res = {k: Agreement() for k in ("prefill", "decode", "chunked", "padded")}
    if isinstance(ref, RecordedRunner):
        ref.rewind()
    run = _Pair(ours, ours_spec, ref, ref_spec)

    # prefill + decode, batch 1, then a prompt chunk on top of that cache
    ids = np.array([validation_tokens(tokenizer, VALIDATION_TEXT, 16, vocab, 0)], dtype=np.int64)
    S = ids.shape[1]
    run.reset(1)
    run.step(res["prefill"], "prefill", ids, np.ones_like(ids), np.arange(S, dtype=np.int64)[None])
    for step in range(decode_steps):
        p = np.array([[S + step]], np.int64)
        run.step(res["decode"], f"decode step {step + 1}", run.greedy(), np.ones((1, S + step + 1), np.int64), p)
    chunk = np.array([validation_tokens(tokenizer, SHORT_TEXT, CHUNK, vocab, 3)[:CHUNK]], np.int64)
    T = S + decode_steps
    pos = np.arange(T, T + CHUNK, dtype=np.int64)[None]
    run.step(res["chunked"], f"chunk of {CHUNK} after {T} cached", chunk, np.ones((1, T + CHUNK), np.int64), pos)
    # the first request of a Triton sequence: one masked (zero) cache position, then the prompt
    run.reset(1, 1)
    mask = np.concatenate([np.zeros((1, 1), np.int64), np.ones((1, CHUNK), np.int64)], axis=1)
    run.step(res["chunked"], "chunk after 1 masked cache slot", chunk, mask, np.arange(CHUNK, dtype=np.int64)[None])

    # padded batch of 2, left padding, then 2 decode steps
    a = validation_tokens(tokenizer, VALIDATION_TEXT, 16, vocab, 1)
    b = validation_tokens(tokenizer, SHORT_TEXT, 8, vocab, 2)
    b = b[: max(len(a) - 5, 1)] if len(b) >= len(a) else b
    S = len(a)
    ids = np.zeros((2, S), np.int64)
    mask = np.zeros((2, S), np.int64)
    ids[0], mask[0] = a, 1
    ids[1, S - len(b) :], mask[1, S - len(b) :] = b, 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None).astype(np.int64)
    run.reset(2)
    run.step(res["padded"], "padded prefill", ids, mask, pos)
    for step in range(2):
        p = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = np.concatenate([pos, p], axis=1)
        run.step(res["padded"], f"padded decode step {step + 1}", run.greedy(), mask, p)
    return res


def per_layer(presents: list[np.ndarray], spec: IOSpec) -> list[np.ndarray]:
    """Split presents into per-layer K, V ([B,KVH,T,D] each), in layer order, whatever the slot layout.

    A merged slot with 2·KVH heads holds layer a's heads first, then layer b's.
    """
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    kvh = spec.arch.num_kv_heads
    for i, s in enumerate(spec.slots):
        k, v = presents[2 * i], presents[2 * i + 1]
        for j, layer in enumerate(s.layers):
            out[layer] = (k[:, j * kvh : (j + 1) * kvh], v[:, j * kvh : (j + 1) * kvh])
    return [t for layer in sorted(out) for t in out[layer]]


def within_tolerance(res: dict[str, Agreement], atol: float) -> list[str]:
    """The failing checks (empty if all pass): logits and every present within ``atol`` max abs.

    Top-1 agreement is reported, not enforced: within ``atol`` a flip can only come from a near-tie.
    """
    bad = []
    for name, a in res.items():
        for what, err, at in (
            ("logits", a.max_abs, a.max_abs_at),
            ("KV cache", a.present_max_abs, a.present_max_abs_at),
        ):
            if not err <= atol:  # NaN fails too (the Agreement never drops one)
                problem = f"non-finite ({err})" if not math.isfinite(err) else f"max_abs {err:.3g} > {atol:g}"
                bad.append(f"{name}: {what} {problem} at {at or 'an unknown position'}")
    return bad
