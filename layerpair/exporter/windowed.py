"""Window-by-window validation: for models whose PyTorch copy and ONNX Runtime session cannot both fit in memory.

The whole-graph check (validate.py) holds the fp32 PyTorch model and an ONNX Runtime session of the same size; a
7-8B model is 32 GB in fp32. Here the *real* ``model.onnx`` is cut along its residual stream into windows of
consecutive blocks (``window_model``: the nodes between two residual values, written next to the model so they
read the same ``model.onnx.data``), and each window runs in ONNX Runtime against the same blocks of the PyTorch
decoder, whose weights are read from the checkpoint for that window only and released after it::

    window 0:   input_ids ... -> embeddings -> blocks [0, k)   -> residual R_k   (+ presents of those layers)
    window j:   R_a (PyTorch's)  -> blocks [a, b)               -> residual R_b   (+ presents)
    head:       R_L (PyTorch's)  -> final norm, LM head        -> logits          (its own window: the largest)

Every window gets PyTorch's input, so each window's error is its own (no accumulation hides a small bug or lets
it grow into a false alarm). Steps: a prefill of the validation prompt, two decode steps and a 5-token chunk,
each through the runtime's own cache (ONNX Runtime's presents back into ONNX Runtime). Inputs are the prompt's own
next tokens (teacher forcing), so every window can run every step without the final logits.

Tolerance (fp32): hidden states and caches ``max_abs <= atol * max(1, max|reference|)`` (normwise: residual
streams grow to O(100) in late layers), logits ``max_abs <= atol`` as in the whole-graph check. A NaN or inf in
either runtime fails (numpy's max propagates NaN; comparisons are written ``not err <= tol``).

Residual values are found structurally, not by name (the graph passes rename what they rewrite): a value read by
an ``Add`` and by an RMSNorm (``Pow``, or ``Cast`` then ``Pow`` in 16-bit graphs) is the residual stream; in
topological order they alternate x (block input) and h (after attention), two per block, and the stream ends at
the last norm's input (the final norm, read by no residual Add).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from layerpair.errors import ValidationError
from layerpair.exporter.validate import ort_session, worse
from layerpair.meter import return_freed_memory


def residual_values(graph: onnx.GraphProto) -> list[str]:
    """Names of the residual-stream values in topological order: x_0, h_0, x_1, h_1, ..., and last x_L, the
    final norm's input."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def feeds_pow(name: str) -> bool:
        for c in consumers.get(name, []):
            after_cast = consumers.get(c.output[0], []) if c.op_type == "Cast" else []
            if c.op_type == "Pow" or any(d.op_type == "Pow" for d in after_cast):
                return True
        return False

    out, last_norm_input = [], None
    for n in graph.node:
        for o in n.output:
            if feeds_pow(o):
                last_norm_input = o
                if any(c.op_type == "Add" for c in consumers.get(o, [])):
                    out.append(o)
    # the final norm's input ends the stream (read by the norm only, not by a residual Add)
    return out + ([last_norm_input] if last_norm_input is not None and last_norm_input not in out else [])


def window_model(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """The nodes that compute ``outputs`` from ``inputs`` (and the graph inputs and initializers they read).

    Initializers keep their external-data references: saved next to the original, the window reads the same file.
    """
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    stop = set(inputs) | {i.name for i in g.input} | {t.name for t in g.initializer}
    keep: set[int] = set()
    stack = list(outputs)
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v in seen or v in stop or v not in producer:
            continue
        seen.add(v)
        n = producer[v]
        keep.add(id(n))
        stack.extend(i for i in n.input if i)
    nodes = [n for n in g.node if id(n) in keep]
    used = {i for n in nodes for i in n.input} | set(outputs)
    infos = {v.name: v for v in [*g.value_info, *g.input, *g.output]}
    missing = [v for v in [*inputs, *outputs] if v not in infos]
    if missing:
        raise ValidationError(f"window boundary {missing[0]} has no type in the graph", "report this model as a bug")
    graph = onnx.helper.make_graph(
        nodes,
        "window",
        [infos[v] for v in inputs] + [i for i in g.input if i.name in used and i.name not in inputs],
        [infos[v] for v in outputs],
        initializer=[t for t in g.initializer if t.name in used],
    )
    return onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)


