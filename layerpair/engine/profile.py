"""Optimization profiles from the I/O spec and the user's limits.

A TensorRT profile is a box: each input gets (min, opt, max) shapes, and every corner of the box must be a
shape the network can actually run (TensorRT checks the kMAX corner: ``attention_mask`` [B, T] must broadcast
against the scores [B, ..., S, T] with T = P + S). One box cannot hold both "decode at the full context"
(S = 1, P = C - 1) and "prefill of max_seq tokens" (S = max_seq) without its max corner being P + S > C, so
the engine carries two profiles with the same batch range, each with its own opt point:

* ``decode``  — S = 1,          P in [0, C - 1],        opt B = 1, S = 1, P = C // 2
* ``prefill`` — S in [1, max_seq], P in [0, C - max_seq], opt B = 1, S = max_seq, P = 0

A runtime selects ``decode`` for one-token steps and ``prefill`` otherwise (see ``profile_for``).
"""

from __future__ import annotations

from dataclasses import dataclass

from layerpair.errors import InputError
from layerpair.iospec import BATCH, PAST, SEQ, IOSpec

PROFILE_NAMES = ("decode", "prefill")
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_SEQ = 512
DEFAULT_MAX_CONTEXT = 2048

Dims = dict[str, int]  # symbolic dim -> size, over BATCH, SEQ, PAST (TOTAL is derived: P + S)


@dataclass(frozen=True)
class EngineLimits:
    """``--max-batch``, ``--max-seq`` (longest prompt chunk), ``--max-context`` (past + new tokens)."""

    max_batch: int = DEFAULT_MAX_BATCH
    max_seq: int = DEFAULT_MAX_SEQ
    max_context: int = DEFAULT_MAX_CONTEXT

    def check(self) -> None:
        defaults = {
            "--max-batch": DEFAULT_MAX_BATCH,
            "--max-seq": DEFAULT_MAX_SEQ,
            "--max-context": DEFAULT_MAX_CONTEXT,
        }
        values = {"--max-batch": self.max_batch, "--max-seq": self.max_seq, "--max-context": self.max_context}
        for flag, v in values.items():
            if v < 1:
                raise InputError(f"{flag} must be >= 1, got {v}", f"pass e.g. {flag} {defaults[flag]}")
        if self.max_seq > self.max_context:
            raise InputError(
                f"--max-seq {self.max_seq} is larger than --max-context {self.max_context}",
                "a prompt chunk must fit in the context: lower --max-seq or raise --max-context",
            )

    def to_json(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_seq": self.max_seq, "max_context": self.max_context}


@dataclass(frozen=True)
class ProfileSpec:
    name: str
    min: Dims
    opt: Dims
    max: Dims

    def shapes(self, spec: IOSpec) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name -> (min, opt, max) concrete shapes."""
        lo, mid, hi = spec.shapes(self.min), spec.shapes(self.opt), spec.shapes(self.max)
        return {name: (lo[name], mid[name], hi[name]) for name in spec.input_names}

    def contains(self, dims: Dims) -> bool:
        return all(self.min[k] <= dims[k] <= self.max[k] for k in (BATCH, SEQ, PAST)) and (
            dims[PAST] + dims[SEQ] <= self.max[PAST] + self.max[SEQ]
        )

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "min": dict(self.min), "opt": dict(self.opt), "max": dict(self.max)}


def profiles_from_limits(limits: EngineLimits, names: tuple[str, ...] = PROFILE_NAMES) -> list[ProfileSpec]:
    limits.check()
    B, S, C = limits.max_batch, limits.max_seq, limits.max_context
    out = []
    for name in names:
        if name == "decode":
            out.append(
                ProfileSpec(
                    "decode",
                    min={BATCH: 1, SEQ: 1, PAST: 0},
                    opt={BATCH: 1, SEQ: 1, PAST: C // 2},
                    max={BATCH: B, SEQ: 1, PAST: C - 1},
                )
            )
        elif name == "prefill":
            out.append(
                ProfileSpec(
                    "prefill",
                    min={BATCH: 1, SEQ: 1, PAST: 0},
                    opt={BATCH: 1, SEQ: S, PAST: 0},
                    max={BATCH: B, SEQ: S, PAST: C - S},
                )
            )
        else:
            raise InputError(f"profile '{name}' is not known", f"choose from {', '.join(PROFILE_NAMES)}")
    return out


def profile_for(profiles: list[ProfileSpec], batch: int, seq: int, past: int) -> int:
    """Index of the profile a step of this shape runs under: the decode profile for one-token steps."""
    dims = {BATCH: batch, SEQ: seq, PAST: past}
    for i, p in enumerate(profiles):
        if p.contains(dims):
            return i
    raise InputError(
        f"a step with batch {batch}, {seq} new tokens and {past} cached tokens is outside the engine's profiles",
        "rebuild with larger --max-batch / --max-seq / --max-context",
    )
