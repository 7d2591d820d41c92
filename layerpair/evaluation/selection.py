"""``pairs_and_decoder``: the ``--pairs`` / ``--pairs auto`` / ``--heal`` flags become a Decoder plus report
entries. Shared by ``layerpair-export eval`` and the export pipeline, so both record the same choice."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from layerpair.errors import InputError
from layerpair.evaluation.data import (
    DEFAULT_WINDOW,
    Encode,
    check_text_arg,
    encoder,
    text_from_arg,
    windows_from_tokens,
)
from layerpair.evaluation.generated import GenSpec, bos_id, generated_windows
from layerpair.evaluation.heal import heal_pairs, refit_inputs_flag
from layerpair.evaluation.search import auto_pairs, parse_budget, save_frontier_plot
from layerpair.exporter.model import Decoder

Pairs = tuple[tuple[int, int], ...]
DEFAULT_HEAL_TOKENS = 16384
CALIB_SOURCES = ("generated", "text")
# Defaults without --calib / --heal-calib / --calib-text (measured in docs/accuracy.md, issue 15): the pair search
# reads the end of the evaluation text (pydoc topics), healing reads text sampled from the model itself.
DEFAULT_SEARCH_CALIB = "text"
DEFAULT_HEAL_CALIB = "generated"
Calib = Sequence[int] | torch.Tensor  # the tokens of a calibration text, or generated windows [N,L]


@dataclass
class Calibrations:
    """The calibration of each use: ``search`` (``--pairs auto``) and ``heal`` (``--heal``); None where unused.
    ``same_text``: a text calibration is the evaluation text itself (read from its end, must not overlap it)."""

    search: Calib | None
    heal: Calib | None
    same_text: bool = False
    report: dict[str, Any] = field(default_factory=dict)  # the report.json "calibration" entry, per use


@dataclass
class Selection:
    pairs: Pairs
    decoder: Decoder  # runs `pairs` (healed weights when --heal)
    report: dict[str, Any] = field(default_factory=dict)  # "auto" / "heal" entries for report.json


def with_pairs(dec: Decoder, pairs: Sequence[tuple[int, int]]) -> Decoder:
    """A Decoder running ``pairs`` that *shares* ``dec``'s weights (no copy)."""
    out = Decoder(dec.arch, tuple(pairs))
    src = dict(dec.named_parameters())
    for name, p in out.named_parameters():
        p.data = src[name].data
    return out.eval()


def calibration_windows(
    tokens: Sequence[int], n_tokens: int, window: int, eval_windows: torch.Tensor | None
) -> torch.Tensor:
    """The last ``n_tokens`` of ``tokens``; must not overlap ``eval_windows`` (the first tokens of the same text)."""
    cal = windows_from_tokens(tokens, window, n_tokens, from_end=True)
    if eval_windows is not None and eval_windows.numel() + cal.numel() > len(tokens):
        raise InputError(
            f"evaluation ({eval_windows.numel()} tokens) and calibration ({cal.numel()} tokens) would overlap in a "
            f"text of {len(tokens)} tokens",
            "pass a longer --text, a separate --calib-text, or fewer --tokens / --calib-tokens",
        )
    return cal


def select_pairs(
    a: argparse.Namespace,
    dec0: Decoder,
    calibs: Calibrations,
    eval_windows: torch.Tensor | None = None,
    progress: Callable[[str], None] | None = None,
) -> Selection:
    """Resolve ``a.pairs`` (explicit or ``auto``) and ``a.heal`` against the original-weights ``dec0``, each use
    calibrated on its own entry of ``calibs``: a text's tokens (read from its end) or generated windows [N,L]
    (read from the first row)."""
    from layerpair.exporter.pairs import parse_pairs

    say = progress or (lambda msg: None)
    window = getattr(a, "window", DEFAULT_WINDOW)
    auto = a.pairs.strip().lower() == "auto"
    report: dict[str, Any] = {}
    overlap = eval_windows if calibs.same_text else None
    if auto:
        assert calibs.search is not None, "calibration() provides the search calibration for --pairs auto"
        if isinstance(calibs.search, torch.Tensor):
            cal = generated_rows(calibs.search, a.calib_tokens, "--pairs auto", say)
        else:
            cal = calibration_windows(calibs.search, a.calib_tokens, window, overlap)
        budget = parse_budget(a.max_ppl_increase) if a.max_ppl_increase is not None else None
        res = auto_pairs(dec0, cal, budget, a.target_depth, beam=a.beam, progress=say)
        print(res.table())
        if a.plot is not None:
            save_frontier_plot(res, Path(a.plot))
            say(f"frontier plot: {a.plot}")
        pairs: Pairs = res.pairs
        report["auto"] = res.to_json()
    else:
        pairs = parse_pairs(a.pairs, dec0.arch.num_layers)
    if a.heal and pairs:
        assert calibs.heal is not None, "calibration() provides the heal calibration for --heal"
        heal_cal = _heal_calibration(a, calibs.heal, window, overlap, say)
        damping = a.heal_damping  # None: chosen per fit on held-out calibration windows
        how = "chosen on held-out windows" if damping is None else f"{damping:g}"
        inputs = refit_inputs_flag(a.heal_inputs)
        say(f"healing {len(pairs)} pairs on {heal_cal.numel()} calibration tokens (ridge damping {how}; input "
            f"projections refitted: {inputs or 'none'})")  # fmt: skip
        dec, rep = heal_pairs(dec0, pairs, heal_cal, damping=damping, progress=say, refit_inputs=inputs)
        report["heal"] = rep.to_json()
        return Selection(pairs, dec, report)
    return Selection(pairs, with_pairs(dec0, pairs), report)


