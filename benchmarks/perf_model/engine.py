"""Kernel list from a TensorRT engine: the layers TensorRT actually runs, each costed from the ONNX nodes it fuses.

Where an export has an engine (``layerpair-export --trt`` writes ``OUT/model.plan`` next to ``OUT/model.onnx``), the
performance model takes its GPU kernel list from the engine instead of from ONNX Runtime's optimized graph. Two
ways to read the engine's layers, in this order:

1. ``engine-inspector`` — deserialize ``model.plan`` through Polygraphy and ask TensorRT's engine inspector for
   its layer information (JSON). Deserializing needs a usable NVIDIA GPU (``gpu_status``); without one this
   step is *not run* and the reason is recorded ("engine inspection NOT run: ..."). TensorRT-RTX engines also
   need a GPU of compute capability 7.5/8.6/8.9/12.x to deserialize.
2. ``builder-layer-report`` — rebuild the engine from the same ``model.onnx`` with the same backend, strong
   typing and optimization profiles (read from the export's ``report.json``) and keep the layer report the
   TensorRT builder logs at VERBOSE when the profiling verbosity is DETAILED (Polygraphy's default, also for
   ``--trt``). This is TensorRT's own layer information for an engine built exactly like ``model.plan``, not
   for ``model.plan`` itself: the rebuilt plan's size and hash are recorded beside ``model.plan``'s (builds
   embed build IDs, so the bytes differ even when the layers do not).

Each engine layer's ``Metadata`` lists the ONNX nodes it implements (``[ONNX Layer: name]...``). A layer is costed
as one fused kernel: it reads every tensor its nodes take from outside the layer once (weights included;
a Gather on an initializer reads only the rows it returns) and writes every tensor its nodes produce that is
used outside the layer; its FLOPs are its nodes' FLOPs (``costs.node_cost``). Shapes come from the ONNX graph
(``graph.load_graph`` on ``model.onnx`` itself, fitted in batch and past length). A layer that names no ONNX node
(a Myelin data-movement kernel, a host-to-device shape copy) launches a kernel but is given no bytes: its
traffic is not in the engine's report. ``shape_call`` layers run on the host and launch nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.perf_model.costs import GATHER_OPS, META_OPS, Cost, node_cost
from benchmarks.perf_model.graph import Node, Tensor

SOURCE_INSPECTOR = "engine-inspector"
SOURCE_BUILD_REPORT = "builder-layer-report"
SOURCE_ORT = "onnxruntime-optimized-graph"
PLAN_FILE = "model.plan"  # layerpair/engine/stage.py's PLAN_FILE, repeated so that this import stays light
HOST_LAYER_TYPES = frozenset({"shape_call"})  # host-side shape programs: no kernel launch
GEMM_LAYER_TYPES = frozenset({"gemm", "MatrixMultiply", "MATRIX_MULTIPLY"})

_PROFILE = re.compile(r" \[profile (\d+)\]")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
_REPORT_LINE = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]*),.*?Metadata: ?(?P<meta>.*)$")


@dataclass(frozen=True)
class EngineLayer:
    """One layer of an engine: name, TensorRT layer type, optimization profile, the ONNX nodes it implements."""

    name: str
    type: str
    profile: int
    onnx_nodes: tuple[str, ...]

    @property
    def launches(self) -> bool:
        return self.type not in HOST_LAYER_TYPES


class _Profiles:
    """Engines list their layers profile by profile; TensorRT marks a profile > 0 with `` [profile N]`` on some of
    its layer and tensor names (not on every Myelin kernel), so a layer belongs to the last profile marked."""

    def __init__(self) -> None:
        self.current = 0

    def layer(self, name: str, ltype: str, meta: str, whole: str) -> EngineLayer:
        marks = [int(x) for x in _PROFILE.findall(whole)]
        if marks:
            self.current = max(marks)
        return EngineLayer(name, ltype.strip(), self.current, tuple(_ONNX_LAYER.findall(meta or "")))


def parse_build_report(text: str) -> list[EngineLayer]:
    """Layers of the builder's VERBOSE ``Layers:`` report (one ``Name: ..., LayerType: ..., Metadata: ...`` a line)."""
    out, prof = [], _Profiles()
    for line in text.splitlines():
        if not line.startswith("Name: "):
            continue
        m = _REPORT_LINE.match(line)
        if m is None:
            raise ValueError(f"engine layer line not understood: {line[:200]}")
        out.append(prof.layer(m["name"], m["type"], m["meta"], line))
    return out


