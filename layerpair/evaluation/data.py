"""Evaluation data: its types and every reader, the bottom of the evaluation package (no evaluation imports).

    text   ``--text`` / ``--calib-text``: the offline default (CPython's documentation prose), a UTF-8 file, or
           a Hugging Face dataset; ``windows_from_tokens`` cuts the tokens into windows
    mc     ``--mc``: ``MCItem``s from a JSONL file ({question, choices, answer}) or a Hugging Face dataset
    hf     ``hf:PATH[:CONFIG]:SPLIT`` through ``datasets``

Default text: every entry of ``pydoc_data.topics.topics`` (the help texts of Python's language reference
that ship inside every CPython installation), in sorted key order, joined with a blank line. It is real
English prose, needs no network, and is identical on every machine with the same CPython minor version.

Held-out split: evaluation reads tokens from the *start* of a text, calibration (the pair search and
healing) reads them from the *end*, and the two ranges are checked to be disjoint.

Hugging Face datasets (``hf:PATH[:CONFIG]:SPLIT``)::

    --text hf:wikitext:wikitext-2-raw-v1:test      the rows' ``text`` field joined by newlines (--text-field)
    --mc   hf:allenai/ai2_arc:ARC-Easy:test         rows in one of the multiple-choice layouts below

PATH is anything ``datasets.load_dataset`` accepts: a hub dataset id (needs the network, or the local
``datasets`` cache), or a local directory of data files (jsonl/csv/parquet/txt), which works offline. Without
network a hub id fails within seconds with a one-line error, like a hub model id does.

Multiple-choice layouts (recognised by their columns; no task-specific text preprocessing — for the harness's
exact task definitions use the lm-evaluation-harness adapter, ``layerpair.evaluation.lm_eval_adapter``):

* generic: ``question``, ``choices`` (list of str), ``answer`` (index or one of the choices)
* ARC: ``question``, ``choices`` = {``text``: [...], ``label``: [...]}, ``answerKey`` (a label)
* HellaSwag: ``ctx``, ``endings``, ``label`` (index, possibly as a string)
* PIQA: ``goal``, ``sol1``, ``sol2``, ``label``
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerpair.errors import InputError

DEFAULT_WINDOW = 512
Encode = Callable[[str], list[int]]
PREFIX = "hf:"
LAYOUTS = (
    "generic (question, choices, answer), ARC (question, choices.text/label, answerKey), "
    "HellaSwag (ctx, endings, label), PIQA (goal, sol1, sol2, label)"
)


# ---- text ------------------------------------------------------------------------------------------------


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
    if isinstance(arg, str) and is_hf(arg):
        spec = parse_spec(arg)
        return text_from_rows(load_rows(spec), spec, field)
    return read_text(None if arg is None else Path(arg))


def check_text_arg(arg: str | Path | None, flag: str) -> None:
    """Cheap checks before any model loads: the dataset spec parses, or the file exists."""
    if arg is None:
        return
    if isinstance(arg, str) and is_hf(arg):
        parse_spec(arg)
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


# ---- multiple choice -------------------------------------------------------------------------------------


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int


def _bad_jsonl(path: Path, line: int, problem: str) -> InputError:
    return InputError(
        f"{path}:{line}: {problem}",
        'each line must be a JSON object {"question": str, "choices": [str, ...], "answer": index or choice}',
    )


def read_mc(path: Path) -> list[MCItem]:
    """Read a multiple-choice JSONL file; blank lines are skipped; the answer is an index or one of the choices."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read '{path}' ({type(e).__name__})", "pass a readable UTF-8 .jsonl file") from None
    items: list[MCItem] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _bad_jsonl(path, n, f"not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise _bad_jsonl(path, n, "not a JSON object")
        q, ch, ans = obj.get("question"), obj.get("choices"), obj.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise _bad_jsonl(path, n, "'question' must be a non-empty string")
        if not isinstance(ch, list) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
            raise _bad_jsonl(path, n, "'choices' must be a list of at least 2 non-empty strings")
        if isinstance(ans, bool) or not isinstance(ans, int | str):
            raise _bad_jsonl(path, n, "'answer' must be a choice index or the text of a choice")
        if isinstance(ans, str):
            if ans not in ch:
                raise _bad_jsonl(path, n, f"'answer' {ans!r} is not one of the choices")
            ans = ch.index(ans)
        if not 0 <= ans < len(ch):
            raise _bad_jsonl(path, n, f"'answer' index {ans} is out of range for {len(ch)} choices")
        items.append(MCItem(q, list(ch), ans))
    if not items:
        raise InputError(f"'{path}' has no items", "add at least one JSON line with question, choices and answer")
    return items


def read_mc_arg(arg: str) -> list[MCItem]:
    """``--mc``: a JSONL file or ``hf:PATH[:CONFIG]:SPLIT``."""
    if is_hf(arg):
        spec = parse_spec(arg)
        return mc_from_rows(load_rows(spec), spec)
    return read_mc(Path(arg))


# ---- Hugging Face datasets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFSpec:
    path: str
    config: str | None
    split: str

    def __str__(self) -> str:
        return PREFIX + ":".join(x for x in (self.path, self.config, self.split) if x is not None)


def is_hf(arg: str | os.PathLike[str] | None) -> bool:
    return isinstance(arg, str) and arg.startswith(PREFIX)


def parse_spec(arg: str) -> HFSpec:
    """``hf:PATH:SPLIT`` or ``hf:PATH:CONFIG:SPLIT`` (PATH may hold '/', not ':')."""
    parts = arg[len(PREFIX) :].split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise InputError(
            f"'{arg}' is not a dataset spec",
            "write hf:PATH:SPLIT or hf:PATH:CONFIG:SPLIT, e.g. hf:wikitext:wikitext-2-raw-v1:test",
        )
    if len(parts) == 2:
        return HFSpec(parts[0], None, parts[1])
    return HFSpec(parts[0], parts[1], parts[2])


def load_rows(spec: HFSpec) -> Any:
    """The split as a ``datasets.Dataset``; every failure is a one-line InputError."""
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"'{spec}' needs the 'datasets' package", "pip install 'layerpair-export[eval]' (or datasets==5.2.0)"
        ) from None
    local = Path(spec.path).exists()
    if not local:
        from layerpair.exporter.loading import hub_reachable

        if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or not hub_reachable():
            # datasets may still have it cached: try that first, offline, before failing.
            was = datasets.config.HF_HUB_OFFLINE
            try:
                datasets.config.HF_HUB_OFFLINE = True
                return datasets.load_dataset(spec.path, spec.config, split=spec.split)
            except Exception:
                raise InputError(
                    f"cannot download dataset '{spec.path}': no network (or HF_HUB_OFFLINE set) and not in the "
                    "local datasets cache",
                    "pass a local directory of data files as PATH, a --text FILE / --mc FILE.jsonl, or run online",
                ) from None
            finally:
                datasets.config.HF_HUB_OFFLINE = was
    try:
        return datasets.load_dataset(spec.path, spec.config, split=spec.split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load dataset '{spec}' ({first})", "check PATH, CONFIG and SPLIT") from None


def text_from_rows(rows: Any, spec: HFSpec, field: str = "text") -> str:
    """The ``field`` of every row, joined by newlines."""
    if field not in rows.column_names:
        raise InputError(
            f"dataset '{spec}' has no column '{field}' (columns: {', '.join(rows.column_names)})",
            "pass --text-field with the column that holds the text",
        )
    text = "\n".join(str(t) for t in rows[field] if t is not None)
    if not text.strip():
        raise InputError(f"dataset '{spec}' column '{field}' holds no text", "pick another split or column")
    return text


def mc_from_rows(rows: Any, spec: HFSpec) -> list[MCItem]:
    """Multiple-choice items from one of the known layouts (module docstring)."""
    cols = set(rows.column_names)
    items: list[MCItem] = []
    for n, r in enumerate(rows):
        try:
            if {"question", "choices", "answerKey"} <= cols:  # ARC
                labels, texts = list(r["choices"]["label"]), list(r["choices"]["text"])
                items.append(MCItem(r["question"], texts, labels.index(r["answerKey"])))
            elif {"question", "choices", "answer"} <= cols:  # generic
                ch, ans = list(r["choices"]), r["answer"]
                items.append(MCItem(r["question"], ch, ch.index(ans) if isinstance(ans, str) else int(ans)))
            elif {"ctx", "endings", "label"} <= cols:  # HellaSwag
                items.append(MCItem(r["ctx"], list(r["endings"]), int(r["label"])))
            elif {"goal", "sol1", "sol2", "label"} <= cols:  # PIQA
                items.append(MCItem(r["goal"], [r["sol1"], r["sol2"]], int(r["label"])))
            else:
                raise InputError(
                    f"dataset '{spec}' is not in a known multiple-choice layout (columns: {', '.join(sorted(cols))})",
                    f"use one of: {LAYOUTS}; or convert it to a JSONL for --mc",
                )
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"dataset '{spec}' row {n}: answer or choices unusable ({type(e).__name__}: {e})",
                "check the answer field against the choices",
            ) from None
        it = items[-1]
        if not it.choices or not 0 <= it.answer < len(it.choices) or not isinstance(it.question, str):
            raise InputError(f"dataset '{spec}' row {n}: answer {it.answer} out of range", "check the dataset")
    if not items:
        raise InputError(f"dataset '{spec}' has no rows", "pick another split")
    return items
