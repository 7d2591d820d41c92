"""A real ``tritonserver`` (the one nvidia-pytriton ships: python backend only) serving the repository's
python-backend generation model on 127.0.0.1, a real HTTP client, real text; no process left behind.

The server comes from ``LAYERPAIR_TRITONSERVER_DIR`` (a ``.../pytriton/tritonserver`` directory) or from an
installed ``nvidia-pytriton==0.7.0``. Install it without its dependencies (it pins numpy<2, which this project
does not use): ``pip install --no-deps nvidia-pytriton==0.7.0``. Three quirks of that build, handled here:

* its python stub links ``libpython3.X.so``: LD_LIBRARY_PATH must name *this* interpreter's LIBDIR, or the
  system's libpython is picked up;
* the stub runs an isolated interpreter that ignores PYTHONPATH (the generated model.py re-applies it);
* the stub is compiled against the numpy 1.x C ABI: under numpy 2 every tensor it hands to Python is garbled
  (int32 [1, 2, 3] arrives as [1, 1, 1], b"hello" as b"hhhhh", BYTES tensors crash the stub). The stub finds
  its interpreter through PATH (``python3``) and honours that interpreter's venv, so the fixture puts a
  ``--system-site-packages`` venv holding numpy==1.26.4 first on PATH (``LAYERPAIR_TRITON_STUB_ENV`` names a
  ready one; otherwise it is built once per session, which needs PyPI).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerpair.cli import main
from layerpair.deploy.generate import (
    export_from_dir,
    generator_from_export,
    prompt_ids_from_text,
    stop_ids_from_tokenizer,
    tokenizer_from_export,
)

MODEL = "layerpair_generate"


def tritonserver_dir() -> Path | None:
    env = os.environ.get("LAYERPAIR_TRITONSERVER_DIR")
    if env:
        return Path(env)
    # find_spec on a top-level package does not import it (pytriton's own imports need its numpy<2 pin).
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return d if (d / "bin" / "tritonserver").is_file() else None


STUB_NUMPY = "numpy==1.26.4"


def stub_env(tmp_root: Path) -> Path:
    """A venv (system site-packages visible) whose numpy is 1.x, for the stub's interpreter."""
    env = os.environ.get("LAYERPAIR_TRITON_STUB_ENV")
    if env:
        return Path(env)
    d = tmp_root / "stub-env"
    base = getattr(sys, "_base_executable", sys.executable)
    r = subprocess.run([base, "-m", "venv", "--system-site-packages", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot create the stub venv: {r.stderr.strip()[-300:]}")
    r = subprocess.run(
        [str(d / "bin" / "python"), "-m", "pip", "install", "-q", STUB_NUMPY],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot install {STUB_NUMPY} for the stub (the pytriton stub needs numpy 1.x): {r.stderr[-300:]}")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (the server and its python stubs)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(p.name) != os.getpid():
            out.append(int(p.name))
    return out


@pytest.fixture(scope="module", params=["portable", "ort-int4"])
def served_export(request: pytest.FixtureRequest, tiny_export: Path) -> Path:
    """The tiny LP export as it is, and the same checkpoint with ``--target ort --quant int4`` (ONNX Runtime's
    fused and quantized contrib ops must serve through the same python model)."""
    if request.param == "portable":
        return tiny_export
    out = tiny_export.parent / "tiny-lp-ort-int4"
    if not out.is_dir():
        argv = [str(tiny_export.parent / "tiny-llama"), "--pairs", "1-2", "--target", "ort", "--quant", "int4"]
        assert main([*argv, "--quant-block", "16", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(served_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    ts = tritonserver_dir()
    if ts is None:
        pytest.skip("no tritonserver: pip install --no-deps nvidia-pytriton==0.7.0 (or set LAYERPAIR_TRITONSERVER_DIR)")
    pytest.importorskip("tritonclient.http", reason="needs tritonclient[http]==2.73.0")
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = ts / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        pytest.skip(f"nvidia-pytriton ships no python backend stub for Python {ver}")
    root = tmp_path_factory.mktemp("tritonserver")
    repo = root / "repo"
    assert main(["triton", str(served_export), str(repo), "--kind", "cpu", "--max-new-tokens", "8"]) == 0
    # Backend directory: pytriton keeps one stub per Python version; the backend wants it next to the .so.
    backend = root / "backends" / "python"
    backend.mkdir(parents=True)
    for f in (ts / "backends" / "python").iterdir():
        (backend / f.name).symlink_to(f)
    (backend / stub.name).symlink_to(stub)  # a symlink keeps its $ORIGIN rpath to pytriton's bundled libs
    port = _free_port()
    senv = stub_env(root)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(senv / "bin"), os.environ.get("PATH", "")]),
        "LD_LIBRARY_PATH": os.pathsep.join(
            x for x in (str(sysconfig.get_config_var("LIBDIR")), os.environ.get("LD_LIBRARY_PATH", "")) if x
        ),
        "PYTHONPATH": os.pathsep.join(sysconfig.get_paths()["purelib"].split(os.pathsep)),
    }
    log = root / "server.log"
    cmd = [
        str(ts / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={root / 'backends'}",
        "--model-control-mode=explicit",  # the ONNX / TensorRT models need backends this build lacks
        f"--load-model={MODEL}",
        "--allow-grpc=false",
        "--allow-metrics=false",
        "--http-address=127.0.0.1",
        f"--http-port={port}",
        "--exit-timeout-secs=10",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"127.0.0.1:{port}"
    try:
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(url=url)
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"tritonserver exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if client.is_model_ready(MODEL):
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"tritonserver not ready after 300 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url, repo
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        # the python stubs are separate processes; they must be gone too
        deadline = time.monotonic() + 30
        while _pids_mentioning(str(root)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = _pids_mentioning(str(root))
        for pid in left:  # only processes of this test's own server (their command lines name its temp dir)
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind: {left}"


def _expected_text(tiny_export: Path, prompt: str, n: int) -> str:
    tok = tokenizer_from_export(tiny_export)
    ids = prompt_ids_from_text(tok, prompt)
    out = generator_from_export(export_from_dir(tiny_export)).generate(ids, n, stop_ids_from_tokenizer(tok))
    return str(tok.decode(out, skip_special_tokens=True))


def test_generate_over_http(server: tuple[str, Path], served_export: Path) -> None:
    from layerpair.deploy.triton_client import generate_text

    url, _ = server
    got = generate_text(url, MODEL, "Hello there", max_new_tokens=8)
    assert got == _expected_text(served_export, "Hello there", 8)
    assert got != ""


def test_client_script(server: tuple[str, Path], served_export: Path) -> None:
    url, repo = server
    r = subprocess.run(
        [
            sys.executable,
            str(repo / "client.py"),
            "--url",
            url,
            "--model",
            MODEL,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.rstrip("\n") == _expected_text(served_export, "Hi", 6)
