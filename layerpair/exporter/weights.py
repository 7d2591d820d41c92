"""Checkpoint weights read one tensor at a time, by their Hugging Face names.

``SafetensorsWeights`` reads a checkpoint directory (one file or shards with ``model.safetensors.index.json``)
without building a transformers model: every tensor is opened, read and released on its own, so reading a
checkpoint costs one tensor of transient memory on top of what the caller keeps. The file list, the index
and every header are checked up front — a missing shard, a truncated file or a tensor the index promises but
no file holds fails in seconds with one line, before any weight is read. ``StateDictWeights`` serves a model
that is already in memory (a hub download or a GGUF dequantised by transformers).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

import torch

from layerpair.errors import ModelLoadError

INDEX = "model.safetensors.index.json"


class WeightReader(Protocol):
    def names(self) -> set[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


class StateDictWeights:
    def __init__(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.sd = state_dict

    def names(self) -> set[str]:
        return set(self.sd)

    def read(self, name: str) -> torch.Tensor:
        return self.sd[name]


def _header(path: Path) -> dict[str, dict[str, object]]:
    """The safetensors header (tensor -> dtype/shape/offsets), checked against the file's real size."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise ModelLoadError(
            f"{path.name} is not a readable safetensors file ({type(e).__name__}: {e})",
            "re-download or re-save the checkpoint",
        ) from None
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)  # type: ignore[index]
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path.name} is truncated: its header describes {8 + n + end} bytes, the file has {size}",
            "re-download or re-save the checkpoint",
        )
    return header


class SafetensorsWeights:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        files = self._files()
        self.where: dict[str, Path] = {}
        for f in files:
            for name in _header(f):
                self.where[name] = f

    def _files(self) -> list[Path]:
        index = self.dir / INDEX
        if not index.is_file():
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ModelLoadError(f"{self.dir} holds no *.safetensors file", "save the checkpoint as safetensors")
            return files
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot read {INDEX} ({e})", "restore the checkpoint's index file") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (self.dir / s).is_file()]
        if missing:
            raise ModelLoadError(
                f"checkpoint shard{'s' if len(missing) > 1 else ''} missing: {', '.join(missing[:3])}",
                "download every file listed in model.safetensors.index.json",
            )
        return [self.dir / s for s in shards]

    def names(self) -> set[str]:
        return set(self.where)

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # One open per tensor: the file mapping (and the page cache it pins in our RSS) is released at once.
        with safe_open(str(self.where[name]), framework="pt") as f:
            return f.get_tensor(name)


def require(reader: WeightReader, needed: Iterable[str]) -> None:
    """Fail before reading anything if a tensor the architecture needs is not in the checkpoint."""
    have = reader.names()
    missing = [n for n in needed if n not in have]
    if missing:
        raise ModelLoadError(
            f"checkpoint lacks {len(missing)} tensor(s) its config needs, e.g. {', '.join(missing[:3])}",
            "check that the checkpoint is complete and matches its config.json",
        )
