"""``hf:PATH[:CONFIG]:SPLIT`` datasets for --text / --mc: local data directories (offline), every known
multiple-choice layout, and the errors (bad spec, unknown layout, hub id without network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from layerpair.errors import InputError
from layerpair.evaluation.data import HFSpec, check_text_arg, parse_spec, read_mc_arg, text_from_arg

pytest.importorskip("datasets", reason="the 'datasets' package is part of the eval extra")


def _jsonl_dir(root: Path, rows: list[dict[str, Any]], split: str = "test") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_spec_parsing() -> None:
    assert parse_spec("hf:wikitext:wikitext-2-raw-v1:test") == HFSpec("wikitext", "wikitext-2-raw-v1", "test")
    assert parse_spec("hf:allenai/ai2_arc:test") == HFSpec("allenai/ai2_arc", None, "test")
    for bad in ("hf:onlypath", "hf:a:b:c:d", "hf::test"):
        with pytest.raises(InputError, match="not a dataset spec"):
            parse_spec(bad)
        with pytest.raises(InputError, match="not a dataset spec"):
            check_text_arg(bad, "--text")


def test_text_from_a_local_dataset_directory(tmp_path: Path) -> None:
    d = _jsonl_dir(tmp_path / "d", [{"text": "first line"}, {"text": "second line"}, {"body": None, "text": "x"}])
    assert text_from_arg(f"hf:{d}:test") == "first line\nsecond line\nx"
    with pytest.raises(InputError, match="no column 'body2'"):
        text_from_arg(f"hf:{d}:test", field="body2")
    with pytest.raises(InputError, match="cannot load dataset"):
        text_from_arg(f"hf:{d}:validation")  # no such split


@pytest.mark.parametrize(
    ("rows", "want"),
    [
        ([{"question": "2+2=", "choices": ["3", "4"], "answer": 1}], ("2+2=", ["3", "4"], 1)),
        ([{"question": "2+2=", "choices": ["3", "4"], "answer": "4"}], ("2+2=", ["3", "4"], 1)),
        (
            [{"question": "Sky?", "choices": {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]},
              "answerKey": "B"}],
            ("Sky?", ["red", "blue", "green"], 1),
        ),
        ([{"ctx": "He opened the", "endings": ["door", "sky"], "label": "0"}], ("He opened the", ["door", "sky"], 0)),
        ([{"goal": "Boil water", "sol1": "freeze it", "sol2": "heat it", "label": 1}],
         ("Boil water", ["freeze it", "heat it"], 1)),
    ],
)  # fmt: skip
def test_mc_layouts(tmp_path: Path, rows: list[dict[str, Any]], want: tuple[str, list[str], int]) -> None:
    d = _jsonl_dir(tmp_path / "mc", rows)
    (it,) = read_mc_arg(f"hf:{d}:test")
    assert (it.question, it.choices, it.answer) == want


def test_mc_unknown_layout_and_bad_answer(tmp_path: Path) -> None:
    d = _jsonl_dir(tmp_path / "u", [{"prompt": "x", "options": ["a"], "gold": 0}])
    with pytest.raises(InputError, match="not in a known multiple-choice layout"):
        read_mc_arg(f"hf:{d}:test")
    d = _jsonl_dir(tmp_path / "b", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(InputError, match="out of range"):
        read_mc_arg(f"hf:{d}:test")


def test_hub_dataset_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from layerpair.exporter import loading

    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    with pytest.raises(InputError, match="cannot download dataset 'no-such-org/no-such-set'"):
        text_from_arg("hf:no-such-org/no-such-set:test")
