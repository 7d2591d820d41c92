"""``triton_repo_from_export``: a Triton Inference Server model repository for an export directory.

    REPO/
      <name>_onnx/config.pbtxt, 1/model.onnx      onnxruntime_onnx; KV cache as implicit state (+ START/READY)
      <name>_trt/config.pbtxt, 1/model.plan       tensorrt_plan, only when OUT/model.plan exists; every instance
                                                 gets all the engine's optimization profiles (decode, prefill)
      <name>_generate/config.pbtxt, 1/model.py    python backend: text in -> tokenize -> ORT loop -> text out
                     1/lp_runtime.py (layerpair/decode.py), 1/decoder.onnx, 1/io.json, 1/tokenizer/
      client.py, lp_runtime.py                     tritonclient: greedy generation against either model

Every name, dtype and dim comes from ``report.json["io"]`` (the IOSpec JSON); cache pairs come from its cache
slots via ``CacheSlot``, so merged slots (``past_key_values.20_21.key``, 2·KVH heads) need nothing special.

Implicit-state protocol (the stateful models). Triton keeps each ``present.*`` output and feeds it back as the
matching ``past_key_values.*`` input on the next request of the same sequence id. Triton requires the initial
state to have fixed dims, so the first request of a sequence sees a past of exactly ONE zero position
([KVH, 1, D]); the client masks it out by always sending ``attention_mask = [0, 1, 1, ...]`` (one leading 0 for
that slot, then 1 per real token) — the decoder supports left padding, so this is exact, works unchanged for
the TensorRT engine (which cannot be given new inputs), and costs one cache position per sequence. Position
ids count real tokens only (0, 1, 2, ...). ``client.py`` implements it.

START / READY: the ORT model gets two int32 inputs ``START`` and ``READY`` [batch, 1] that the sequence batcher
fills (Triton's onnxruntime backend refuses control inputs the model does not have, so they are added to the
graph). They are declared, not used by the math: the zero initial state already starts each sequence clean.
The TensorRT engine has no such inputs, so its config lists no controls.

Batching: with ``max_batch_size > 1`` the Direct sequence batcher puts concurrent sequences into batch slots of
one execution; their caches are concatenated, so they must have the same length at every step (lockstep
clients). Independent chat sessions should use ``max_batch_size 1`` (the default) and several instances.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import layerpair.decode as decode_core
from layerpair.decode import DecoderIO, StateTensor
from layerpair.deploy.generate import Export, export_from_dir
from layerpair.errors import InputError
from layerpair.outdir import staged_output

TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "bool": "TYPE_BOOL",
}
CONTROL_INPUTS = (("START", "CONTROL_SEQUENCE_START"), ("READY", "CONTROL_SEQUENCE_READY"))
DEFAULT_NAME = "layerpair"
DEPLOY_DIR = Path(__file__).parent
DECODE_PY = Path(decode_core.__file__)  # copied as <name>_generate/1/lp_runtime.py


@dataclass(frozen=True)
class TritonOptions:
    name: str = DEFAULT_NAME
    max_batch_size: int = 1
    instances: int = 1
    kind: str = "KIND_AUTO"  # KIND_CPU | KIND_GPU | KIND_AUTO
    gpus: tuple[int, ...] = ()
    ort_tensorrt: bool = False  # ONNX Runtime's TensorRT execution accelerator (GPU only)
    trt_fp16: bool = True
    max_sequence_idle_us: int = 60_000_000
    generate_model: bool = True
    generate_max_new_tokens: int = 64


def _dtype(d: str) -> str:
    if d not in TRITON_DTYPES:
        raise InputError(f"dtype '{d}' has no Triton equivalent", "export as float32 or float16")
    return TRITON_DTYPES[d]


def _dims(dims: Sequence[Any], batched: bool) -> list[int]:
    """Spec dims -> Triton dims: symbolic -> -1; the leading batch dim is implicit when max_batch_size > 0."""
    out = [d if isinstance(d, int) else -1 for d in dims]
    return out[1:] if batched else out


def _dims_str(dims: Sequence[int]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    return f'  {{\n    name: "{name}"\n    data_type: {dtype}\n    dims: {_dims_str(dims)}\n  }}'


def _instance_group(o: TritonOptions, profiles: Sequence[str] = ()) -> str:
    """``profiles``: the TensorRT optimization profiles every instance may use (Triton picks one per request
    from the input shapes); empty for other platforms."""
    gpus = f"\n    gpus: {_dims_str(o.gpus)}" if o.gpus and o.kind == "KIND_GPU" else ""
    prof = f"\n    profile: [ {', '.join(json.dumps(p) for p in profiles)} ]" if profiles else ""
    return f"instance_group [\n  {{\n    count: {o.instances}\n    kind: {o.kind}{gpus}{prof}\n  }}\n]\n"


def engine_profiles(report: dict[str, Any]) -> list[str]:
    """Indices (as Triton wants them: strings) of the engine's optimization profiles, from ``report.json``'s
    ``engine.profiles``; both of ``PROFILE_NAMES`` (decode, prefill) when the report does not list them."""
    from layerpair.engine.profile import PROFILE_NAMES

    listed = report.get("engine", {}).get("profiles") if isinstance(report.get("engine"), dict) else None
    n = len(listed) if isinstance(listed, list) and listed else len(PROFILE_NAMES)
    return [str(i) for i in range(n)]


def stateful_config(
    io_json: dict[str, Any],
    dio: DecoderIO,
    platform: str,
    o: TritonOptions,
    name: str,
    controls: bool,
    profiles: Sequence[str] = (),
) -> str:
    """config.pbtxt of the decoder with its KV cache as implicit state (onnxruntime_onnx or tensorrt_plan).

    ``profiles`` (tensorrt_plan): the engine's optimization profiles, all given to every instance — without
    them Triton uses profile 0 (``decode``, one token) only, and a prompt request falls outside it."""
    batched = o.max_batch_size > 0
    specs_in = {t["name"]: t for t in io_json["inputs"]}
    specs_out = {t["name"]: t for t in io_json["outputs"]}
    inputs = [
        _tensor(n, _dtype(specs_in[n]["dtype"]), _dims(specs_in[n]["dims"], batched))
        for n in (dio.input_ids, dio.attention_mask, dio.position_ids)
    ]
    logits = specs_out[dio.logits]
    outputs = [_tensor(dio.logits, _dtype(logits["dtype"]), _dims(logits["dims"], batched))]
    states = [_state(s, _dims(specs_in[s.past]["dims"], batched)) for s in dio.states]
    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {o.max_batch_size}\n"
        "input [\n" + ",\n".join(inputs) + "\n]\n"
        "output [\n" + ",\n".join(outputs) + "\n]\n"
        "sequence_batching {\n"
        f"  max_sequence_idle_microseconds: {o.max_sequence_idle_us}\n"
        "  direct { }\n"
        f"{_control_inputs() if controls else ''}"
        "  state [\n" + ",\n".join(states) + "\n  ]\n"
        "}\n" + _instance_group(o, profiles) + _ort_tensorrt_accelerator(o, platform)
    )


def _state(s: StateTensor, dims: list[int]) -> str:
    """One implicit-state entry: the cache input ``s.past`` fed back from the output ``s.present``. Its
    initial state needs fixed dims: the sequence axis gets 1 zero position, which the client masks out."""
    init = [1 if x == -1 else x for x in dims]
    return (
        "    {\n"
        f'      input_name: "{s.past}"\n'
        f'      output_name: "{s.present}"\n'
        f"      data_type: {_dtype(s.dtype)}\n"
        f"      dims: {_dims_str(dims)}\n"
        "      initial_state: {\n"
        f"        data_type: {_dtype(s.dtype)}\n"
        f"        dims: {_dims_str(init)}\n"
        "        zero_data: true\n"
        f'        name: "zero_{s.past}"\n'
        "      }\n"
        "    }"
    )


def _control_inputs() -> str:
    """The sequence batcher's START / READY controls, as int32 inputs of the model (``onnx_with_controls``)."""
    items = []
    for cname, kind in CONTROL_INPUTS:
        items.append(
            f'    {{\n      name: "{cname}"\n      control [\n        {{\n          kind: {kind}\n'
            f"          int32_false_true: [ 0, 1 ]\n        }}\n      ]\n    }}"
        )
    return "  control_input [\n" + ",\n".join(items) + "\n  ]\n"


