"""What needs an NVIDIA GPU: run the engine, compare it, time it. Never called where ``gpu_status()`` is False.

* ``TrtStepRunner`` — the engine behind validate.py's ``Runner.step`` contract (so ``compare_runners`` and the
  ``Generator`` drive it exactly as they drive ONNX Runtime), switching between the decode and prefill
  profiles by step shape.
* ``engine_vs_ort`` — Polygraphy ``Comparator`` over TrtRunner and OnnxrtRunner, per output, on a prefill
  feed (prefill profile) and a decode feed (decode profile). ONNX Runtime runs on its CUDA provider when that
  is installed (``ort_providers``), else on the CPU; each case records which.
* ``engine_vs_torch`` — against the *original* fp32 PyTorch model: ``compare_runners`` agreement, then a
  greedy generation of ``n_tokens`` by PyTorch, replayed teacher-forced through the engine: top-1 agreement
  and mean KL per position, plus how many free-running greedy tokens match before the first divergence.
* ``engine_failures`` — the documented thresholds (``ENGINE_THRESHOLDS``) both checks must meet; the engine
  stage fails the command with them (ValidationError, exit 3, nothing written).
* ``throughput`` — prefill and decode tokens/s with CUDA events (torch.cuda), warm-up, median of repeats;
  ``throughput_pair`` times the original-model and LP engines in the same process, same profile.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from layerpair.engine.backend import Backend
from layerpair.engine.build import load_engine
from layerpair.engine.profile import ProfileSpec, profile_for
from layerpair.engine.runtime import Generator, mean_kl, top1_agreement
from layerpair.errors import MissingDependencyError
from layerpair.exporter.validate import Runner, TorchRunner, compare_runners, empty_past
from layerpair.iospec import IOSpec


@dataclass(frozen=True)
class EngineThresholds:
    """What an engine must meet on a GPU, or the export fails (exit 3, nothing written).

    * ``ort_atol`` / ``ort_rtol``: every output of the engine vs ONNX Runtime on the same graph and feeds
      (Polygraphy's simple compare: an element fails when beyond both). Same graph, so only kernel
      differences: fp32 1e-3 (TensorRT may run fp32 MatMuls in TF32, 10-bit significand), 16-bit 5e-2.
    * ``torch_rel``: engine vs the original fp32 PyTorch model on every validation case, normwise — logits'
      max_abs over the reference's largest |logit|, caches' over its largest |K|,|V| — the dtype tolerance
      of ``exporter/precision.py`` (fp16 2e-2, bf16 8e-2); fp32 2e-2 as well, because of TF32.
    * ``min_top1`` / ``max_kl``: over ``n_tokens`` greedy tokens of PyTorch replayed teacher-forced through
      the engine: top-1 agreement at least, mean KL(PyTorch || engine) per position at most. Near-ties may
      flip a few tokens, so top-1 is not 1.0; a broken engine drops far below.

    Not yet measured on a GPU in this project (none was available): they are the figures ``tests/engine/
    test_gpu.py`` asserts; a NaN or inf anywhere fails.
    """

    ort_atol: float
    ort_rtol: float
    torch_rel: float
    min_top1: float
    max_kl: float

    def to_json(self) -> dict[str, float]:
        return asdict(self)


ENGINE_THRESHOLDS: dict[str, EngineThresholds] = {
    "float32": EngineThresholds(ort_atol=1e-3, ort_rtol=1e-3, torch_rel=2e-2, min_top1=0.95, max_kl=1e-2),
    "float16": EngineThresholds(ort_atol=5e-2, ort_rtol=1e-3, torch_rel=2e-2, min_top1=0.95, max_kl=1e-2),
    "bfloat16": EngineThresholds(ort_atol=5e-2, ort_rtol=1e-3, torch_rel=8e-2, min_top1=0.90, max_kl=5e-2),
}


def engine_failures(gpu: dict[str, Any], dtype: str) -> list[str]:
    """Which ``ENGINE_THRESHOLDS[dtype]`` the GPU section (``vs_onnxruntime``, ``vs_pytorch``) misses; empty
    when all are met. Every comparison is written ``not x <= limit`` so that NaN fails."""
    t = ENGINE_THRESHOLDS[dtype]
    bad = []
    for case, r in gpu["vs_onnxruntime"].items():
        worst = max(r["max_abs"].items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf)
        if not r["passed"] or not all(math.isfinite(v) for v in r["max_abs"].values()):
            bad.append(
                f"engine vs ONNX Runtime ({case}): outputs beyond atol {t.ort_atol:g} / rtol {t.ort_rtol:g} "
                f"(worst {worst[0]} max_abs {worst[1]:.3g})"
            )
    vt = gpu["vs_pytorch"]
    cache_max = max(vt["reference_cache_max"], 1e-30)
    for case, a in vt["agreement"].items():
        if not a["max_rel"] <= t.torch_rel:
            bad.append(f"engine vs PyTorch ({case}): logits max_rel {a['max_rel']:.3g} > {t.torch_rel:g}")
        if not a["present_max_abs"] / cache_max <= t.torch_rel:
            rel = a["present_max_abs"] / cache_max
            bad.append(f"engine vs PyTorch ({case}): KV cache max_abs/max|ref| {rel:.3g} > {t.torch_rel:g}")
    g = vt["generation"]
    if not g["teacher_forced_top1"] >= t.min_top1:
        bad.append(f"greedy top-1 agreement {g['teacher_forced_top1']:.3f} < {t.min_top1:g} over {g['tokens']} tokens")
    if not g["mean_kl"] <= t.max_kl:
        bad.append(f"mean KL {g['mean_kl']:.3g} > {t.max_kl:g} over {g['tokens']} tokens")
    return bad


def ort_providers() -> list[str]:
    """Polygraphy's names of the ONNX Runtime providers for ``engine_vs_ort``: CUDA first when installed."""
    import onnxruntime

    return ["cuda", "cpu"] if "CUDAExecutionProvider" in onnxruntime.get_available_providers() else ["cpu"]


class TrtStepRunner(Runner):
    def __init__(self, plan: Path, spec: IOSpec, profiles: list[ProfileSpec], backend: Backend) -> None:
        from polygraphy.backend.trt import TrtRunner

        self.spec = spec
        self.profiles = profiles
        self.runner = TrtRunner(load_engine(plan, backend))
        self.runner.activate()
        self.active = 0

    def step(
        self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        B, S = ids.shape
        P = past[0].shape[2] if past else 0
        index = profile_for(self.profiles, B, S, P)
        if index != self.active:
            self.runner.set_profile(index)
            self.active = index
        feeds = dict(zip(self.spec.input_names, [ids, mask, pos, *past], strict=True))
        out = self.runner.infer(feeds)
        return np.asarray(out["logits"]), [np.asarray(out[n]) for n in self.spec.output_names[1:]]

    def close(self) -> None:
        self.runner.deactivate()


def _feeds(spec: IOSpec, batch: int, seq: int, past: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = spec.shapes({"batch": batch, "sequence": seq, "past_sequence": past})
    feeds: dict[str, np.ndarray] = {
        "input_ids": rng.integers(0, vocab, shapes["input_ids"]).astype(np.int64),
        "attention_mask": np.ones(shapes["attention_mask"], np.int64),
        "position_ids": (np.arange(seq, dtype=np.int64) + past)[None].repeat(batch, 0),
    }
    cache_dtype = empty_past(spec, 1)[0].dtype
    for name in spec.input_names[3:]:
        feeds[name] = rng.standard_normal(shapes[name]).astype(cache_dtype)
    return feeds


def engine_vs_ort(
    plan: Path, onnx_path: Path, spec: IOSpec, profiles: list[ProfileSpec], backend: Backend, atol: float, rtol: float
) -> dict[str, Any]:
    """Per-output max abs / pass of engine vs ONNX Runtime (CUDA EP if present, else CPU) via Comparator;
    ``onnxruntime_provider`` names the one used."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    out: dict[str, Any] = {}
    providers = ort_providers()
    cases = {"prefill": (1, min(16, profiles[-1].max["sequence"]), 0), "decode": (1, 1, 16)}
    for case, (b, s, p) in cases.items():
        index = profile_for(profiles, b, s, p)
        runners = [
            TrtRunner(load_engine(plan, backend), optimization_profile=index),
            OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=providers)),
        ]
        results = Comparator.run(runners, data_loader=[_feeds(spec, b, s, p, spec.arch.vocab_size)])
        accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
        (iteration,) = [res for res in results[0][1]]
        (other,) = [res for res in results[1][1]]
        out[case] = {
            "passed": bool(accuracy),
            "onnxruntime_provider": providers[0],
            "max_abs": {
                n: float(np.abs(np.asarray(iteration[n], np.float64) - np.asarray(other[n], np.float64)).max())
                for n in spec.output_names
            },
        }
    return out


def engine_vs_torch(
    ours: Runner, spec: IOSpec, dec32: Any, prompt_ids: Sequence[int], tokenizer: Any = None, n_tokens: int = 64
) -> dict[str, Any]:
    """The engine against the original fp32 PyTorch model (see module docstring); ``reference_cache_max`` is
    the scale of the cache threshold."""
    from layerpair.exporter.precision import reference_cache_max

    ref = TorchRunner(dec32)
    agreement = compare_runners(ours, spec, ref, dec32.io, tokenizer)
    ref_gen = Generator(ref, dec32.io).generate([prompt_ids], n_tokens, keep_logits=True)
    forced = Generator(ours, spec).generate([prompt_ids], n_tokens, forced=ref_gen.tokens, keep_logits=True)
    free = Generator(ours, spec).generate([prompt_ids], n_tokens)
    same = 0
    for a, b in zip(free.tokens[0], ref_gen.tokens[0], strict=False):
        if a != b:
            break
        same += 1
    logits_err = max(float(np.abs(r - o).max()) for r, o in zip(ref_gen.step_logits, forced.step_logits, strict=False))
    return {
        "agreement": {k: a.to_json() for k, a in agreement.items()},
        "reference_cache_max": reference_cache_max(dec32, tokenizer),
        "generation": {
            "tokens": len(ref_gen.tokens[0]),
            "teacher_forced_top1": top1_agreement(ref_gen.step_logits, forced.step_logits),
            "mean_kl": mean_kl(ref_gen.step_logits, forced.step_logits),
            "logits_max_abs": logits_err,
            "free_running_identical_prefix": same,
        },
    }


def throughput(
    plan: Path,
    spec: IOSpec,
    profiles: list[ProfileSpec],
    backend: Backend,
    batch: int = 1,
    prompt: int = 128,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, float]:
    """Prefill and decode tokens/s of one engine: CUDA events around ``execute_async_v3``, median of repeats."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise MissingDependencyError("throughput needs torch for CUDA events", "pip install torch") from None
    if not torch.cuda.is_available():
        raise MissingDependencyError(
            "throughput needs a CUDA build of torch (CUDA events, device tensors)",
            "install torch with CUDA on the GPU machine",
        )
    from polygraphy.backend.trt import TrtRunner

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    res: dict[str, float] = {}
    with TrtRunner(load_engine(plan, backend)) as runner:
        for case, (s, p) in {"prefill": (prompt, 0), "decode": (1, prompt)}.items():
            index = profile_for(profiles, batch, s, p)
            runner.set_profile(index)
            np_feeds = _feeds(spec, batch, s, p, spec.arch.vocab_size)
            feeds = {
                k: torch.from_numpy(v).to("cuda")
                if v.dtype != np.float32 or spec.dtype == "float32"
                else torch.from_numpy(v).to("cuda", dtypes[spec.dtype])
                for k, v in np_feeds.items()
            }
            times = []
            for i in range(warmup + repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runner.infer(feeds, copy_outputs_to_host=False)
                end.record()
                end.synchronize()
                if i >= warmup:
                    times.append(start.elapsed_time(end) / 1e3)
            median = statistics.median(times)
            res[f"{case}_ms"] = median * 1e3
            res[f"{case}_tokens_per_s"] = batch * s / median
    return res


def throughput_pair(
    original_plan: Path,
    original_spec: IOSpec,
    lp_plan: Path,
    lp_spec: IOSpec,
    profiles: list[ProfileSpec],
    backend: Backend,
    **kw: Any,
) -> dict[str, Any]:
    """Original-model engine vs LP engine: same backend, same profiles, same process."""
    orig = throughput(original_plan, original_spec, profiles, backend, **kw)
    lp = throughput(lp_plan, lp_spec, profiles, backend, **kw)
    return {
        "original": orig,
        "layerpair": lp,
        "speedup": {k: lp[k] / orig[k] for k in orig if k.endswith("tokens_per_s")},
    }