def _heal_calibration(
    a: argparse.Namespace, calib: Calib, window: int, eval_windows: torch.Tensor | None, say: Callable[[str], None]
) -> torch.Tensor:
    """The ``--heal`` calibration windows: the first rows of generated windows, or the end of a text."""
    requested = getattr(a, "heal_tokens", None)
    if isinstance(calib, torch.Tensor):
        return generated_rows(calib, DEFAULT_HEAL_TOKENS if requested is None else requested, "--heal", say)
    used = eval_windows.numel() if eval_windows is not None else 0
    n_heal = heal_windows(calib, requested, window, used, say)
    return calibration_windows(calib, n_heal, window, eval_windows)


def generated_rows(windows: torch.Tensor, n_tokens: int, what: str, say: Callable[[str], None]) -> torch.Tensor:
    """The first whole rows of generated ``windows`` [N,L] holding ``n_tokens`` (rounded up; all when short)."""
    rows = -(-n_tokens // windows.shape[1])
    if rows > windows.shape[0]:
        say(f"{what}: the generated calibration holds {windows.numel()} tokens (asked {n_tokens}); using them all")
    return windows[:rows]


def gen_spec(a: argparse.Namespace) -> GenSpec:
    return GenSpec(getattr(a, "calib_samples", 64), getattr(a, "calib_length", 256), seed=getattr(a, "calib_seed", 0))


def calib_sources(a: argparse.Namespace) -> tuple[str, str]:
    """(search source, heal source). ``--calib`` sets both; ``--heal-calib`` overrides healing's. Without them:
    ``text`` for both when ``--calib-text`` is given (in-domain text), else DEFAULT_SEARCH_CALIB and
    DEFAULT_HEAL_CALIB."""
    both = getattr(a, "calib", None)
    given_text = a.calib_text is not None
    search = both if both is not None else ("text" if given_text else DEFAULT_SEARCH_CALIB)
    heal = getattr(a, "heal_calib", None) or both or ("text" if given_text else DEFAULT_HEAL_CALIB)
    return search, heal


def calibration(
    a: argparse.Namespace,
    dec0: Decoder,
    tokenizer: Any,
    encode: Encode,
    text_tokens: Sequence[int] | None,
    say: Callable[[str], None],
) -> Calibrations:
    """The calibration of each use (``--pairs auto`` search, ``--heal``) and the report.json entry saying which
    source each had: generated windows, or the tokens of ``--calib-text`` (else ``text_tokens``, else the default
    text). Nothing is generated or read for a use that is not in play."""
    auto = a.pairs.strip().lower() == "auto"
    search_src, heal_src = calib_sources(a)
    used = {"search": search_src if auto else None, "heal": heal_src if a.heal else None}
    found: dict[str, tuple[Calib, dict[str, Any]]] = {}  # one generation / one text read serves both uses
    for src in sorted({s for s in used.values() if s is not None}):
        if src == "generated":
            found[src] = _generated(a, dec0, tokenizer, encode, say)
        else:
            found[src] = _text(a, encode, text_tokens)
    search = found[search_src] if used["search"] else None
    heal = found[heal_src] if used["heal"] else None
    report = {use: c[1] for use, c in (("search", search), ("heal", heal)) if c is not None}
    return Calibrations(
        search=search[0] if search else None,
        heal=heal[0] if heal else None,
        same_text=a.calib_text is None and text_tokens is not None,
        report={"calibration": report},
    )


def _generated(
    a: argparse.Namespace, dec0: Decoder, tokenizer: Any, encode: Encode, say: Callable[[str], None]
) -> tuple[Calib, dict[str, Any]]:
    spec = gen_spec(a)
    windows, info = generated_windows(dec0, bos_id(tokenizer, encode), encode, spec, say)
    return windows, {"source": "generated", "temperature": spec.temperature, "seed": spec.seed, **info.to_json()}


def _text(a: argparse.Namespace, encode: Encode, text_tokens: Sequence[int] | None) -> tuple[Calib, dict[str, Any]]:
    if a.calib_text is None and text_tokens is not None:
        tokens = text_tokens
    else:
        tokens = encode(text_from_arg(a.calib_text, getattr(a, "text_field", "text")))
    if a.calib_text is not None:
        name = str(a.calib_text)
    else:
        name = "the end of the evaluation text" if text_tokens is not None else "the end of pydoc_data.topics"
    return tokens, {"source": "text", "text": name, "tokens": len(tokens)}


def heal_windows(
    tokens: Sequence[int], requested: int | None, window: int, used_by_eval: int, say: Callable[[str], None]
) -> int:
    """Calibration tokens for ``--heal``: ``--heal-tokens`` as given (strict), or by default DEFAULT_HEAL_TOKENS
    capped to what the text holds after the evaluation tokens (the ridge fits have 2 x intermediate features
    per pair, so they need many more tokens than the search; see docs/accuracy.md)."""
    if requested is not None:
        return requested
    room = (len(tokens) - used_by_eval) // window * window
    if room < window:
        return window  # calibration_windows raises the overlap error with the numbers
    if room < DEFAULT_HEAL_TOKENS:
        say(f"--heal: the text leaves {room} calibration tokens (default {DEFAULT_HEAL_TOKENS}); healing on those")
    return min(DEFAULT_HEAL_TOKENS, room)


def check_selection_args(a: argparse.Namespace) -> bool:
    """Validate the ``--pairs auto`` / ``--heal`` flags before anything loads; True when either is in use."""
    auto = a.pairs.strip().lower() == "auto"
    if auto:
        if a.max_ppl_increase is None and a.target_depth is None:
            raise InputError("--pairs auto needs a budget", "add --max-ppl-increase 5% and/or --target-depth N")
        if a.max_ppl_increase is not None:
            parse_budget(a.max_ppl_increase)
    elif a.max_ppl_increase is not None or a.target_depth is not None or a.plot is not None:
        raise InputError("--max-ppl-increase/--target-depth/--plot only apply to --pairs auto", "add --pairs auto")
    if a.heal_damping is not None and not a.heal_damping > 0:
        raise InputError(f"--heal-damping must be positive, got {a.heal_damping}", "pass e.g. 1e-2")
    if a.calib_tokens < 1:
        raise InputError(f"--calib-tokens must be >= 1, got {a.calib_tokens}", "pass e.g. 2048")
    heal_tokens = getattr(a, "heal_tokens", None)
    if heal_tokens is not None and heal_tokens < 1:
        raise InputError(f"--heal-tokens must be >= 1, got {heal_tokens}", f"pass e.g. {DEFAULT_HEAL_TOKENS}")
    check_text_arg(a.calib_text, "--calib-text")
    heal_calib = getattr(a, "heal_calib", None)
    if heal_calib is not None and not a.heal:
        raise InputError("--heal-calib only applies to --heal", "add --heal, or drop --heal-calib")
    if a.calib_text is not None and "text" not in _sources_in_play(a, auto):
        raise InputError(
            "--calib-text is given but no calibration reads it (--calib generated / --heal-calib generated)",
            "drop --calib-text, or pass --calib text / --heal-calib text",
        )
    gen_spec(a).check()  # bad --calib-samples/--calib-length/--calib-seed fail even where they are not used
    return auto or bool(a.heal)


def _sources_in_play(a: argparse.Namespace, auto: bool) -> set[str]:
    search, heal = calib_sources(a)
    return ({search} if auto else set()) | ({heal} if a.heal else set())


def export_selection(a: argparse.Namespace) -> Callable[[Any], tuple[Decoder, dict[str, Any]]] | None:
    """For the export pipeline: None for a plain ``--pairs`` spec (nothing is generated or read), else
    ``decoder_for(checkpoint)`` that searches (``--pairs auto``) and/or heals (``--heal``) and returns the Decoder
    to export plus the ``auto``/``heal``/``calibration`` entries for report.json. Calibration by default: the
    search reads the *end* of the pydoc topics text (so ``layerpair-export eval`` on its default text, which
    reads the start, stays held out), healing reads text sampled from the model itself; ``--calib-text`` is
    used for both; ``--calib`` sets both, ``--heal-calib`` healing's alone."""
    if not check_selection_args(a):
        return None

    def decoder_for(ckpt: Any) -> tuple[Decoder, dict[str, Any]]:
        if ckpt.tokenizer is None:
            raise InputError("--pairs auto / --heal need the model's tokenizer", "use a checkpoint that ships one")
        dec0 = ckpt.decoder(())
        say = progress_to_stderr
        calibs = calibration(a, dec0, ckpt.tokenizer, encoder(ckpt.tokenizer), None, say)
        sel = select_pairs(a, dec0, calibs, progress=say)
        return sel.decoder, {**sel.report, **calibs.report}

    return decoder_for


def progress_to_stderr(msg: str) -> None:
    import sys

    print(f"[layerpair] {msg}", file=sys.stderr, flush=True)