def _ort_tensorrt_accelerator(o: TritonOptions, platform: str) -> str:
    """``--ort-tensorrt``: ONNX Runtime's TensorRT execution provider for the onnxruntime model ('' otherwise)."""
    if not (o.ort_tensorrt and platform == "onnxruntime_onnx"):
        return ""
    prec = "FP16" if o.trt_fp16 else "FP32"
    return (
        "optimization {\n  execution_accelerators {\n    gpu_execution_accelerator : [ {\n"
        '      name : "tensorrt"\n'
        f'      parameters {{ key: "precision_mode" value: "{prec}" }}\n'
        '      parameters { key: "max_workspace_size_bytes" value: "4294967296" }\n'
        "    } ]\n  }\n}\n"
    )


def generate_config(o: TritonOptions, name: str) -> str:
    """config.pbtxt of the python-backend text generation model (one prompt per request)."""
    cpu = replace(o, kind="KIND_CPU" if o.kind == "KIND_AUTO" else o.kind)
    return (
        f'name: "{name}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        "input [\n"
        + ",\n".join(
            [
                _tensor("PROMPT", "TYPE_STRING", [1]),
                _tensor("MAX_NEW_TOKENS", "TYPE_INT32", [1]).replace("  }", "    optional: true\n  }"),
            ]
        )
        + "\n]\n"
        "output [\n"
        + _tensor("TEXT", "TYPE_STRING", [1])
        + ",\n"
        + _tensor("TOKENS", "TYPE_INT64", [-1])
        + "\n]\n"
        + _instance_group(cpu)
        + f'parameters {{ key: "max_new_tokens" value: {{ string_value: "{o.generate_max_new_tokens}" }} }}\n'
    )


