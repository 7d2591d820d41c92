"""Evaluation text: the offline default (CPython's own documentation prose), files, tokens and windows.

Default text: every entry of ``pydoc_data.topics.topics`` (the help texts of Python's language reference
that ship inside every CPython installation), in sorted key order, joined with a blank line. It is real
English prose, needs no network, and is identical on every machine with the same CPython minor version.

Held-out split: evaluation reads tokens from the *start* of a text, calibration (the pair search and
healing) reads them from the *end*, and the two ranges are checked to be disjoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from layerpair.errors import InputError

DEFAULT_WINDOW = 512
Encode = Callable[[str], list[int]]


def default_text() -> str:
    """``"\\n\\n".join(topics[k] for k in sorted(topics))`` from ``pydoc_data.topics``."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped CPython builds
        raise InputError(
            "this Python has no pydoc_data.topics (the default evaluation text)", "pass --text FILE"
        ) from None
    return "\n\n".join(topics[k] for k in sorted(topics))


def read_text(path: Path | None) -> str:
    """The text of ``path`` (UTF-8), or the default text when ``path`` is None."""
    if path is None:
        return default_text()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read text file '{path}' ({type(e).__name__})", "pass a readable UTF-8 file") from None
    if not text.strip():
        raise InputError(f"text file '{path}' is empty", "pass a file with at least one window of text")
    return text


def text_from_arg(arg: str | Path | None, field: str = "text") -> str:
    """``--text`` / ``--calib-text``: None (the default text), a file, or ``hf:PATH[:CONFIG]:SPLIT``."""
    from layerpair.evaluation import hfdata

    if isinstance(arg, str) and hfdata.is_hf(arg):
        spec = hfdata.parse_spec(arg)
        return hfdata.text_from_rows(hfdata.load_rows(spec), spec, field)
    return read_text(None if arg is None else Path(arg))


def check_text_arg(arg: str | Path | None, flag: str) -> None:
    """Cheap checks before any model loads: the dataset spec parses, or the file exists."""
    from layerpair.evaluation import hfdata

    if arg is None:
        return
    if isinstance(arg, str) and hfdata.is_hf(arg):
        hfdata.parse_spec(arg)
    elif not Path(arg).is_file():
        raise InputError(f"file '{arg}' not found", f"check the {flag} path (or use hf:PATH:SPLIT for a dataset)")


def encoder(tokenizer: Any) -> Encode:
    """A Hugging Face tokenizer as ``str -> ids``, without special tokens (no BOS: windows start mid-text)."""

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return encode


def windows_from_tokens(
    tokens: Sequence[int], window: int, n_tokens: int | None, from_end: bool = False
) -> torch.Tensor:
    """Non-overlapping windows [N, window] (int64) covering the first (or last) ``n_tokens`` tokens.

    ``n_tokens`` is rounded down to whole windows; a trailing partial window is dropped, never padded.
    """
    if window < 2:
        raise InputError(f"window must be >= 2 tokens, got {window}", "pass e.g. --window 512")
    if n_tokens is not None and n_tokens < window:
        raise InputError(f"--tokens {n_tokens} is shorter than one window ({window})", f"pass --tokens >= {window}")
    if len(tokens) == 0:
        raise InputError("the evaluation text is empty (0 tokens)", "pass a --text file with real text")
    use = len(tokens) if n_tokens is None else min(n_tokens, len(tokens))
    n = use // window
    if n == 0:
        raise InputError(
            f"the text has {len(tokens)} tokens, shorter than one window of {window}",
            f"pass a longer --text (>= {window} tokens) or a smaller window",
        )
    span = list(tokens[len(tokens) - n * window :] if from_end else tokens[: n * window])
    return torch.tensor(span, dtype=torch.long).view(n, window)


def split_held_out(
    tokens: Sequence[int], window: int, eval_tokens: int | None, calib_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eval windows from the start, calibration windows from the end); raises unless they are disjoint."""
    ev = windows_from_tokens(tokens, window, eval_tokens)
    cal = windows_from_tokens(tokens, window, calib_tokens, from_end=True)
    if ev.numel() + cal.numel() > len(tokens):
        raise InputError(
            f"evaluation ({ev.numel()} tokens) and calibration ({cal.numel()} tokens) overlap in a text of "
            f"{len(tokens)} tokens",
            "pass a longer --text or fewer --tokens / --calib-tokens",
        )
    return ev, cal
