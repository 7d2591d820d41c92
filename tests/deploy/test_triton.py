"""Triton model repository: every config.pbtxt parses into tritonclient's ModelConfig proto, state pairs are
real model inputs/outputs, and the python-backend generation model runs (with a stand-in pb_utils)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from layerpair.arch import ArchSpec
from layerpair.cli import main
from layerpair.decode import DecoderIO
from layerpair.deploy.generate import export_from_dir, generator_from_export
from layerpair.deploy.triton import TritonOptions, stateful_config, triton_repo_from_export
from layerpair.iospec import IOSpec
from tests.conftest import tiny_config

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="needs tritonclient[grpc]==2.73.0 (pip install -e '.[triton]')"
)
from google.protobuf import text_format  # noqa: E402  (protobuf comes with tritonclient[grpc])


def parse_config(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repo(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = tmp_path_factory.mktemp("triton") / "repo"
    rc = main(["triton", str(tiny_export), str(r), "--instances", "2", "--max-batch-size", "4", "--kind", "cpu"])
    assert rc == 0
    return r


def test_every_config_parses(repo: Path) -> None:
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert {c.parent.name for c in configs} == {"layerpair_onnx", "layerpair_generate"}
    for c in configs:
        cfg = parse_config(c)
        assert cfg.name == c.parent.name
        assert (c.parent / "1").is_dir()


def test_export_flag_writes_parsable_repo(tiny_flag_repo: Path, tiny_export: Path) -> None:
    """`layerpair-export MODEL --pairs 1-2 --triton REPO` (the tiny_export fixture ran exactly that)."""
    configs = {c.parent.name: parse_config(c) for c in tiny_flag_repo.glob("*/config.pbtxt")}
    assert set(configs) == {"layerpair_onnx", "layerpair_generate"}
    report = json.loads((tiny_export / "report.json").read_text())
    want = {(s["name"]) for s in report["io"]["inputs"][3:]}
    assert {s.input_name for s in configs["layerpair_onnx"].sequence_batching.state} == want


def test_onnx_config_state_pairs_match_model(repo: Path, tiny_export: Path) -> None:
    cfg = parse_config(repo / "layerpair_onnx" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 4
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    m = onnx.load(str(repo / "layerpair_onnx" / "1" / "model.onnx"), load_external_data=False)
    ins = {i.name: i for i in m.graph.input}
    outs = {o.name: o for o in m.graph.output}
    report = json.loads((tiny_export / "report.json").read_text())
    states = cfg.sequence_batching.state
    assert len(states) == 2 * len(report["io"]["cache_slots"])
    for st in states:
        assert st.input_name in ins and st.output_name in outs, (st.input_name, st.output_name)
        shape = [d.dim_value or d.dim_param for d in ins[st.input_name].type.tensor_type.shape.dim]
        assert list(st.dims) == [shape[1], -1, shape[3]]  # batch implicit (max_batch_size > 0)
        (init,) = st.initial_state  # repeated in the proto; one zero-filled entry
        assert init.zero_data and list(init.dims) == [shape[1], 1, shape[3]]
        assert st.data_type == model_config_pb2.TYPE_FP32
    assert {"past_key_values.1_2.key", "past_key_values.1.key"} & {s.input_name for s in states}
    # the non-state inputs are exactly the token inputs; controls are real graph inputs
    cfg_inputs = [i.name for i in cfg.input]
    assert cfg_inputs == ["input_ids", "attention_mask", "position_ids"]
    assert all(list(i.dims) == [-1] for i in cfg.input)
    assert [o.name for o in cfg.output] == ["logits"] and list(cfg.output[0].dims) == [-1, 128]
    controls = {c.name: c.control[0].kind for c in cfg.sequence_batching.control_input}
    sb = model_config_pb2.ModelSequenceBatching.Control
    assert controls == {"START": sb.CONTROL_SEQUENCE_START, "READY": sb.CONTROL_SEQUENCE_READY}
    assert set(controls) <= set(ins)
    every_input = set(cfg_inputs) | {s.input_name for s in states} | set(controls)
    assert every_input == set(ins)  # nothing the model needs is left unfed by Triton


def test_repo_onnx_runs_with_controls(repo: Path, tiny_export: Path) -> None:
    """The repository's ONNX (with START/READY added) gives the export's logits."""
    import onnxruntime as ort

    export = export_from_dir(tiny_export)
    sess = ort.InferenceSession(str(repo / "layerpair_onnx" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([[3, 4, 5]], np.int64),
        "attention_mask": np.ones((1, 3), np.int64),
        "position_ids": np.arange(3)[None],
        "START": np.ones((1, 1), np.int32),
        "READY": np.ones((1, 1), np.int32),
        **export.io.empty_state(1),
    }
    got = sess.run(["logits"], feeds)[0]
    want, _ = generator_from_export(export).step(
        feeds["input_ids"], feeds["attention_mask"], feeds["position_ids"], export.io.empty_state(1)
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_merged_spec_config_parses_with_wide_slots() -> None:
    cfg = tiny_config("llama")
    spec = IOSpec.for_model(ArchSpec.from_hf_config(cfg), [(1, 2)], merged=True)
    dio = DecoderIO.from_json(spec.to_json(), spec.state_pairs())
    text = stateful_config(spec.to_json(), dio, "onnxruntime_onnx", TritonOptions(max_batch_size=0), "m", True)
    pc = text_format.Parse(text, model_config_pb2.ModelConfig())
    st = {s.input_name: s for s in pc.sequence_batching.state}
    assert set(st) == {p for p, _ in spec.state_pairs()}
    wide = st["past_key_values.1_2.key"]
    assert wide.output_name == "present.1_2.key"
    assert list(wide.dims) == [-1, 4, -1, 16]  # max_batch_size 0: batch dim explicit
    assert list(wide.initial_state[0].dims) == [1, 4, 1, 16]
    assert list(pc.input[0].dims) == [-1, -1]


def test_tensorrt_plan_and_accelerator(tiny_export: Path, tmp_path: Path) -> None:
    """With OUT/model.plan present a tensorrt_plan model is added (no control inputs: an engine cannot grow any)."""
    import shutil

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    (out / "model.plan").write_bytes(b"not a real engine")
    repo = tmp_path / "repo"
    opts = TritonOptions(kind="KIND_GPU", gpus=(0, 1), ort_tensorrt=True, generate_model=False)
    summary = triton_repo_from_export(out, repo, opts)
    assert summary["models"] == {"layerpair_onnx": "onnxruntime_onnx", "layerpair_trt": "tensorrt_plan"}
    trt = parse_config(repo / "layerpair_trt" / "config.pbtxt")
    assert trt.platform == "tensorrt_plan" and not trt.sequence_batching.control_input
    assert len(trt.sequence_batching.state) == len(
        parse_config(repo / "layerpair_onnx" / "config.pbtxt").sequence_batching.state
    )
    assert list(trt.instance_group[0].gpus) == [0, 1]
    # both engine profiles (decode, prefill) on every instance: else Triton runs everything under profile 0
    assert list(trt.instance_group[0].profile) == ["0", "1"]
    assert not parse_config(repo / "layerpair_onnx" / "config.pbtxt").instance_group[0].profile
    ort_cfg = parse_config(repo / "layerpair_onnx" / "config.pbtxt")
    accel = ort_cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accel] == ["tensorrt"]


def test_existing_repo_needs_force(repo: Path, tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in repo.iterdir())
    rc = main(["triton", str(tiny_export), str(repo)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in repo.iterdir()) == before


def test_bad_flags(tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["triton", str(tiny_export), str(tmp_path / "r"), "--gpus", "0", "--kind", "cpu"])
    assert rc == 2 and "--gpus needs --kind gpu" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


class _Tensor:
    def __init__(self, name: str, data: np.ndarray) -> None:
        self.name, self.data = name, data

    def as_numpy(self) -> np.ndarray:
        return self.data


def _fake_pb_utils() -> types.ModuleType:
    """Just enough of triton_python_backend_utils to call TritonPythonModel.execute outside a server."""
    m = types.ModuleType("triton_python_backend_utils")

    class InferenceResponse:
        def __init__(self, output_tensors: list[_Tensor] | None = None, error: Any = None) -> None:
            self.output_tensors, self.error = output_tensors or [], error

    m.Tensor = _Tensor  # type: ignore[attr-defined]
    m.InferenceResponse = InferenceResponse  # type: ignore[attr-defined]
    m.TritonError = str  # type: ignore[attr-defined]
    m.get_input_tensor_by_name = lambda req, name: req.get(name)  # type: ignore[attr-defined]
    return m


def test_python_generate_model_in_process(repo: Path, tiny_export: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    path = repo / "layerpair_generate" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("lp_triton_model_under_test", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.syspath_prepend(str(path.parent))
    model = mod.TritonPythonModel()
    config = (repo / "layerpair_generate" / "config.pbtxt").read_text()
    pc = parse_config(repo / "layerpair_generate" / "config.pbtxt")
    assert pc.backend == "python" and config
    from google.protobuf.json_format import MessageToJson

    model.initialize(
        {
            "model_repository": str(repo / "layerpair_generate"),
            "model_version": "1",
            "model_config": MessageToJson(pc, preserving_proto_field_name=True),  # as Triton passes it
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
    )
    req = {
        "PROMPT": _Tensor("PROMPT", np.array([b"Hi"], dtype=np.object_)),
        "MAX_NEW_TOKENS": _Tensor("MAX_NEW_TOKENS", np.array([5], np.int32)),
    }
    bad = {"PROMPT": req["PROMPT"], "MAX_NEW_TOKENS": _Tensor("MAX_NEW_TOKENS", np.array([0], np.int32))}
    good, err = model.execute([req, bad])
    assert good.error is None and err.error is not None and "MAX_NEW_TOKENS" in err.error
    outs = {t.name: t.data for t in good.output_tensors}
    # same tokens as the generate verb's code path (chat template applied, greedy)
    from layerpair.deploy.generate import prompt_ids_from_text, stop_ids_from_tokenizer, tokenizer_from_export

    tok = tokenizer_from_export(tiny_export)
    want = generator_from_export(export_from_dir(tiny_export)).generate(
        prompt_ids_from_text(tok, "Hi"), 5, stop_ids_from_tokenizer(tok)
    )
    assert outs["TOKENS"].tolist() == want
    assert outs["TEXT"][0].decode() == tok.decode(want, skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_repo_configs_and_state_pairs(smollm2_lp_export: Path, tmp_path: Path) -> None:
    """Acceptance: SmolLM2-135M with pairs 20:24 -> a repository whose configs parse; states are real tensors."""
    repo = tmp_path / "repo"
    assert main(["triton", str(smollm2_lp_export), str(repo)]) == 0
    configs = {c.parent.name: parse_config(c) for c in repo.glob("*/config.pbtxt")}
    assert {"layerpair_onnx", "layerpair_generate"} <= set(configs)
    m = onnx.load(str(repo / "layerpair_onnx" / "1" / "model.onnx"), load_external_data=False)
    ins, outs = {i.name for i in m.graph.input}, {o.name for o in m.graph.output}
    states = configs["layerpair_onnx"].sequence_batching.state
    report = json.loads((smollm2_lp_export / "report.json").read_text())
    assert len(states) == 2 * len(report["io"]["cache_slots"])
    assert all(s.input_name in ins and s.output_name in outs for s in states)
    pairs = {tuple(p) for p in report["pairs"]}
    assert pairs == {(20, 21), (22, 23)}
    assert list(configs["layerpair_onnx"].output[0].dims) == [-1, 49152]


def test_tensorrt_plan_profiles_follow_the_engine_report(tiny_export: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "export"
    shutil.copytree(tiny_export, out)
    (out / "model.plan").write_bytes(b"not a real engine")
    report = json.loads((out / "report.json").read_text())
    report["engine"] = {"profiles": [{"name": "prefill"}]}  # an engine built with one profile lists only "0"
    (out / "report.json").write_text(json.dumps(report))
    triton_repo_from_export(out, tmp_path / "repo", TritonOptions(kind="KIND_GPU", generate_model=False))
    trt = parse_config(tmp_path / "repo" / "layerpair_trt" / "config.pbtxt")
    assert list(trt.instance_group[0].profile) == ["0"]


def test_repository_ships_the_decode_core_standalone(repo: Path) -> None:
    """client.py and the python model run the decode core from lp_runtime.py (a copy of layerpair/decode.py)
    where layerpair is not installed."""
    import subprocess

    from layerpair import decode as core

    for copy in (repo / "lp_runtime.py", repo / "layerpair_generate" / "1" / "lp_runtime.py"):
        assert copy.read_bytes() == Path(core.__file__).read_bytes()
    code = (
        "import sys; sys.modules['layerpair'] = None; sys.path.insert(0, sys.argv[1]); import client; "
        "assert client.decode.__module__ == 'lp_runtime' and 'torch' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


class _FakeTriton:
    """Records each request; its "decoder" answers token (last id * 7 + 3) % 50."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def get_model_config(self, model: str) -> dict[str, Any]:
        names = ("input_ids", "attention_mask", "position_ids", "START")
        return {"input": [{"name": n} for n in names], "output": [{"name": "logits"}]}

    def infer(self, model: str, inputs: list[Any], outputs: Any = None, **kw: Any) -> Any:
        arrays = {i.name(): np.frombuffer(i._raw_data, np.int64).reshape(i.shape()).tolist() for i in inputs}
        self.requests.append({**arrays, "logits": outputs is not None, **kw})
        logits = np.zeros((1, len(arrays["input_ids"][0]), 50), np.float32)
        logits[0, -1, (arrays["input_ids"][0][-1] * 7 + 3) % 50] = 1
        return types.SimpleNamespace(as_numpy=lambda name: logits)


