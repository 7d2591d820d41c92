"""TensorRT backends: datacenter ``tensorrt`` (10.x/11.x) and ``tensorrt_rtx``, driven through Polygraphy.

Two steps, so that ``--trt`` can fail in the first second:

* ``resolve_backend(choice)`` — *no imports*: ``importlib.util.find_spec`` only (milliseconds). Raises
  ``MissingDependencyError`` naming the packages to install. Called by the CLI before any export work.
* ``load_backend(name)`` — imports the module and tells Polygraphy which one to use.

Polygraphy picks its TensorRT module from ``POLYGRAPHY_USE_TENSORRT_RTX`` when ``polygraphy.backend.trt`` is
first imported (its module-level ``trt = lazy_import_trt()`` captures the name), so the choice must be made
before that import and cannot change within one process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

from layerpair.errors import InputError, LayerpairError, MissingDependencyError

# CLI spelling -> (python module, pip requirement). Pins match pyproject's `trt` / `trt-rtx` extras.
BACKENDS: dict[str, tuple[str, str]] = {
    "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx-cu13==1.7.1.116"),
    "tensorrt": ("tensorrt", "tensorrt==10.13.3.9"),
}
POLYGRAPHY_REQUIREMENT = "polygraphy==0.53.6"
BACKEND_CHOICES = ("auto", *BACKENDS)
# `auto` prefers the datacenter build when both are installed: it is what a server deployment runs.
AUTO_ORDER = ("tensorrt", "tensorrt-rtx")

_active: str | None = None  # the backend Polygraphy was bound to in this process


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken half-installed package counts as absent
        return False


def install_hint() -> str:
    rtx, trt = BACKENDS["tensorrt-rtx"][1], BACKENDS["tensorrt"][1]
    return (
        f"pip install '{rtx}' '{POLYGRAPHY_REQUIREMENT}' (builds on CPU), or '{trt}' '{POLYGRAPHY_REQUIREMENT}' "
        "(NVIDIA GPU machines); or pip install 'layerpair-export[trt-rtx]'"
    )


def resolve_backend(choice: str = "auto") -> str:
    """The backend name for ``--trt-backend choice``; raises before anything heavy is imported."""
    if choice not in BACKEND_CHOICES:
        raise InputError(f"--trt-backend '{choice}' is not known", f"choose one of {', '.join(BACKEND_CHOICES)}")
    if choice == "auto":
        found = [b for b in AUTO_ORDER if _installed(BACKENDS[b][0])]
        if not found:
            raise MissingDependencyError(
                "--trt needs TensorRT, but neither tensorrt nor tensorrt_rtx is installed", install_hint()
            )
        name = found[0]
    else:
        name = choice
        module, req = BACKENDS[name]
        if not _installed(module):
            raise MissingDependencyError(
                f"--trt-backend {name} needs the '{module}' module, which is not installed",
                f"pip install '{req}' '{POLYGRAPHY_REQUIREMENT}'",
            )
    if not _installed("polygraphy"):
        raise MissingDependencyError(
            "--trt builds engines through Polygraphy, which is not installed", f"pip install '{POLYGRAPHY_REQUIREMENT}'"
        )
    return name


@dataclass(frozen=True)
class Backend:
    name: str  # "tensorrt" | "tensorrt-rtx"
    module_name: str
    version: str
    trt: Any  # the imported module

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def has_strongly_typed_flag(self) -> bool:
        """TensorRT 10 needs the STRONGLY_TYPED network flag; TensorRT 11 and TRT-RTX are typed by design (RTX
        still accepts the flag, TensorRT 11 dropped it)."""
        flags = getattr(self.trt, "NetworkDefinitionCreationFlag", None)
        return flags is not None and hasattr(flags, "STRONGLY_TYPED")

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "module": self.module_name, "version": self.version}


def load_backend(name: str) -> Backend:
    """Import ``name``'s module and bind Polygraphy to it (once per process)."""
    global _active
    if name not in BACKENDS:
        raise InputError(f"TensorRT backend '{name}' is not known", f"choose one of {', '.join(BACKENDS)}")
    if _active is not None and _active != name:
        raise LayerpairError(
            f"this process already uses TensorRT backend '{_active}'; Polygraphy cannot switch to '{name}'",
            "run each backend in its own process",
        )
    rtx = name == "tensorrt-rtx"
    if _active is None and "polygraphy.backend.trt" in sys.modules:
        import polygraphy.config as pg_config

        if pg_config.USE_TENSORRT_RTX != rtx:
            raise LayerpairError(
                f"Polygraphy was imported for the other TensorRT backend before '{name}' was chosen",
                "set POLYGRAPHY_USE_TENSORRT_RTX=1 (tensorrt-rtx) or 0 (tensorrt) before starting",
            )
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if rtx else "0"
    if "polygraphy.config" in sys.modules:
        pg_config_mod: Any = sys.modules["polygraphy.config"]
        pg_config_mod.USE_TENSORRT_RTX = rtx
    module_name = BACKENDS[name][0]
    try:
        trt = importlib.import_module(module_name)
    except ImportError as e:  # installed (find_spec) but its shared libraries do not load
        raise MissingDependencyError(
            f"'{module_name}' is installed but does not import ({e})",
            f"reinstall it: pip install '{BACKENDS[name][1]}'",
        ) from None
    _active = name
    return Backend(name, module_name, str(trt.__version__), trt)
