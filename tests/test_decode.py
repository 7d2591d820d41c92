"""The decode core (layerpair/decode.py): the one session factory and the one decode loop.

The loop is checked on a fake step that records what it is fed (positions, masks, tokens), so every property
is exact; that generation through it equals PyTorch is checked in tests/engine/test_runtime.py and
tests/deploy/test_generate.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from layerpair import decode as core
from layerpair.decode import Cursor, Sampling, decode, decode_n_tokens, greedy, next_token, prefill, sampler

V = 11


class FakeStep:
    """A decoder whose next token is (last input token + 1 + row) % V; the state counts cached positions."""

    def __init__(self) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, state: int) -> tuple[np.ndarray, int]:
        self.calls.append((ids.copy(), mask.copy(), pos.copy(), state))
        B, S = ids.shape
        assert mask.shape == (B, state + S)
        logits = np.zeros((B, S, V), np.float32)
        for b in range(B):
            logits[b, -1, (ids[b, -1] + 1 + b) % V] = 1.0
        return logits, state + S


def test_the_core_imports_neither_torch_nor_layerpair() -> None:
    """The Triton python model copies decode.py alone (as lp_runtime.py): numpy + onnxruntime only."""
    code = "import sys, layerpair.decode; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    tree = ast.parse(Path(core.__file__).read_text())
    tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    tops |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert tops <= {"__future__", "collections", "dataclasses", "pathlib", "tempfile", "time", "typing", "numpy"} | {
        "onnxruntime",
        "onnx_ir",
    }


def test_prefill_then_decode_feeds_positions_masks_and_tokens() -> None:
    step = FakeStep()
    ids = np.array([[0, 0, 4, 5], [1, 2, 3, 4]], np.int64)  # row 0 left-padded by 2
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int64)
    pos = np.array([[0, 0, 0, 1], [0, 1, 2, 3]], np.int64)
    toks = [t.tolist() for t, _ in decode(step, ids, 0, 3, greedy, mask, pos)]
    assert toks == [[6, 6], [7, 8], [8, 10]]
    assert len(step.calls) == 3
    _, m1, p1, s1 = step.calls[1]
    assert m1.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]] and p1.tolist() == [[2], [4]] and s1 == 4
    i2, m2, p2, _ = step.calls[2]
    assert i2.tolist() == [[7], [8]] and m2.shape == (2, 6) and p2.tolist() == [[3], [5]]


def test_default_prefill_counts_from_zero() -> None:
    step = FakeStep()
    logits, cur = prefill(step, np.array([[3, 1, 4]], np.int64), 0)
    assert step.calls[0][2].tolist() == [[0, 1, 2]] and step.calls[0][1].tolist() == [[1, 1, 1]]
    assert logits.shape == (1, 3, V) and cur.next_pos_B1.tolist() == [[3]] and cur.state == 3


def test_the_loop_is_lazy_and_stops_where_the_caller_stops() -> None:
    step = FakeStep()
    for i, _ in enumerate(decode(step, np.array([[1]], np.int64), 0, 100, greedy)):
        if i == 4:
            break
    assert len(step.calls) == 5  # no forward past the last token asked for
    assert list(decode(step, np.array([[1]], np.int64), 0, 0, greedy)) == []


def test_teacher_forcing_feeds_the_given_tokens_and_reports_the_choice() -> None:
    step = FakeStep()
    forced = iter([np.array([9]), np.array([2])])
    toks = [int(t[0]) for t, _ in decode(step, np.array([[5]], np.int64), 0, 3, greedy, feed=lambda _c: next(forced))]
    assert [int(c[0][0, 0]) for c in step.calls] == [5, 9, 2]
    assert toks == [6, 10, 3]  # what the model chose after 5, 9, 2; the feed is asked only between tokens


def test_decode_n_tokens_from_a_cursor_is_repeatable() -> None:
    """A benchmark times decode_n_tokens again and again from one prefilled cursor (cursors are immutable)."""
    step = FakeStep()
    logits, cur = prefill(step, np.array([[2, 3]], np.int64), 0)
    first = greedy(logits[:, -1])
    a = [int(t[0]) for t, _ in decode_n_tokens(step, first, cur, 4, greedy)]
    b = [int(t[0]) for t, _ in decode_n_tokens(step, first, cur, 4, greedy)]
    assert a == b == [5, 6, 7, 8] and isinstance(cur, Cursor) and cur.state == 2


def test_sampler_draws_as_next_token() -> None:
    rows = np.random.default_rng(0).standard_normal((6, V)).astype(np.float32)
    s = Sampling(temperature=0.7, top_p=0.9, seed=4)
    pick, rng = sampler(s), np.random.default_rng(4)  # one generator per sampler, seeded by the Sampling
    assert [int(pick(r[None])[0]) for r in rows] == [next_token(r, s, rng) for r in rows]
    assert sampler(None)(rows).tolist() == greedy(rows).tolist()


def test_time_decode_intervals() -> None:
    ticks = iter(range(100))
    pre, steps = core.time_decode(FakeStep(), 0, np.array([[1, 2]], np.int64), 3, clock=lambda: float(next(ticks)))
    assert pre == 1.0 and steps == [1.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import onnx
    from onnx import TensorProto, helper

    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.eye(64, dtype=np.float32).ravel())
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    path = tmp_path_factory.mktemp("core") / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("prepack", [True, False])
def test_session_factory_options(tiny_onnx: Path, prepack: bool) -> None:
    x = np.arange(64, dtype=np.float32)[None]
    for graph in (tiny_onnx, str(tiny_onnx), tiny_onnx.read_bytes()):
        s = core.session(graph, threads=1, prepack=prepack)
        so: Any = s.get_session_options()
        assert so.intra_op_num_threads == 1 and so.log_severity_level == 3
        if not prepack:
            assert so.get_session_config_entry("session.disable_prepacking") == "1"
        assert s.get_providers() == ["CPUExecutionProvider"]
        assert np.array_equal(s.run(None, {"x": x})[0], x)


def test_session_factory_in_memory_model_reads_the_callers_weights(tiny_onnx: Path) -> None:
    """An ir.Model runs on its own initializer buffers (bound by address) and is left unchanged."""
    import onnx_ir as ir

    model = ir.load(str(tiny_onnx))
    buf = np.eye(64, dtype=np.float32) * 2
    t = ir.Tensor(buf, name="w")
    model.graph.initializers["w"].const_value = t
    s = core.session(model, threads=1, prepack=False)
    assert model.graph.initializers["w"].const_value is t  # the placeholder swap is undone
    x = np.ones((1, 64), np.float32)
    assert np.array_equal(s.run(None, {"x": x})[0], 2 * x)
    buf *= 3  # ONNX Runtime reads the caller's buffer itself, not a copy
    assert np.array_equal(s.run(None, {"x": x})[0], 6 * x)