@dataclass
class WindowError:
    """Worst normwise errors of one window over all steps."""

    blocks: tuple[int, int]
    logits_normwise: bool = False  # 16-bit graphs: logits too relative to the reference's largest
    hidden_max_abs: float = 0.0
    hidden_ref_max: float = 0.0
    cache_max_abs: float = 0.0
    cache_ref_max: float = 0.0
    logits_max_abs: float | None = None
    failures: list[str] = field(default_factory=list)

    def check(self, what: str, ours: np.ndarray, ref: np.ndarray, atol: float, step: str) -> float:
        err = float(np.max(np.abs(ours.astype(np.float64) - ref.astype(np.float64)))) if ours.size else 0.0
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        if what == "logits":
            self.logits_max_abs = err if worse(err, self.logits_max_abs or 0.0) else self.logits_max_abs
            scale = scale if self.logits_normwise else 1.0
        elif what == "hidden":
            self.hidden_max_abs = err if worse(err, self.hidden_max_abs) else self.hidden_max_abs
            self.hidden_ref_max = max(self.hidden_ref_max, scale)
        else:
            self.cache_max_abs = err if worse(err, self.cache_max_abs) else self.cache_max_abs
            self.cache_ref_max = max(self.cache_ref_max, scale)
        if not err <= atol * scale:
            self.failures.append(f"blocks {self.blocks}: {what} ({step}) max_abs {err:.3g} > {atol * scale:.3g}")
        return err

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "failures"} | {"passed": not self.failures}

    def summary(self) -> str:
        out = f"hidden max_abs {self.hidden_max_abs:.2e}, cache {self.cache_max_abs:.2e}"
        return out + (f", logits {self.logits_max_abs:.2e}" if self.logits_max_abs is not None else "")


def window_plan(blocks: Sequence[Sequence[int]], block_bytes: Sequence[int], budget_bytes: int) -> list[range]:
    """Consecutive block ranges whose fp32 weights stay under ``budget_bytes`` (at least one block each)."""
    plan: list[range] = []
    start, size = 0, 0
    for k, b in enumerate(block_bytes):
        if k > start and size + b > budget_bytes:
            plan.append(range(start, k))
            start, size = k, 0
        size += b
    plan.append(range(start, len(blocks)))
    return plan


def save_window(model: onnx.ModelProto, directory: Path, tag: str) -> Path:
    path = directory / f".window-{tag}-{os.getpid()}.onnx"
    onnx.save(model, str(path))
    return path


# ---- running the windows -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One call of both runtimes: new tokens ``ids`` [1,S] after ``past`` cached positions (teacher-forced)."""

    name: str
    ids: np.ndarray
    past: int

    @property
    def mask(self) -> np.ndarray:
        return np.ones((1, self.past + self.ids.shape[1]), np.int64)

    @property
    def pos(self) -> np.ndarray:
        return np.arange(self.past, self.past + self.ids.shape[1], dtype=np.int64)[None]


def window_steps(tokens: Sequence[int]) -> list[Step]:
    """Prefill, two decode steps and a 5-token chunk over ``tokens`` (>= 23 of them)."""
    S = len(tokens) - 7
    t = np.asarray(tokens, np.int64)[None]
    return [
        Step("prefill", t[:, :S], 0),
        Step("decode 1", t[:, S : S + 1], S),
        Step("decode 2", t[:, S + 1 : S + 2], S + 1),
        Step("chunk of 5", t[:, S + 2 : S + 7], S + 2),
    ]


