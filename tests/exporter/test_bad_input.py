"""Every bad input: exit code, one-line message naming problem and fix, and an untouched output location."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers as tf

from layerpair.cli import main
from layerpair.exporter import loading


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], code: int, *needles: str) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert line.startswith("error: ") and " — " in line, err  # problem — fix
    for n in needles:
        assert n in line, line
    return line


def test_missing_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    _fails(capsys, [str(tmp_path / "nope" / "model.gguf"), "-o", str(out)], 2, "not found")
    assert not out.exists()


def test_corrupt_gguf(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    out = tmp_path / "out"
    _fails(capsys, [str(bad), "-o", str(out)], 2, "broken.gguf")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_corrupt_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", ')
    _fails(capsys, [str(d), "-o", str(tmp_path / "out")], 2, "config.json")
    assert not (tmp_path / "out").exists()


def test_missing_weights(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "ckpt"
    tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=4).save_pretrained(d)
    _fails(capsys, [str(d), "-o", str(tmp_path / "out")], 2, "cannot load the weights")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    _fails(capsys, [str(f), "-o", str(tmp_path / "out")], 2, "not a .gguf")


def test_unsupported_architecture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = tmp_path / "gpt2"
    tf.GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(d)
    line = _fails(capsys, [str(d), "-o", str(tmp_path / "out")], 2, "gpt2", "llama", "mistral", "qwen2", "qwen3")
    assert "supported" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["20:23", "3-5", "a-b", "1-2,2-3"])
def test_bad_pair_spec_fails_before_loading(capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str) -> None:
    # The model path does not even exist: syntax errors must be reported before any loading.
    _fails(
        capsys,
        ["does-not-matter/none", "--pairs", spec, "-o", str(tmp_path / "out")],
        2,
        "--pairs" if spec == "a-b" else "",
    )
    assert not (tmp_path / "out").exists()


def test_pair_out_of_range_after_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    out = tmp_path / "deep" / "out"
    _fails(capsys, [str(tiny_checkpoints["llama"]), "--pairs", "2:6", "-o", str(out)], 2, "out of range", "4 layers")
    assert not out.exists() and not (tmp_path / "deep").exists()  # created parents removed too


def test_existing_output_refused_then_forced(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(capsys, [str(tiny_checkpoints["llama"]), "-o", str(out)], 2, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert main([str(tiny_checkpoints["llama"]), "-o", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and json.loads((out / "report.json").read_text())["depth"] == 4


def test_unwritable_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["smollm2-135m", "-o", str(blocker / "out")], 2, "not a directory")
    assert blocker.read_text() == "x"


def test_hub_id_without_network(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _fails(capsys, ["someorg/some-model", "-o", str(tmp_path / "out")], 2, "someorg/some-model", "Hugging Face Hub")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pairs", ["none", "1:3"])
def test_validation_failure_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoints: dict[str, Path], pairs: str
) -> None:
    """An impossible tolerance forces the real failure path: exit 3, nothing written — also with pairs, where the
    unmerged graph fails its in-memory validation while the merged one is being written by another thread."""
    out = tmp_path / "out"
    args = [str(tiny_checkpoints["llama"]), "--pairs", pairs, "-o", str(out), "--atol", "1e-30"]
    _fails(capsys, args, 3, "disagrees")
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("atol", ["-1", "0", "inf", "nan"])
def test_bad_atol(capsys: pytest.CaptureFixture[str], tmp_path: Path, atol: str) -> None:
    _fails(capsys, ["smollm2-135m", "-o", str(tmp_path / "out"), "--atol", atol], 2, "--atol")


def _tiny_dir(tmp_path: Path, **kw: object) -> Path:
    from tests.conftest import tiny_model

    d = tmp_path / "ckpt"
    tiny_model("llama").save_pretrained(d, **kw)
    return d


def test_truncated_safetensors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = _tiny_dir(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _fails(capsys, [str(d), "-o", str(tmp_path / "out")], 2, "model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_missing_shard(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    d = _tiny_dir(tmp_path, max_shard_size="50KB")
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").is_file()
    shards[1].unlink()
    _fails(capsys, [str(d), "-o", str(tmp_path / "out")], 2, "shard", shards[1].name)
    assert not (tmp_path / "out").exists()


def test_non_finite_weight_is_an_input_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """One NaN in one weight: named at load, exit 2, nothing written (it used to export with max_abs 0)."""
    import torch

    from tests.conftest import tiny_model

    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[3].self_attn.o_proj.weight[5, 7] = float("nan")
    m.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    _fails(capsys, [str(tmp_path / "ckpt"), "-o", str(out)], 2, "model.layers.3.self_attn.o_proj.weight", "non-finite")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_gguf_tensor_count_disagrees(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A GGUF whose header promises more tensors than the file holds."""
    import gguf
    import numpy as np

    f = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(f), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    raw = bytearray(f.read_bytes())
    raw[8:16] = (5).to_bytes(8, "little")  # header: magic, version, tensor count (uint64)
    f.write_bytes(bytes(raw))
    _fails(capsys, [str(f), "-o", str(tmp_path / "out")], 2, "bad.gguf")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pairs", ["none", "1:3"])
def test_disk_full_while_writing_weights(tmp_path: Path, pairs: str) -> None:
    """Writing model.onnx.data past a file-size limit (EFBIG, as a full disk gives ENOSPC): one error line, exit 2,
    no output and no temporary directory left (with pairs the merged model is written by a thread, whose error
    must surface the same way)."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    d = _tiny_dir(tmp_path)
    out = tmp_path / "out"
    limit = 64 * 1024  # the tiny model's weights are ~400 KB

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(
        [sys.executable, "-m", "layerpair.cli", str(d), "--pairs", pairs, "-o", str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        timeout=300,
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: no space left while writing"), r.stderr[-2000:]
    assert "model.onnx.data" in last and " — " in last
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_numpy_short_write_is_a_full_disk(tmp_path: Path) -> None:
    """onnx_ir writes large tensors with numpy's ``tofile``, whose short write on a full disk carries no errno
    ("N requested and M written"): it must still become the one-line OutputError, not a traceback."""
    import subprocess
    import sys

    code = (
        "import resource, signal, numpy as np\n"
        "from layerpair.errors import disk_full_as_output_error, OutputError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "try:\n"
        f"    with disk_full_as_output_error('w.bin'), open({str(tmp_path / 'w.bin')!r}, 'wb') as f:\n"
        "        np.zeros(1 << 20, np.float32).tofile(f)\n"
        "except OutputError as e:\n"
        "    print('OutputError:', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("OutputError: no space left while writing w.bin"), r.stderr
