"""``engine_from_onnx``: OUT/model.onnx -> OUT/model.plan through Polygraphy's loaders.

    NetworkFromOnnxPath(strongly_typed) -> bindings check vs IOSpec -> CreateConfig(profiles)
        -> EngineBytesFromNetwork -> SaveBytes

Strongly typed: the ONNX graph already carries the precision (``--dtype``), including the fp32 islands for
RMSNorm and softmax, and TensorRT must keep it rather than pick per-layer precisions itself. TensorRT-RTX
builds ahead of time on the CPU (kernels are specialised at first run), so the build needs no GPU; loading
the engine (``deserialize_cuda_engine``) does, which is why the bindings are checked on the parsed network —
the engine's I/O tensors are exactly the network's — and additionally on the engine where a GPU exists.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerpair.engine.backend import Backend
from layerpair.engine.profile import ProfileSpec
from layerpair.errors import LayerpairError
from layerpair.iospec import IOSpec, TensorSpec

# TensorRT DataType member name -> numpy-style name used by the I/O spec.
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
    "FP8": "float8e4m3",
}


class EngineBuildError(LayerpairError):
    """TensorRT could not parse or build the graph."""

    exit_code = 4


@dataclass(frozen=True)
class Binding:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for dynamic dims
    is_input: bool


def _dtype_name(dt: Any) -> str:
    return TRT_DTYPES.get(getattr(dt, "name", str(dt)).upper(), str(dt))


def bindings_from_network(network: Any) -> list[Binding]:
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    return [Binding(t.name, _dtype_name(t.dtype), tuple(t.shape), t in ins) for t in [*ins, *outs]]


def bindings_from_engine(engine: Any, trt: Any) -> list[Binding]:
    out = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        out.append(
            Binding(name, _dtype_name(engine.get_tensor_dtype(name)), tuple(engine.get_tensor_shape(name)), is_input)
        )
    return out


def check_bindings(bindings: list[Binding], spec: IOSpec) -> list[str]:
    """Mismatches between engine/network I/O and the spec: names (and order, inputs and outputs separately),
    direction, dtype, rank, static sizes (symbolic dims must be dynamic, -1). Empty when they agree."""
    problems: list[str] = []

    def compare(kind: str, got: list[Binding], want: list[TensorSpec]) -> None:
        got_names, want_names = [b.name for b in got], [t.name for t in want]
        if sorted(got_names) != sorted(want_names):
            missing = sorted(set(want_names) - set(got_names))
            extra = sorted(set(got_names) - set(want_names))
            problems.append(f"{kind}: missing {missing}, unexpected {extra}")
        elif got_names != want_names:
            problems.append(f"{kind}: order {got_names} != spec order {want_names}")
        by_name = {b.name: b for b in got}
        for t in want:
            b = by_name.get(t.name)
            if b is None:
                continue
            if b.dtype != t.dtype:
                problems.append(f"{t.name}: dtype {b.dtype} != spec {t.dtype}")
            if len(b.shape) != len(t.dims):
                problems.append(f"{t.name}: rank {len(b.shape)} != spec {len(t.dims)}")
                continue
            for axis, (n, d) in enumerate(zip(b.shape, t.dims, strict=True)):
                if isinstance(d, int) and n != d:
                    problems.append(f"{t.name}: axis {axis} is {n}, spec says {d}")
                if isinstance(d, str) and n != -1:
                    problems.append(f"{t.name}: axis {axis} ({d}) is fixed to {n}, spec says dynamic")

    compare("inputs", [b for b in bindings if b.is_input], spec.inputs)
    compare("outputs", [b for b in bindings if not b.is_input], spec.outputs)
    return problems


def gpu_status() -> tuple[bool, str]:
    """(usable, why not): asks the CUDA driver directly, so it needs neither torch nor cuda-python."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    if cuda.cuInit(0) != 0:
        return False, "the NVIDIA driver is present but cuInit failed (no usable GPU)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return False, "the NVIDIA driver reports no GPU"
    return True, ""


@dataclass
class EngineBuild:
    backend: dict[str, str]
    plan: str
    dtype: str
    build_s: float
    engine_bytes: int
    limits: dict[str, int]
    profiles: list[dict[str, object]]
    io: dict[str, object]
    bindings_checked_on: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def _profiles_for_polygraphy(profiles: list[ProfileSpec], spec: IOSpec) -> list[Any]:
    from polygraphy.backend.trt import Profile

    out = []
    for p in profiles:
        prof = Profile()
        for name, (lo, opt, hi) in p.shapes(spec).items():
            prof.add(name, min=list(lo), opt=list(opt), max=list(hi))
        out.append(prof)
    return out


def engine_from_onnx(
    onnx_path: Path,
    spec: IOSpec,
    plan_path: Path,
    profiles: list[ProfileSpec],
    backend: Backend,
    limits: dict[str, int] | None = None,
) -> EngineBuild:
    """Parse, check I/O against ``spec``, build with ``profiles``, write ``plan_path``."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # our progress lines say what happens; keep TensorRT's errors
    build_s = _build_plan(onnx_path, spec, plan_path, profiles, backend)
    nbytes = plan_path.stat().st_size
    checked = ["network"]
    usable, _ = gpu_status()
    if usable:
        problems = check_bindings(bindings_from_engine(load_engine(plan_path, backend), backend.trt), spec)
        if problems:
            raise EngineBuildError(
                "the engine's bindings do not match the I/O spec: " + "; ".join(problems[:5]),
                "this is a bug in the export; report the model and flags",
            )
        checked.append("engine")
    return EngineBuild(
        backend=backend.to_json(),
        plan=plan_path.name,
        dtype=spec.dtype,
        build_s=round(build_s, 3),
        engine_bytes=nbytes,
        limits=dict(limits or {}),
        profiles=[p.to_json() for p in profiles],
        io=spec.to_json(),
        bindings_checked_on=checked,
    )


def _build_plan(onnx_path: Path, spec: IOSpec, plan_path: Path, profiles: list[ProfileSpec], backend: Backend) -> float:
    """Parse ``onnx_path``, check the network's I/O against ``spec``, build and write ``plan_path``; returns the
    parse + build seconds (the write not included). The builder, network and serialized engine are local here,
    so they are freed before ``engine_from_onnx`` loads the plan again to check its bindings."""
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    t = time.perf_counter()
    typed = True if backend.has_strongly_typed_flag else None
    try:
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=typed)()
    except Exception as e:  # Polygraphy raises PolygraphyException after logging the parser's errors
        raise EngineBuildError(
            f"{backend.name} {backend.version} cannot parse {onnx_path.name} ({e})",
            "the log above names the node; report the model and flags",
        ) from None
    problems = check_bindings(bindings_from_network(network), spec)
    if problems:
        raise EngineBuildError(
            "the TensorRT network's I/O does not match the I/O spec: " + "; ".join(problems[:5]),
            "this is a bug in the export; report the model and flags",
        )
    config = CreateConfig(profiles=_profiles_for_polygraphy(profiles, spec))
    try:
        serialized = EngineBytesFromNetwork((builder, network, parser), config=config)()
    except Exception as e:
        raise EngineBuildError(
            f"{backend.name} {backend.version} failed to build the engine ({e})",
            "the log above names the layer; report the model and flags",
        ) from None
    build_s = time.perf_counter() - t
    SaveBytes(serialized, str(plan_path))()
    del serialized, builder, network, parser
    return build_s


def load_engine(plan_path: Path, backend: Backend) -> Any:
    """Deserialize a plan (needs a GPU)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes

    return EngineFromBytes(BytesFromPath(str(plan_path)))()