class TorchWindows:
    """The PyTorch decoder run window by window: a skeleton whose window's weights are read from the checkpoint
    (``source``) when the window starts and dropped back to meta tensors when it ends."""

    def __init__(self, skeleton: Any, source: Any, steps: Sequence[Step]) -> None:
        import torch

        self.dec, self.source, self.steps = skeleton, source, steps
        a = skeleton.arch
        self.x: list[Any] = [None] * len(steps)  # residual entering the current window, per step
        empty = torch.zeros(1, a.num_kv_heads, 0, a.head_dim)
        self.cache: list[Any] = [empty] * (2 * a.num_layers)  # per layer K, V: PyTorch's own cache

    def _names(self, blocks: Sequence[Sequence[int]], first: bool, last: bool) -> list[str]:
        layers = {i for b in blocks for i in b}
        names = [
            n for n, _ in self.dec.named_parameters() if n.startswith("layers.") and int(n.split(".")[1]) in layers
        ]
        names += ["embed_tokens"] if first or (last and self.dec.lm_head is None) else []
        return names + (["norm.weight"] + (["lm_head"] if self.dec.lm_head is not None else []) if last else [])

    def _set(self, names: Sequence[str], real: bool) -> None:
        import torch

        params = dict(self.dec.named_parameters())
        for n in names:
            old = params[n]
            self.dec.set_parameter(n, self.source(n) if real else torch.empty_like(old, device="meta"))

    def run(self, blocks: Sequence[Sequence[int]], first: bool, last: bool) -> list[tuple[Any, dict[int, Any]]]:
        """(window output per step — residual, or logits for the last window —, presents per layer)."""
        import torch

        names = self._names(blocks, first, last)
        self._set(names, True)
        out = []
        with torch.no_grad():
            for k, st in enumerate(self.steps):
                x = (
                    torch.nn.functional.embedding(torch.from_numpy(st.ids), self.dec.embed_tokens)
                    if first
                    else self.x[k]
                )
                ctx = self.dec.step_context(torch.from_numpy(st.mask), torch.from_numpy(st.pos), x.dtype, self.cache)
                for b in blocks:
                    x = self.dec.run_block(b, x, ctx)
                for i, (key, val) in ctx.presents.items():
                    self.cache[2 * i], self.cache[2 * i + 1] = key, val
                out.append((self.dec.logits(x) if last else x, dict(ctx.presents)))
                self.x[k] = x
        self._set(names, False)
        return out


def block_bytes(skeleton: Any) -> list[int]:
    """fp32 bytes of each block's weights (what PyTorch and ONNX Runtime each hold for it)."""
    per_layer = [4 * sum(p.numel() for p in layer.parameters()) for layer in skeleton.layers]
    return [sum(per_layer[i] for i in b) for b in skeleton.blocks]


@dataclass
class _OrtWindow:
    """One window of the real graph in ONNX Runtime, with the slots (and so the cache) it owns."""

    session: Any
    inputs: list[str]
    outputs: list[str]
    slots: list[Any]

    def step(self, st: Step, x_in: Any, cache: dict[str, np.ndarray]) -> list[np.ndarray]:
        feeds: dict[str, Any] = {"input_ids": st.ids, "attention_mask": st.mask, "position_ids": st.pos}
        if x_in is not None:  # PyTorch's fp32 residual, in the graph's dtype (fp16 graphs read fp16)
            typ = next(i.type for i in self.session.get_inputs() if i.name == self.inputs[0])
            feeds[self.inputs[0]] = x_in.numpy().astype(np.float16 if typ == "tensor(float16)" else np.float32)
        feeds.update(cache)
        declared = {i.name for i in self.session.get_inputs()}
        res = self.session.run(self.outputs, {k: v for k, v in feeds.items() if k in declared})
        for s, k, v in zip(self.slots, res[1::2], res[2::2], strict=True):
            cache[s.past_key], cache[s.past_value] = k, v
        return list(res)