def parse_inspector_json(text: str) -> list[EngineLayer]:
    """Layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``."""
    info = json.loads(text)
    out, prof = [], _Profiles()
    for item in info.get("Layers", []):
        if isinstance(item, str):  # ProfilingVerbosity.LAYER_NAMES_ONLY: a name, no type, no ONNX nodes
            out.append(prof.layer(item, "unknown", "", item))
        else:
            name, ltype = str(item.get("Name", "")), str(item.get("LayerType", "unknown"))
            out.append(prof.layer(name, ltype, str(item.get("Metadata", "")), json.dumps(item)))
    return out


@dataclass
class EngineKernels:
    """The kernel list of one export: its source, why an engine was or was not inspected, and the layers."""

    source: str
    plan: str | None
    layers: list[EngineLayer]
    profile: int
    notes: list[str] = field(default_factory=list)
    inspection: dict[str, Any] = field(default_factory=dict)

    def decode_layers(self) -> list[EngineLayer]:
        return [x for x in self.layers if x.profile == self.profile]

    def counts(self) -> dict[str, Any]:
        layers = self.decode_layers()
        by_type: dict[str, int] = {}
        for x in layers:
            by_type[x.type] = by_type.get(x.type, 0) + 1
        return {
            "layers": len(layers),
            "kernels": sum(x.launches for x in layers),
            "gemm": sum(x.type in GEMM_LAYER_TYPES for x in layers),
            "by_type": dict(sorted(by_type.items())),
            "without_onnx_nodes": sum(not x.onnx_nodes for x in layers),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "plan": self.plan,
            "profile": self.profile,
            "counts": self.counts() if self.layers else None,
            "inspection": self.inspection,
            "notes": self.notes,
        }


def decode_profile(report: dict[str, Any]) -> int:
    """Index of the ``decode`` optimization profile in the export's engine (0 when there is one profile)."""
    names = [p.get("name") for p in report.get("engine", {}).get("profiles", [])]
    return names.index("decode") if "decode" in names else 0


def inspect_plan(plan: Path, backend_name: str) -> tuple[list[EngineLayer] | None, str]:
    """(layers, "") from TensorRT's engine inspector on ``plan``, or (None, why not): needs a usable GPU."""
    from layerpair.engine.build import gpu_status

    usable, why = gpu_status()
    if not usable:
        return None, why
    from layerpair.engine.backend import load_backend

    backend = load_backend(backend_name)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    try:
        engine = EngineFromBytes(BytesFromPath(str(plan)))()
    except Exception as e:  # e.g. a TensorRT-RTX engine on a GPU it does not support
        return None, f"{backend.name} {backend.version} could not deserialize {plan.name} on this GPU ({e})"
    if engine is None:
        return None, f"{backend.name} {backend.version} could not deserialize {plan.name} on this GPU"
    inspector = engine.create_engine_inspector()
    text = inspector.get_engine_information(backend.trt.LayerInformationFormat.JSON)
    return parse_inspector_json(text), ""


def _polygraphy_profiles(report: dict[str, Any]) -> list[Any]:
    """The export's optimization profiles (``report.json``: engine.profiles over engine.io.inputs' dims)."""
    from polygraphy.backend.trt import Profile

    eng = report["engine"]
    out = []
    for p in eng["profiles"]:
        prof = Profile()
        for t in eng["io"]["inputs"]:
            corners = []
            for k in ("min", "opt", "max"):
                dims = {**p[k], "total_sequence": p[k]["past_sequence"] + p[k]["sequence"]}
                corners.append([dims[d] if isinstance(d, str) else int(d) for d in t["dims"]])
            prof.add(t["name"], min=corners[0], opt=corners[1], max=corners[2])
        out.append(prof)
    return out