def onnx_with_controls(src: Path, dst: Path) -> None:
    """Copy the decoder ONNX adding int32 [batch, 1] inputs START and READY (the sequence batcher's controls)."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(src), load_external_data=False)
    names = {i.name for i in m.graph.input}
    batch = m.graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    for cname, _ in CONTROL_INPUTS:
        if cname in names:
            raise InputError(f"{src} already has an input named {cname}", "rename it or export without it")
        m.graph.input.append(helper.make_tensor_value_info(cname, TensorProto.INT32, [batch, 1]))
    onnx.save(m, str(dst))
    data = {
        t.external_data[i].value
        for t in m.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
        for i in range(len(t.external_data))
        if t.external_data[i].key == "location"
    }
    for rel in data:  # external weights are shared unchanged (names are relative to the model file)
        link_or_copy(src.parent / rel, dst.parent / rel)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no extra disk for a multi-GB model) or copy across filesystems; never a symlink, so the
    repository survives being mounted alone into a container."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def triton_repo_from_export(
    export_dir: Path, repo: Path, options: TritonOptions | None = None, force: bool = False
) -> dict[str, Any]:
    """Write the model repository atomically; returns a summary (model names, files)."""
    o = options or TritonOptions()
    _check_options(o)
    export = export_from_dir(Path(export_dir))
    models: dict[str, str] = {}
    with staged_output(Path(repo), force) as tmp:
        models[_write_onnx_model(tmp, export, o)] = "onnxruntime_onnx"
        plan = Path(export_dir) / "model.plan"
        if plan.is_file():
            models[_write_trt_model(tmp, export, o, plan)] = "tensorrt_plan"
        if o.generate_model:
            models[_write_generate_model(tmp, export, o, export_dir)] = "python"
        shutil.copy2(DEPLOY_DIR / "triton_client.py", tmp / "client.py")
        shutil.copy2(DECODE_PY, tmp / "lp_runtime.py")  # the client's decode loop
        if (Path(export_dir) / "tokenizer").is_dir():
            shutil.copytree(Path(export_dir) / "tokenizer", tmp / "tokenizer")
        summary = {
            "export": str(export_dir),
            "models": models,
            "max_batch_size": o.max_batch_size,
            "instances": o.instances,
            "kind": o.kind,
            "state_pairs": export.state_pairs,
        }
        (tmp / "layerpair_repo.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_onnx_model(tmp: Path, export: Export, o: TritonOptions) -> str:
    """``{name}_onnx``: the decoder with START/READY control inputs on onnxruntime; returns the model name."""
    onnx_name = f"{o.name}_onnx"
    (tmp / onnx_name / "1").mkdir(parents=True)
    onnx_with_controls(export.model_path, tmp / onnx_name / "1" / "model.onnx")
    (tmp / onnx_name / "config.pbtxt").write_text(
        stateful_config(export.report["io"], export.io, "onnxruntime_onnx", o, onnx_name, controls=True)
    )
    return onnx_name


def _write_trt_model(tmp: Path, export: Export, o: TritonOptions, plan: Path) -> str:
    """``{name}_trt``: the export's TensorRT engine (on the GPU unless --kind says otherwise), every engine
    profile given to every instance; returns the model name."""
    trt_name = f"{o.name}_trt"
    link_or_copy(plan, tmp / trt_name / "1" / "model.plan")
    trt = replace(o, kind="KIND_GPU" if o.kind == "KIND_AUTO" else o.kind)
    config = stateful_config(
        export.report["io"],
        export.io,
        "tensorrt_plan",
        trt,
        trt_name,
        controls=False,
        profiles=engine_profiles(export.report),
    )
    (tmp / trt_name / "config.pbtxt").write_text(config)
    return trt_name


def _write_generate_model(tmp: Path, export: Export, o: TritonOptions, export_dir: Path) -> str:
    """``{name}_generate``: the python-backend text generation model — the decoder ONNX (and its weight file),
    the numpy runtime, the tokenizer and the I/O roles; returns the model name."""
    gen_name = f"{o.name}_generate"
    v = tmp / gen_name / "1"
    link_or_copy(export.model_path, v / "decoder.onnx")
    data = export.model_path.with_name(export.model_path.name + ".data")
    if data.is_file():  # the graph names its weight file relative to itself: same name beside it
        link_or_copy(data, v / data.name)
    shutil.copy2(DECODE_PY, v / "lp_runtime.py")  # the decode core: numpy + onnxruntime only
    shutil.copy2(DEPLOY_DIR / "triton_generate_model.py", v / "model.py")
    (v / "io.json").write_text(
        json.dumps(
            {"io": export.report["io"], "state_pairs": export.state_pairs, "model_file": "decoder.onnx"}, indent=2
        )
    )
    tok = Path(export_dir) / "tokenizer"
    if not tok.is_dir():
        raise InputError(f"'{export_dir}' has no tokenizer/", "the generate model needs one; pass --no-generate")
    shutil.copytree(tok, v / "tokenizer")
    (tmp / gen_name / "config.pbtxt").write_text(generate_config(o, gen_name))
    return gen_name


def _check_options(o: TritonOptions) -> None:
    if o.max_batch_size < 0:
        raise InputError(f"--max-batch-size must be >= 0, got {o.max_batch_size}", "pass e.g. --max-batch-size 1")
    if o.instances < 1:
        raise InputError(f"--instances must be >= 1, got {o.instances}", "pass e.g. --instances 2")
    if o.kind not in ("KIND_CPU", "KIND_GPU", "KIND_AUTO"):
        raise InputError(f"--kind must be cpu, gpu or auto, got {o.kind}", "pass --kind gpu")
    if o.gpus and o.kind != "KIND_GPU":
        raise InputError("--gpus needs --kind gpu", "add --kind gpu")
    if not o.name or not all(c.isalnum() or c in "_-" for c in o.name):
        raise InputError(f"model name '{o.name}' must be letters, digits, _ or -", "pass e.g. --name smollm2")


def add_triton_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default=DEFAULT_NAME, help=f"model name prefix (default {DEFAULT_NAME})")
    p.add_argument("--max-batch-size", type=int, default=1, help="Triton max_batch_size (default 1; see docs)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count per device (default 1)")
    p.add_argument("--kind", choices=("cpu", "gpu", "auto"), default="auto", help="instance kind (default auto)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids for --kind gpu (default: all)")
    p.add_argument("--ort-tensorrt", action="store_true", help="enable ONNX Runtime's TensorRT accelerator")
    p.add_argument("--no-generate", action="store_true", help="omit the python-backend text generation model")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generate model's default (default 64)")


def options_from_args(args: argparse.Namespace) -> TritonOptions:
    try:
        gpus = tuple(int(g) for g in args.gpus.split(",") if g.strip())
    except ValueError:
        raise InputError(
            f"--gpus must be comma-separated integers, got '{args.gpus}'", "pass e.g. --gpus 0,1"
        ) from None
    return TritonOptions(
        name=args.name,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        kind=f"KIND_{args.kind.upper()}",
        gpus=gpus,
        ort_tensorrt=args.ort_tensorrt,
        generate_model=not args.no_generate,
        generate_max_new_tokens=args.max_new_tokens,
    )


def triton_cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="layerpair-export triton",
        description="Write a Triton model repository (ONNX Runtime, TensorRT plan if present, python generator) "
        "for an export directory.",
    )
    p.add_argument("export_dir", type=Path, metavar="OUT_DIR", help="directory written by layerpair-export")
    p.add_argument("repo", type=Path, metavar="REPO", help="model repository to write")
    p.add_argument("--force", action="store_true", help="replace REPO if it exists")
    add_triton_args(p)
    args = p.parse_args(argv)
    summary = triton_repo_from_export(args.export_dir, args.repo, options_from_args(args), args.force)
    print(
        f"wrote Triton model repository {args.repo}: " + ", ".join(f"{k} ({v})" for k, v in summary["models"].items())
    )
    print(f"  serve: tritonserver --model-repository {Path(args.repo).absolute()}")
    print(f"  client: python {args.repo}/client.py --model {args.name}_onnx --prompt 'Hello'")
    return 0
