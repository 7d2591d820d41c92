"""``layerpair-export bench`` on tiny exports: the latency section it writes is what ``check`` gates.

No timing is asserted except through the gate: a model with heavy extra work in its graph (hundreds of times the
tiny decoder's FLOPs, feeding the logits so ONNX Runtime cannot drop it) must fail it, the same model against
itself must pass it at a loose threshold.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from layerpair.cli import main
from layerpair.deploy import bench
from layerpair.deploy.check import checks_from_reports

FAST = ["--prompt", "8", "--decode", "4", "--rounds", "3", "--threads", "1"]
# Loose: two runs of one tiny model differ by far less on a quiet machine, but a 2-core CI box running two test
# workers once measured > 2x between them; the slowed model is > 10x slower.
GATE = 4.0


@pytest.fixture(scope="module")
def tiny_baseline(tiny_export: Path) -> Path:
    """The same tiny checkpoint exported with --pairs none: the original's export."""
    out = tiny_export.parent / "tiny-none"
    if not out.is_dir():
        assert main([str(tiny_export.parent / "tiny-llama"), "--pairs", "none", "-o", str(out)]) == 0
    return out


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # real copies: the fixture's weights are hard-linked, which onnx.load refuses
    return dst


@pytest.fixture(scope="module")
def slowed_export(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny export with 8 MatMuls of [.,1024]x[1024,1024] on the logits added back as zeros: same outputs,
    much more work. The chain starts from the logits (a runtime value), so it cannot be constant-folded."""
    out = copy_export(tiny_export, tmp_path_factory.mktemp("slowed") / "slow")
    model = onnx.load(str(out / "model.onnx"))  # weights read in: saved below as one file
    (out / "model.onnx.data").unlink(missing_ok=True)
    g = model.graph
    V, W = 128, 1024
    g.initializer.extend(
        [
            numpy_helper.from_array(np.full((V, W), 1e-3, np.float32), "slow_in"),
            numpy_helper.from_array(np.full((W, W), 1e-3, np.float32), "slow_w"),
            numpy_helper.from_array(np.zeros((W, V), np.float32), "slow_out"),
        ]
    )
    logits = g.output[0].name
    for node in g.node:  # the producer of the logits now writes an internal name
        node.output[:] = ["slow_logits_in" if o == logits else o for o in node.output]
    nodes = [helper.make_node("MatMul", ["slow_logits_in", "slow_in"], ["slow_0"])]
    for i in range(8):
        nodes.append(helper.make_node("MatMul", [f"slow_{i}", "slow_w"], [f"slow_{i + 1}"]))
    nodes.append(helper.make_node("MatMul", ["slow_8", "slow_out"], ["slow_zero"]))
    nodes.append(helper.make_node("Add", ["slow_logits_in", "slow_zero"], [logits]))
    g.node.extend(nodes)
    onnx.save(model, str(out / "model.onnx"))
    return out


def latency_of(path: Path) -> dict:
    return json.loads(path.read_text())["latency"]


def test_bench_writes_a_section_check_gates(tiny_export: Path, tiny_baseline: Path, tmp_path: Path) -> None:
    out = copy_export(tiny_export, tmp_path / "lp")
    assert main(["bench", str(out), "--baseline", str(tiny_baseline), "--batch", "1,2", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    lat = report["latency"]
    assert set(lat) == {
        "decode_ms_per_token",
        "prefill_ms",
        "decode_ms_per_token_b2",
        "prefill_ms_b2",
        "same_run_baseline",
    }
    assert set(lat["same_run_baseline"]) == set(lat) - {"same_run_baseline"}
    b = report["bench"]
    assert b["machine"]["logical_cores"] and b["threads"]["ort_intra_op"] == 1 and "onnxruntime" in b["versions"]
    row = b["results"][0]
    assert row["limit"] == pytest.approx(4 / 3)  # 4 layers, 1 pair, baseline without pairs
    assert row["export"]["n"] == 3 and len(row["export"]["samples"]) == 3  # warm-up round discarded
    results = checks_from_reports(report, {}, max_latency_ratio=100.0)
    lat_rows = [r for r in results if r.name.startswith("latency")]
    assert len(lat_rows) == 4 and all(r.status == "PASS" and "same run" in r.detail for r in lat_rows)
    assert (out / "model.onnx").is_file() and report["io"]  # the rest of the report is kept


def test_slowed_model_fails_the_gate_and_itself_passes(
    slowed_export: Path, tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slow, same = tmp_path / "slow.json", tmp_path / "same.json"
    same.write_text(json.dumps({"onnx": {"text": {"ppl_ratio": 1.0, "top1": 1.0}}}))  # an eval --json file
    assert main(["bench", str(slowed_export), "--baseline", str(tiny_export), "--json", str(slow), *FAST]) == 0
    assert main(["bench", str(tiny_export), "--baseline", str(tiny_export), "--json", str(same), *FAST]) == 0
    gate = ["--max-latency-ratio", str(GATE)]
    capsys.readouterr()
    assert main(["check", str(slow), "--baseline", str(slow), *gate]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["check", str(same), "--baseline", str(same), *gate]) == 0
    out = capsys.readouterr().out
    assert "latency decode_ms_per_token" in out and "top1_agreement" in out  # the eval figures were kept
    assert "latency" not in json.loads((tiny_export / "report.json").read_text())  # --json: report untouched


def test_bad_input_is_one_line(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_model = tmp_path / "no-model"
    no_model.mkdir()
    shutil.copy(tiny_export / "report.json", no_model / "report.json")
    vocab = copy_export(tiny_export, tmp_path / "vocab")
    report = json.loads((vocab / "report.json").read_text())
    report["io"]["outputs"][0]["dims"][-1] = 96
    (vocab / "report.json").write_text(json.dumps(report))
    spec = copy_export(tiny_export, tmp_path / "spec")
    report = json.loads((spec / "report.json").read_text())
    report["io"]["inputs"][1]["dtype"] = "int32"
    (spec / "report.json").write_text(json.dumps(report))
    cases = {
        "does not exist": [str(no_model)],
        "vocabulary of 96": [str(tiny_export), "--baseline", str(vocab)],
        "different I/O spec": [str(tiny_export), "--baseline", str(spec)],
        "--batch must be positive": [str(tiny_export), "--batch", "0"],
        "--decode must be >= 1": [str(tiny_export), "--decode", "0"],
    }
    for want, args in cases.items():
        capsys.readouterr()
        assert main(["bench", *args]) == 2, want
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and want in err and "\n" not in err, err


def test_trt_without_gpu_says_why(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from layerpair.engine.build import gpu_status

    if gpu_status()[0]:
        pytest.skip("a GPU is present")
    assert main(["bench", str(tiny_export), "--runtime", "trt"]) == 2
    err = capsys.readouterr().err
    assert "GPU" in err and "ms" not in err


def test_ctrl_c_leaves_the_report_unchanged(
    tiny_export: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = copy_export(tiny_export, tmp_path / "lp")
    before = (out / "report.json").read_bytes()
    calls = []

    def interrupted(*args: object, **kw: object) -> tuple[float, list[float]]:
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return 0.01, [0.001]

    monkeypatch.setattr(bench, "time_decode", interrupted)
    assert main(["bench", str(out), *FAST]) == 130
    assert (out / "report.json").read_bytes() == before
    assert "round 2/4" in capsys.readouterr().err  # a progress line per round before the interrupt


def test_torch_runtime_and_plot(tiny_export: Path, tmp_path: Path) -> None:
    """--runtime torch without --baseline times the original PyTorch model (no pairs) beside the LP one."""
    out, png = copy_export(tiny_export, tmp_path / "lp"), tmp_path / "ctx.png"
    args = ["bench", str(out), "--runtime", "torch", *FAST, "--plot", str(png), "--plot-contexts", "8,32"]
    assert main(args) == 0
    b = json.loads((out / "report.json").read_text())["bench"]
    assert b["baseline"].endswith("(original, no pairs)") and "torch_intra_op" in b["threads"]
    assert b["plot"]["contexts"] == [8, 32] and set(b["plot"]["decode_ms_per_token"]) == {"export", "baseline"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