def rebuild_layer_report(export_dir: Path, report: dict[str, Any]) -> tuple[list[EngineLayer], dict[str, Any]]:
    """Rebuild ``model.onnx``'s engine as ``--trt`` did and return the builder's layer report (no GPU needed)."""
    from layerpair.engine.backend import load_backend

    backend = load_backend(report["engine"]["backend"]["name"])
    trt = backend.trt
    from polygraphy.backend.trt import CreateConfig

    reports: list[str] = []
    errors: list[str] = []

    class Capture(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if msg.startswith("Layers:"):
                reports.append(msg)
            elif severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                errors.append(msg)

    logger = Capture()
    builder = trt.Builder(logger)
    flags = 0
    if backend.has_strongly_typed_flag:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(export_dir / "model.onnx")):
        raise RuntimeError(f"{backend.name} cannot parse {export_dir / 'model.onnx'}: {'; '.join(errors[:3])}")
    config = CreateConfig(profiles=_polygraphy_profiles(report))(builder, network)
    if config.profiling_verbosity != trt.ProfilingVerbosity.DETAILED:
        raise RuntimeError("profiling verbosity is not DETAILED: the layer report would carry no ONNX node names")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{backend.name} failed to rebuild the engine: {'; '.join(errors[:3])}")
    if not reports:
        raise RuntimeError(f"{backend.name} {backend.version} logged no layer report while building")
    data = bytes(serialized)
    facts: dict[str, Any] = {
        "backend": backend.to_json(),
        "rebuilt_plan_bytes": len(data),
        "rebuilt_plan_sha256": hashlib.sha256(data).hexdigest(),
    }
    plan = export_dir / PLAN_FILE
    if plan.exists():
        pdata = plan.read_bytes()
        facts["plan_bytes"] = len(pdata)
        facts["plan_sha256"] = hashlib.sha256(pdata).hexdigest()
        facts["same_size_as_plan"] = len(pdata) == len(data)
        facts["byte_identical_to_plan"] = pdata == data
    return parse_build_report(reports[-1]), facts


def engine_kernels(
    export_dir: Path, say: Callable[[str], None] | None = None, rebuild: bool = True
) -> EngineKernels | None:
    """The engine's kernel list for an export directory, or None when it has no engine (``model.plan``).

    Tries the engine inspector first; where it cannot run, says "engine inspection NOT run: <why>" and, with
    ``rebuild``, reads the builder's layer report of a rebuild instead.
    """
    plan = export_dir / PLAN_FILE
    if not plan.exists():
        return None
    say = say or (lambda msg: print(msg, file=sys.stderr))
    report = json.loads((export_dir / "report.json").read_text())
    backend_name = report["engine"]["backend"]["name"]
    profile = decode_profile(report)
    layers, why = inspect_plan(plan, backend_name)
    if layers is not None:
        say(f"{export_dir.name}: {len(layers)} engine layers from TensorRT's engine inspector ({plan})")
        return EngineKernels(SOURCE_INSPECTOR, str(plan), layers, profile, inspection={"ran": True})
    say(f"{export_dir.name}: engine inspection NOT run: {why}")
    inspection = {"ran": False, "reason": why}
    if not rebuild:
        return EngineKernels(SOURCE_ORT, str(plan), [], profile, [f"engine inspection NOT run: {why}"], inspection)
    try:
        layers, facts = rebuild_layer_report(export_dir, report)
    except Exception as e:  # no TensorRT here, or the rebuild failed: the ONNX Runtime graph stays the list
        note = f"engine inspection NOT run: {why}; the builder's layer report could not be read either ({e})"
        say(f"{export_dir.name}: {note}")
        return EngineKernels(SOURCE_ORT, str(plan), [], profile, [note], inspection)
    note = (
        f"engine inspection NOT run: {why}; kernel list = the TensorRT builder's layer report of a rebuild of "
        f"model.onnx with the export's backend and profiles (rebuilt plan {facts['rebuilt_plan_bytes']} bytes, "
        f"model.plan {facts.get('plan_bytes')} bytes; byte-identical: {facts.get('byte_identical_to_plan')})"
    )
    say(f"{export_dir.name}: {note}")
    return EngineKernels(SOURCE_BUILD_REPORT, str(plan), layers, profile, [note], {**inspection, "rebuild": facts})