def _open_window(
    proto: onnx.ModelProto, path: Path, residual: list[str], spec: Any, blocks: Sequence[Sequence[int]], r: range
) -> tuple[_OrtWindow, Path]:
    # residual[2k] enters block k; residual[-1] (the final norm's input) enters the head
    cut = [*residual[0::2], residual[-1]]
    head = r.start == len(blocks)
    layers = {i for k in r for i in blocks[k]}
    slots = [s for s in spec.slots if s.layers[0] in layers]
    ins = [] if r.start == 0 else [cut[r.start]]
    outs = ["logits"] if head else [cut[r.stop], *(n for s in slots for n in (s.present_key, s.present_value))]
    wpath = save_window(window_model(proto, ins, outs), path.parent, str(r.start))
    return _OrtWindow(ort_session(wpath, prepack=False), ins, outs, slots), wpath


def _compare_window(
    err: WindowError, w: _OrtWindow, st: Step, res: list[np.ndarray], ref: tuple[Any, dict[int, Any]], atol: float
) -> None:
    err.check("logits" if w.outputs[0] == "logits" else "hidden", res[0], ref[0].float().numpy(), atol, st.name)
    res = [r.astype(np.float32) for r in res]
    for s, k, v in zip(w.slots, res[1::2], res[2::2], strict=True):
        kvh = k.shape[1] // len(s.layers)
        for j, layer in enumerate(s.layers):  # a merged slot holds layer a's heads, then layer b's
            rk, rv = ref[1][layer]
            err.check("cache", k[:, j * kvh : (j + 1) * kvh], rk.numpy(), atol, f"{st.name}, layer {layer} key")
            err.check("cache", v[:, j * kvh : (j + 1) * kvh], rv.numpy(), atol, f"{st.name}, layer {layer} value")


def validate_windowed(
    path: Path, spec: Any, skeleton: Any, source: Any, tokens: Sequence[int], atol: float, budget: int, say: Any
) -> dict[str, Any]:
    """Run every window of ``path`` against the PyTorch blocks; raise ValidationError on any failure."""
    proto = onnx.load(str(path), load_external_data=False)
    residual, blocks = residual_values(proto.graph), skeleton.blocks
    if len(residual) != 2 * len(blocks) + 1:
        raise ValidationError(
            f"found {len(residual)} residual-stream values in {path.name}, expected {2 * len(blocks) + 1}",
            "the graph's structure is not the exporter's; report this model as a bug",
        )
    steps = window_steps(tokens)
    torch_w = TorchWindows(skeleton, source, steps)
    D = spec.arch.head_dim
    dt = np.float16 if spec.dtype == "float16" else np.float32
    cache = {n: np.zeros((1, s.num_kv_heads, 0, D), dt) for s in spec.slots for n in (s.past_key, s.past_value)}
    windows = []
    n = len(blocks)  # the head (final norm, LM head) is a window of its own: its weights can be the largest
    for r in [*window_plan(blocks, block_bytes(skeleton), budget), range(n, n)]:
        # PyTorch first, its weights dropped (and the heap trimmed) before ONNX Runtime maps the window's: the
        # two never hold a window at once, so the peak is the larger of them, not their sum (the head of an 8B
        # model is 2 GB in fp32, and a 16-bit graph's session adds its fp32 casts).
        x_in = list(torch_w.x)
        ref = torch_w.run([blocks[k] for k in r], r.start == 0, r.start == n)
        return_freed_memory()
        w, wpath = _open_window(proto, path, residual, spec, blocks, r)
        try:
            err = WindowError((r.start, r.stop), logits_normwise=spec.dtype != "float32")
            for k, st in enumerate(steps):
                _compare_window(err, w, st, w.step(st, None if r.start == 0 else x_in[k], cache), ref[k], atol)
        finally:
            del w
            wpath.unlink(missing_ok=True)
            return_freed_memory()
        windows.append(err)
        where = "head (final norm, LM head)" if r.start == n else f"blocks {r.start}-{r.stop - 1} of {n}"
        say(f"window: {where}: {err.summary()}")
    bad = [f for e in windows for f in e.failures]
    if bad:
        raise ValidationError("window validation failed: " + "; ".join(bad[:4]), "nothing was written; report it")
    return {"mode": "windowed", "steps": [s.name for s in steps], "windows": [e.to_json() for e in windows]}
