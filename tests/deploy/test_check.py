"""``layerpair-export check``: the CI regression gate over two report.json files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest

from layerpair.cli import main
from layerpair.deploy.check import FAIL, PASS, SKIP, checks_from_reports


def _report(ppl: float | None = 1.03, top1: float | None = 0.96, latency: dict[str, Any] | None = None) -> dict:
    r: dict[str, Any] = {"model": "tiny", "pairs": [[1, 2]]}
    acc = {k: v for k, v in (("ppl_ratio", ppl), ("top1_agreement", top1)) if v is not None}
    if acc:
        r["accuracy"] = acc
    if latency is not None:
        r["latency"] = latency
    return r


def _write(tmp_path: Path, name: str, obj: object) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["check", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_equal_reports_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _report(latency={"decode_ms_per_token": 3.0})
    rc, out, _ = _run(capsys, _write(tmp_path, "a.json", r), "--baseline", _write(tmp_path, "b.json", r))
    assert rc == 0, out
    assert "OK:" in out and "FAIL" not in out


def test_ppl_ratio_regression_fails_with_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = _write(tmp_path, "a.json", _report(ppl=1.10))
    base = _write(tmp_path, "b.json", _report(ppl=1.03))
    rc, out, _ = _run(capsys, rep, "--baseline", base, "--max-ppl-ratio-increase", "0.05")
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("ppl_ratio"))
    assert "1.1000" in line and "1.0300" in line and FAIL in line
    assert "REGRESSION" in out
    # within a looser threshold the same pair passes
    rc, out, _ = _run(capsys, rep, "--baseline", base, "--max-ppl-ratio-increase", "0.08")
    assert rc == 0, out


def test_ppl_threshold_boundary() -> None:
    at = checks_from_reports(_report(ppl=1.05), _report(ppl=1.0), max_ppl_ratio_increase=0.05)
    over = checks_from_reports(_report(ppl=1.0501), _report(ppl=1.0), max_ppl_ratio_increase=0.05)
    assert at[0].status == PASS and over[0].status == FAIL


def test_top1_floor() -> None:
    res = checks_from_reports(_report(top1=0.85), _report(top1=0.97), min_top1=0.9)
    assert [r.status for r in res if r.name == "top1_agreement"] == [FAIL]


def test_missing_accuracy_not_measured_unless_requested(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    latency = {"decode_ms_per_token": 3.0}  # one check that runs, so the gate as a whole can pass
    rep = _write(tmp_path, "a.json", _report(ppl=None, top1=None, latency=latency))
    base = _write(tmp_path, "b.json", _report(latency=latency))
    rc, out, _ = _run(capsys, rep, "--baseline", base)
    assert rc == 0 and SKIP in out  # shown as not measured, never as a pass
    assert not any(ln.startswith("ppl_ratio") and PASS in ln for ln in out.splitlines())
    rc, out, _ = _run(capsys, rep, "--baseline", base, "--max-ppl-ratio-increase", "0.01")
    assert rc == 1
    assert "not measured, but this threshold was requested" in out


@pytest.mark.parametrize("baseline", [_report(), _report(ppl=None, top1=None)])
def test_no_check_ran_is_not_a_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str], baseline: dict) -> None:
    """A report without metrics and no threshold flags: every check is "not measured", so the gate fails."""
    rep = _write(tmp_path, "a.json", _report(ppl=None, top1=None))
    js = tmp_path / "out.json"
    rc, out, _ = _run(capsys, rep, "--baseline", _write(tmp_path, "b.json", baseline), "--json", js)
    assert rc == 1, out
    assert json.loads(js.read_text())["passed"] is False
    last = out.strip().splitlines()[-1]
    assert last.startswith("NOTHING CHECKED: no metric is measured in both REPORT and BASELINE"), out
    assert "OK:" not in out and "passed" not in out


def test_latency_uses_same_run_baseline_first() -> None:
    # Against the baseline file (2.0 ms) this would be a 1.5x regression; the same-run timing (2.9 ms) says the
    # machine is simply slower today, and the gate must trust the same-run figure.
    rep = _report(latency={"decode_ms_per_token": 3.0, "same_run_baseline": {"decode_ms_per_token": 2.9}})
    res = checks_from_reports(rep, _report(latency={"decode_ms_per_token": 2.0}), max_latency_ratio=1.1)
    lat = [r for r in res if r.name.startswith("latency")]
    assert [(r.status, r.reference) for r in lat] == [(PASS, 2.9)]
    assert "same run" in lat[0].detail
    res = checks_from_reports(
        _report(latency={"decode_ms_per_token": 3.0}), _report(latency={"decode_ms_per_token": 2.0})
    )
    assert [r.status for r in res if r.name.startswith("latency")] == [FAIL]


def test_latency_missing_requested_fails() -> None:
    res = checks_from_reports(_report(), _report(), max_latency_ratio=1.2)
    assert [r.status for r in res if r.name.startswith("latency")] == [FAIL]
    res = checks_from_reports(_report(), _report())
    assert [r.status for r in res if r.name.startswith("latency")] == [SKIP]


@pytest.mark.parametrize("content", ['{"accuracy": {"ppl_ratio": 1.0,}', "[1, 2]", ""])
def test_malformed_json_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    rc, out, err = _run(capsys, bad, "--baseline", _write(tmp_path, "b.json", _report()))
    assert rc == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: REPORT") and "bad.json" in err


def test_non_numeric_metric_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = _write(tmp_path, "a.json", {"accuracy": {"ppl_ratio": "1.0"}})
    rc, _, err = _run(capsys, rep, "--baseline", _write(tmp_path, "b.json", _report()))
    assert rc == 2 and "accuracy.ppl_ratio" in err and "finite number" in err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(capsys, tmp_path / "nope.json", "--baseline", tmp_path / "nope.json")
    assert rc == 2 and "does not exist" in err


def test_json_and_junit_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rep = _write(tmp_path, "a.json", _report(ppl=1.2, latency={"prefill_ms": 10.0}))
    base = _write(tmp_path, "b.json", _report(ppl=1.0, top1=None))
    j, x = tmp_path / "out.json", tmp_path / "out.xml"
    rc, _, _ = _run(capsys, rep, "--baseline", base, "--json", j, "--junit", x)
    assert rc == 1
    data = json.loads(j.read_text())
    assert data["passed"] is False
    by_name = {c["name"]: c for c in data["checks"]}
    assert by_name["ppl_ratio"]["status"] == FAIL and by_name["ppl_ratio"]["value"] == 1.2
    assert by_name["latency prefill_ms"]["status"] == SKIP  # baseline has no latency, not requested
    suite = ET.parse(x).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("tests") == str(len(data["checks"])) and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert cases["ppl_ratio"].find("failure") is not None
    assert cases["latency prefill_ms"].find("skipped") is not None
    assert cases["top1_agreement"].find("failure") is None and cases["top1_agreement"].find("skipped") is None


def test_json_output_into_missing_dir_is_input_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path, "a.json", _report())
    rc, _, err = _run(capsys, r, "--baseline", r, "--json", tmp_path / "no" / "x.json")
    assert rc == 2 and "does not exist" in err
    assert not (tmp_path / "no").exists()


def test_bad_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _write(tmp_path, "a.json", _report())
    rc, _, err = _run(capsys, r, "--baseline", r, "--min-top1", "1.5")
    assert rc == 2 and "--min-top1" in err


def test_eval_json_layout_is_read() -> None:
    """`layerpair-export eval --json` output: onnx.text preferred over pytorch.text; `top1` accepted."""
    ev = {
        "onnx": {"text": {"ppl": 20.0, "ppl_ratio": 1.30, "top1": 0.80}},
        "pytorch": {"text": {"ppl": 20.0, "ppl_ratio": 1.01, "top1": 0.99}},
    }
    base = {"pytorch": {"text": {"ppl_ratio": 1.02, "top1": 0.97}}}
    res = {r.name: r for r in checks_from_reports(ev, base, max_ppl_ratio_increase=0.05, min_top1=0.9)}
    assert (res["ppl_ratio"].value, res["ppl_ratio"].reference, res["ppl_ratio"].status) == (1.30, 1.02, FAIL)
    assert (res["top1_agreement"].value, res["top1_agreement"].status) == (0.80, FAIL)
    # an export report's own "onnx" section (file, opset, ...) is not mistaken for accuracy figures
    exp = {"onnx": {"file": "model.onnx", "opset": 20}}
    assert {r.status for r in checks_from_reports(exp, exp) if r.name != "latency"} == {SKIP}
