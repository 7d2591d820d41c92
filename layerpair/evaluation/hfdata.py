"""Evaluation data through Hugging Face ``datasets``: ``--text hf:PATH[:CONFIG]:SPLIT`` and ``--mc hf:...``.

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

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerpair.errors import InputError
from layerpair.evaluation.metrics import MCItem

PREFIX = "hf:"
LAYOUTS = (
    "generic (question, choices, answer), ARC (question, choices.text/label, answerKey), "
    "HellaSwag (ctx, endings, label), PIQA (goal, sol1, sol2, label)"
)


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
        from layerpair.exporter.loading import _hub_reachable

        if os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE") or not _hub_reachable():
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
