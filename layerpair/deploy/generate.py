"""``layerpair-export generate OUT --prompt ...``: text from an export directory with ONNX Runtime.

    export_from_dir -> (report, DecoderIO, model path)      names from report.json["io"] (the IOSpec JSON)
    generator_from_export -> OrtGenerator                     the one decode loop (layerpair/decode.py)
    prompt_ids_from_text -> token ids                         the saved tokenizer, chat template when it has one

``--compare`` also generates with the original PyTorch model (``report.json["model"]``, no pairs) from the
same prompt ids, so the effect of the pairs on the text is visible side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layerpair.decode import DecoderIO, OrtGenerator, RuntimeSpecError, Sampling
from layerpair.errors import InputError, MissingDependencyError
from layerpair.iospec import CacheSlot


@dataclass
class Export:
    directory: Path
    report: dict[str, Any]
    io: DecoderIO
    model_path: Path

    @property
    def state_pairs(self) -> list[tuple[str, str]]:
        return [(s.past, s.present) for s in self.io.states]


def state_pairs_from_io_json(io: dict[str, Any]) -> list[tuple[str, str]]:
    """IOSpec.state_pairs() rebuilt from the JSON's cache slots (names come from CacheSlot, never typed here)."""
    pairs: list[tuple[str, str]] = []
    for slot in io["cache_slots"]:
        s = CacheSlot(tuple(int(x) for x in slot["layers"]), int(slot["num_kv_heads"]))
        pairs += [(s.past_key, s.present_key), (s.past_value, s.present_value)]
    return pairs


def read_report(export_dir: Path) -> dict[str, Any]:
    path = Path(export_dir) / "report.json"
    if not Path(export_dir).is_dir():
        raise InputError(f"export directory '{export_dir}' does not exist", "pass the -o directory of an export")
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"'{export_dir}' has no report.json", "pass the -o directory of a finished export") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path} ({type(e).__name__})", "re-run the export") from None
    if not isinstance(report, dict) or not isinstance(report.get("io"), dict):
        raise InputError(f"{path} has no 'io' section", "re-export with this version of layerpair-export")
    return report


def export_from_dir(export_dir: Path, model_file: str | None = None) -> Export:
    """Read OUT/report.json and pair its I/O spec with the ONNX file it describes."""
    export_dir = Path(export_dir)
    report = read_report(export_dir)
    try:
        io = DecoderIO.from_json(report["io"], state_pairs_from_io_json(report["io"]))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(
            f"{export_dir}/report.json: unusable 'io' section ({e})", "re-export with this version of layerpair-export"
        ) from None
    name = model_file or report.get("onnx", {}).get("file", "model.onnx")
    path = export_dir / name
    if not path.is_file():
        raise InputError(f"'{path}' does not exist", "pass the directory of a finished export")
    return Export(export_dir, report, io, path)


def generator_from_export(
    export: Export, providers: Sequence[str] | None = None, threads: int | None = None
) -> OrtGenerator:
    try:
        return OrtGenerator(export.model_path, export.io, providers, threads)
    except RuntimeSpecError as e:
        raise InputError(str(e)) from None


def tokenizer_from_export(export_dir: Path) -> Any:
    import transformers

    tdir = Path(export_dir) / "tokenizer"
    if not tdir.is_dir():
        raise InputError(
            f"'{export_dir}' has no tokenizer/ (the checkpoint had none)", "export from a checkpoint with a tokenizer"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(tdir))
    except Exception as e:
        raise InputError(f"cannot load {tdir} ({type(e).__name__})", "re-run the export") from None


def prompt_ids_from_text(tokenizer: Any, prompt: str, chat: bool = True) -> list[int]:
    """The chat template (user turn + generation prompt) when the tokenizer has one and ``chat``; else raw text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def stop_ids_from_tokenizer(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [int(eos)] if eos is not None else []


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


def torch_text(
    report: dict[str, Any], prompt_ids: list[int], max_new: int, stop: list[int], sampling: Sampling | None
) -> list[int]:
    """Tokens from the original PyTorch model (no pairs) for the same prompt ids (loads the checkpoint)."""
    import torch

    from layerpair.exporter.loading import load_checkpoint

    say = lambda m: print(f"[layerpair] {m}", file=sys.stderr, flush=True)  # noqa: E731
    ck = load_checkpoint(str(report["model"]), say, keep_model=True)
    kw: dict[str, Any] = {"do_sample": False}
    if sampling is not None:
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        kw = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
    with torch.no_grad():
        out = ck.model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new,
            eos_token_id=stop or None,
            pad_token_id=stop[0] if stop else 0,
            **kw,
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


def generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerpair-export generate",
        description="Generate text with an exported decoder (ONNX Runtime, KV cache fed back).",
    )
    p.add_argument("export_dir", type=Path, metavar="OUT_DIR", help="directory written by layerpair-export")
    p.add_argument("--prompt", required=True, help="prompt text (a user turn when the tokenizer has a chat template)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    p.add_argument("--model-file", default=None, help="ONNX file inside OUT_DIR (default: report.json onnx.file)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--compare", action="store_true", help="also print the original PyTorch model's text")
    return p


def generate_cli(argv: Sequence[str]) -> int:
    args = generate_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}", "pass e.g. --max-new-tokens 64")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise InputError("--temperature must be > 0 and --top-p in (0, 1]", "pass e.g. --temperature 0.7 --top-p 0.9")
    sampling = Sampling(args.temperature, args.top_p, args.seed) if args.sample else None
    export = export_from_dir(args.export_dir, args.model_file)
    tok = tokenizer_from_export(args.export_dir)
    ids = prompt_ids_from_text(tok, args.prompt, chat=not args.no_chat_template)
    stop = stop_ids_from_tokenizer(tok)
    gen = generator_from_export(export, threads=args.threads)
    t = time.perf_counter()
    out = gen.generate(ids, args.max_new_tokens, stop, sampling)
    dt = time.perf_counter() - t
    text = decode(tok, out)
    pairs = export.report.get("pairs") or "none"
    if not args.compare:
        print(text)
    else:
        print(f"--- ONNX Runtime: {export.model_path} (pairs {pairs}) ---\n{text}")
    print(f"[layerpair] {len(ids)} prompt + {len(out)} new tokens in {dt:.2f} s", file=sys.stderr)
    if args.compare:
        try:
            ref = torch_text(export.report, ids, args.max_new_tokens, stop, sampling)
        except ImportError as e:
            raise MissingDependencyError(f"--compare needs torch ({e})", "pip install layerpair-export") from None
        print(f"--- PyTorch original: {export.report['model']} (no pairs) ---\n{decode(tok, ref)}")
        same = next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), min(len(out), len(ref)))
        print(f"[layerpair] first {same} generated tokens identical", file=sys.stderr)
    return 0
