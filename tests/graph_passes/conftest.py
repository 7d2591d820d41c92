"""Tiny exports shared by the graph-pass tests (built once per session; ~15 s each on 2 cores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from layerpair.exporter.validate import OrtRunner
from layerpair.iospec import IOSpec
from tests.conftest import ARCHS, tiny_model

PAIR = (1, 2)


def prefill_logits(model: ir.Model, spec: IOSpec) -> np.ndarray:
    """Logits [1,6,V] of a 6-token prefill on an empty cache, one ONNX Runtime thread (a rewrite's before/after)."""
    ids = np.array([[3, 1, 4, 1, 5, 9]], np.int64)
    past = [np.zeros((1, s.num_kv_heads, 0, spec.arch.head_dim), np.float32) for s in spec.slots for _ in (0, 1)]
    return OrtRunner(model, spec, threads=1).step(ids, np.ones_like(ids), np.arange(6)[None], past)[0]


@dataclass(frozen=True)
class TinyExport:
    dec: Decoder
    path: Path

    @property
    def arch(self) -> ArchSpec:
        return self.dec.arch


def _export(arch: str, pairs: list[tuple[int, int]], root: Path) -> TinyExport:
    hf = tiny_model(arch)
    dec = Decoder.from_hf(hf, ArchSpec.from_hf_config(hf.config), pairs)
    path = root / f"{arch}-{'_'.join(f'{a}-{b}' for a, b in pairs) or 'none'}" / "model.onnx"
    export_onnx(dec, path)
    return TinyExport(dec, path)


@pytest.fixture(scope="session")
def tiny_pair_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyExport]:
    """Every family, 4 layers, pair (1, 2): layers 0 and 3 stay single, so both kinds sit side by side."""
    root = tmp_path_factory.mktemp("gp_pair")
    return {arch: _export(arch, [PAIR], root) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_plain_export(tmp_path_factory: pytest.TempPathFactory) -> TinyExport:
    return _export("llama", [], tmp_path_factory.mktemp("gp_plain"))
