"""Tiny exports shared by the graph-pass tests (built once per session; ~15 s each on 2 cores)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from layerpair.exporter.onnx_export import export_onnx
from tests.conftest import ARCHS, tiny_model

PAIR = (1, 2)


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