def _gathered(n: Node, t: Tensor) -> bool:
    return n.op in GATHER_OPS and bool(n.inputs) and n.inputs[0] is t and t.initializer


class EngineCosts:
    """Per-kernel costs of an engine's decode-profile layers at any (B, T), from the ONNX graph's fitted shapes."""

    def __init__(self, kernels: EngineKernels, onnx_nodes: Sequence[Node], graph_outputs: Sequence[str]) -> None:
        self.kernels = kernels
        self.layers = kernels.decode_layers()
        by_name = {n.name: n for n in onnx_nodes}
        named = [name for x in self.layers for name in x.onnx_nodes]
        self.unknown = sorted({name for name in named if name not in by_name})
        if self.unknown:
            raise ValueError(f"engine layers name ONNX nodes that model.onnx does not have: {self.unknown[:5]}")
        where: dict[str, list[int]] = {}
        for i, x in enumerate(self.layers):
            for name in dict.fromkeys(x.onnx_nodes):
                where.setdefault(name, []).append(i)
        # An ONNX node named by several kernels (a GEMM and the data-movement kernels that prepare its operands,
        # e.g. Myelin's MoveReplConc for grouped-query attention): its FLOPs go to the GEMM kernel(s), or are
        # split evenly if none is a GEMM; each kernel still reads the node's inputs and writes its outputs.
        self.shared_nodes = sorted(name for name, ix in where.items() if len(ix) > 1)
        self._share: dict[tuple[int, str], float] = {}
        for name, ix in where.items():
            gemms = [i for i in ix if self.layers[i].type in GEMM_LAYER_TYPES] or ix
            for i in ix:
                self._share[(i, name)] = 1.0 / len(gemms) if i in gemms else 0.0
        self.members = [[by_name[name] for name in dict.fromkeys(x.onnx_nodes)] for x in self.layers]
        self.uncovered = [n for n in onnx_nodes if n.name not in set(named)]
        consumers: dict[str, set[str]] = {}
        for n in onnx_nodes:
            if n.op in META_OPS:  # reads only the shape: no data leaves the producing kernel for it
                continue
            for t in n.inputs:
                consumers.setdefault(t.name, set()).add(n.name)
        self._consumers = consumers
        self._outputs = set(graph_outputs)

    def layer_cost(self, i: int, b: int, p: int) -> Cost:
        layer, members = self.layers[i], self.members[i]
        names = {n.name for n in members}
        produced = {t.name for n in members for t in n.outputs}
        read = weight = 0
        seen: set[str] = set()
        flops = 0.0
        for n in members:
            flops += self._share[(i, n.name)] * node_cost(n, b, p).flops
            for t in n.inputs:
                if t.name in produced or t.name in seen:
                    continue
                seen.add(t.name)
                nbytes = n.outputs[0].nbytes(b, p) if _gathered(n, t) else t.nbytes(b, p)
                read += nbytes
                weight += nbytes if t.initializer else 0
        write = 0
        for n in members:
            for t in n.outputs:
                if t.name in self._outputs or self._consumers.get(t.name, set()) - names:
                    write += t.nbytes(b, p)
        return Cost(layer.type, read, write, weight, flops, layer.launches)

    def costs(self, b: int, p: int) -> list[Cost]:
        return [self.layer_cost(i, b, p) for i in range(len(self.layers))]

    def coverage(self, b: int, p: int) -> dict[str, Any]:
        """ONNX nodes no engine layer names, and the bytes and FLOPs they would cost as separate nodes."""
        left = [node_cost(n, b, p) for n in self.uncovered]
        ops: dict[str, int] = {}
        for n in self.uncovered:
            ops[n.op] = ops.get(n.op, 0) + 1
        return {
            "onnx_nodes_not_in_any_layer": len(self.uncovered),
            "their_ops": dict(sorted(ops.items())),
            "their_bytes_as_separate_nodes": sum(c.traffic for c in left),
            "their_flops": sum(c.flops for c in left),
            "onnx_nodes_in_several_layers": len(self.shared_nodes),
        }
