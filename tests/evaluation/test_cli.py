"""``layerpair-export eval`` end to end on a tiny checkpoint (with a tiny trained tokenizer), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerpair.cli import VERBS, main
from tests.evaluation.conftest import TEXT


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text(TEXT * 3)
    return p


def test_eval_verb_is_registered() -> None:
    assert VERBS["eval"] == "layerpair.evaluation.cli:run_eval_cli"


def test_eval_auto_heal_writes_json(
    tiny_checkpoint_with_tokenizer: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        '{"question": "The quick brown", "choices": ["fox", "dog"], "answer": 0}\n'
        '{"question": "All that glitters is not", "choices": ["gold", "smoke"], "answer": "gold"}\n'
    )
    out = tmp_path / "r.json"
    plot = tmp_path / "f.png"
    rc = main(
        ["eval", str(tiny_checkpoint_with_tokenizer), "--pairs", "auto", "--target-depth", "4", "--heal",
         "--text", str(text_file), "--tokens", "256", "--window", "64", "--calib-tokens", "256",
         "--mc", str(mc), "--json", str(out), "--plot", str(plot),
         "--calib", "generated", "--calib-samples", "8", "--calib-length", "64"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["depth"] == 4 and len(r["pairs"]) == 2
    assert r["auto"]["frontier"][-1]["depth"] == 4 and r["heal"]["pairs"] == r["pairs"]
    # --calib generated: 8 x 64 tokens sampled from the model itself, for both uses; the search reads 256 (4 rows)
    cal = r["calibration"]
    assert cal["search"]["source"] == cal["heal"]["source"] == "generated" and cal["heal"]["tokens"] == 512
    assert r["auto"]["calib_tokens"] == 256 and r["heal"]["calib_tokens"] == 512
    assert r["pytorch"]["text"]["scored_tokens"] == 4 * 63
    assert 0 <= r["pytorch"]["mc"]["acc"] <= 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "ppl ratio" in printed and "pytorch" in printed


def test_eval_default_calibration_searches_text_heals_generated(
    tiny_checkpoint_with_tokenizer: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r.json"
    rc = main(["eval", str(tiny_checkpoint_with_tokenizer), "--pairs", "auto", "--target-depth", "5", "--heal",
               "--text", str(text_file), "--tokens", "128", "--window", "64", "--calib-tokens", "128",
               "--calib-samples", "4", "--calib-length", "32", "--json", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    cal = json.loads(out.read_text())["calibration"]
    assert cal["search"]["source"] == "text" and cal["search"]["text"] == "the end of the evaluation text"
    assert cal["heal"]["source"] == "generated" and cal["heal"]["tokens"] == 4 * 32


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--tokens", "10"], "shorter than one window"),
        (["--pairs", "auto", "--max-ppl-increase=-3%"], "out of range"),
        (["--pairs", "auto"], "needs a budget"),
        (["--target-depth", "3"], "only apply to --pairs auto"),
        (["--pairs", "1-3"], "not two adjacent layers"),
        (["--mc", "/nonexistent.jsonl"], "not found"),
        (["--heal", "--pairs", "1-2", "--heal-tokens", "0"], "--heal-tokens must be >= 1"),
        (["--pairs", "1-2", "--heal-calib", "text"], "--heal-calib only applies to --heal"),
        (["--heal", "--pairs", "1-2", "--calib", "generated", "--calib-text", __file__], "no calibration reads it"),
        (["--text", "hf:only-a-path"], "not a dataset spec"),
    ],
)
def test_eval_bad_flags_fail_before_loading(extra: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["eval", "/nonexistent-model", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_eval_text_errors(
    tiny_checkpoint_with_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["eval", str(tiny_checkpoint_with_tokenizer), "--text", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.")
    assert main(["eval", str(tiny_checkpoint_with_tokenizer), "--text", str(short), "--window", "64",
                 "--tokens", "64"]) == 2  # fmt: skip
    assert "shorter than one window" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text(TEXT * 3)
    assert main(["eval", str(tiny_checkpoint_with_tokenizer), "--text", str(text), "--window", "64", "--tokens",
                 "256", "--pairs", "1-2", "--heal", "--heal-tokens", "100000", "--calib", "text"]) == 2  # fmt: skip
    assert "would overlap" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert main(["eval", str(tiny_checkpoint_with_tokenizer), "--mc", str(bad)]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err


def test_export_pairs_auto_heal_records_choice(
    tiny_checkpoint_with_tokenizer: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "exp"
    rc = main([str(tiny_checkpoint_with_tokenizer), "--pairs", "auto", "--target-depth", "5", "--heal",
               "--calib-text", str(text_file), "--calib-tokens", "1024", "-o", str(out)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "report.json").read_text())
    assert r["depth"] == 5 and r["pairs"] == r["auto"]["pairs"] == r["heal"]["pairs"]
    assert r["auto"]["calib_tokens"] == 1024 and r["heal"]["damping"] == "auto"  # chosen per fit (held out)
    assert r["heal"]["refit_inputs"] == "ab" and len(r["heal"]["input_damping"]) == 1  # --heal-inputs default
    assert len(r["heal"]["chosen_damping"]) == 1 and all(
        0 < d for ds in r["heal"]["chosen_damping"].values() for d in ds
    )
    # --calib-text (in-domain text) serves both uses
    assert r["calibration"]["search"]["text"] == r["calibration"]["heal"]["text"] == str(text_file)
    assert r["calibration"]["search"]["source"] == r["calibration"]["heal"]["source"] == "text"
    # --heal defaults to 16384 calibration tokens, capped to the whole (short) calibration text in windows of 512
    from transformers import AutoTokenizer

    from layerpair.evaluation.data import encoder

    n = len(encoder(AutoTokenizer.from_pretrained(tiny_checkpoint_with_tokenizer))(text_file.read_text()))
    assert n < 16384 and r["heal"]["calib_tokens"] == 512 * (n // 512)
    # validation ran against the healed PyTorch model and passed (else rc != 0)
    assert all(a["max_abs"] <= 1e-4 for a in r["agreement"].values())
