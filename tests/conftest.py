"""Shared fixtures. Expensive artefacts (the SmolLM2 export) are built once per test session and shared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Keep test runs reproducible and polite on a 2-core machine.
torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    """One fp32 GGUF cache per test run (not the user's ~/.cache), shared by the xdist workers and the CLI
    subprocesses through the environment: the first SmolLM2 load of the run reads the GGUF, later ones the copy."""
    if hasattr(config, "workerinput") or "LAYERPAIR_CACHE_DIR" in os.environ:
        return
    import tempfile

    os.environ["LAYERPAIR_CACHE_DIR"] = config._layerpair_cache = tempfile.mkdtemp(prefix="layerpair-test-cache-")  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    import shutil

    cache = getattr(config, "_layerpair_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop("LAYERPAIR_CACHE_DIR", None)


def tiny_config(arch: str, **overrides: object) -> tf.PretrainedConfig:
    """A tiny random config of each supported family (all four in one place)."""
    common: dict[str, object] = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=6, head_dim=16)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str, seed: int = 0, **overrides: object) -> tf.PreTrainedModel:
    """Random tiny *ForCausalLM with non-trivial norm scales and biases (ones/zeros would hide bugs)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cfg._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family saved as a Hugging Face directory (config.json + safetensors), like a user's checkpoint."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for arch in ARCHS:
        d = root / arch
        tiny_model(arch).save_pretrained(d)
        out[arch] = d
    return out


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "")}
    return subprocess.run(
        [sys.executable, "-m", "layerpair.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def smollm2_lp_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's main job: SmolLM2-135M with pairs 20:24, exported once per session through the CLI."""
    out = tmp_path_factory.mktemp("smollm2") / "lp20-24"
    r = run_cli("smollm2-135m", "--pairs", "20:24", "-o", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def smollm2_checkpoint():  # type: ignore[no-untyped-def]
    """The embedded SmolLM2-135M-Instruct, loaded once (fp32 from GGUF, ~40 s)."""
    from layerpair.exporter.loading import load_checkpoint

    return load_checkpoint("smollm2-135m", keep_model=True)


# Tests that need the real SmolLM2 share session fixtures that cost minutes each. Under pytest-xdist
# (`scripts/test.sh` runs `-n 2 --dist loadgroup`) every test of one fixture goes to the same worker, so each
# fixture is built once; the two SmolLM2 chains run on different workers, the tiny tests fill in around them.
# xdist 3.8 groups by a suffix it writes to `Item._nodeid`, which pytest 9 no longer reads (it keeps `_id`):
# there the marks are silently ignored and both workers build the export. pytest is pinned to 8.4, and
# `pytest_collection_finish` below fails the run loudly if the grouping ever stops taking effect.
SMOLLM2_GROUPS = {
    "smollm2_lp_export": "smollm2-lp",
    "smollm2_fp16_trt_export": "smollm2-other",
    "smollm2_checkpoint": "smollm2-other",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        groups = {g for f, g in SMOLLM2_GROUPS.items() if f in names}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} uses SmolLM2 fixtures of two xdist groups: {sorted(groups)}")
        if groups:
            item.add_marker(pytest.mark.xdist_group(groups.pop()))


@pytest.hookimpl(tryfirst=True)  # on each worker, before xdist sends the collection to the scheduler
def pytest_collection_finish(session: pytest.Session) -> None:
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers under --dist loadgroup
        return
    for item in session.items:
        for mark in item.iter_markers("xdist_group"):
            if not item.nodeid.endswith(f"@{mark.args[0]}"):
                raise pytest.UsageError(
                    f"{item.nodeid}: xdist_group({mark.args[0]!r}) is not applied by this pytest/pytest-xdist "
                    "pair; the SmolLM2 fixtures would be built on both workers — use the pinned versions"
                )
