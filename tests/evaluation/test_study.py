"""``python -m layerpair.evaluation.study`` end to end on a tiny checkpoint: table, JSON and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerpair.evaluation.study import main


def test_study_on_tiny_model(
    tiny_checkpoint_with_tokenizer: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "study.json", tmp_path / "study.png"
    rc = main([str(tiny_checkpoint_with_tokenizer), "--depths", "5,4", "--eval-tokens", "1024",
               "--calib-tokens", "512", "--contig-calib-tokens", "512", "--heal-tokens", "1024",
               "--json", str(out), "--plot", str(png)])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    for d in ("5", "4"):
        row = r["rows"][d]
        assert len(row["auto"]["pairs"]) == len(row["contiguous"]["pairs"]) == 6 - int(d)
        assert row["auto_heal"]["pairs"] == row["auto"]["pairs"]
        assert all(row[k]["ratio"] > 0 for k in ("auto", "auto_heal", "contiguous"))
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| 5 |" in table and "| 4 |" in table