@pytest.mark.parametrize("stop", [[], [22], [17]])
def test_stateful_client_requests(monkeypatch: pytest.MonkeyPatch, stop: list[int]) -> None:
    """The sequence protocol: a leading 0 in the mask for the initial zero slot, positions counting real tokens,
    start on the first request, end on the last, or one extra end-only request when a stop token comes early."""
    from layerpair.deploy import triton_client

    fake = _FakeTriton()
    monkeypatch.setattr(triton_client, "_client", lambda url: fake)
    out = triton_client.generate_stateful("url", "m", [4, 9, 2], 3, stop)
    r = fake.requests
    want = {(): [17, 22, 7], (22,): [17, 22], (17,): [17]}[tuple(stop)]
    assert out == want
    assert r[0]["input_ids"] == [[4, 9, 2]] and r[0]["attention_mask"] == [[0, 1, 1, 1]]
    assert r[0]["position_ids"] == [[0, 1, 2]] and r[0]["sequence_start"]
    assert [q["input_ids"] for q in r[1:]] == [[[t]] for t in want[: len(r) - 1]]
    assert [q["position_ids"] for q in r[1:]] == [[[3 + i]] for i in range(len(r) - 1)]
    assert [len(q["attention_mask"][0]) for q in r] == [4 + i for i in range(len(r))]
    assert [q["sequence_end"] for q in r] == [False] * (len(r) - 1) + [True]
    assert len(r) == (3 if not stop else len(want) + 1) and r[-1]["logits"] == (not stop)
    assert len({q["sequence_id"] for q in r}) == 1
