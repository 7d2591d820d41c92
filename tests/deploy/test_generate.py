"""ONNX Runtime generation (layerpair/decode.py, deploy/generate.py) on the tiny export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from layerpair.arch import ArchSpec
from layerpair.cli import main
from layerpair.decode import DecoderIO, RuntimeSpecError, Sampling, next_token
from layerpair.deploy.generate import export_from_dir, generator_from_export, state_pairs_from_io_json
from layerpair.iospec import IOSpec
from tests.conftest import tiny_config


def _reference_greedy(export: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens from the PyTorch Decoder (same pairs), recomputing the whole sequence each step (no cache)."""
    from layerpair.exporter.loading import load_checkpoint

    report = json.loads((export / "report.json").read_text())
    ck = load_checkpoint(report["model"])
    dec = ck.decoder([tuple(p) for p in report["pairs"]])
    empty = [torch.zeros(1, s.num_kv_heads, 0, ck.arch.head_dim) for s in dec.io.slots for _ in (0, 1)]
    ids = list(prompt)
    for _ in range(n):
        t = torch.tensor([ids])
        with torch.no_grad():
            logits = dec(t, torch.ones_like(t), torch.arange(len(ids))[None], *empty)[0]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_matches_pytorch_without_cache(tiny_export: Path) -> None:
    gen = generator_from_export(export_from_dir(tiny_export))
    prompt = [5, 17, 3, 99, 42, 7]
    assert gen.generate(prompt, 12) == _reference_greedy(tiny_export, prompt, 12)


def test_stop_token_ends_generation(tiny_export: Path) -> None:
    gen = generator_from_export(export_from_dir(tiny_export))
    prompt = [5, 17, 3]
    first = gen.generate(prompt, 1)[0]
    assert gen.generate(prompt, 10, stop_ids=[first]) == [first]


def test_sampling_seeded_and_top_p() -> None:
    logits = np.array([0.0, 5.0, 4.9, -3.0], np.float32)
    s = Sampling(temperature=1.0, top_p=0.5, seed=0)
    rng = np.random.default_rng(0)
    assert {next_token(logits, s, rng) for _ in range(50)} == {1}  # token 1 alone holds >= 50% of the mass
    s = Sampling(temperature=1.0, top_p=1.0, seed=0)
    a = [next_token(logits, s, np.random.default_rng(3)) for _ in range(5)]
    b = [next_token(logits, s, np.random.default_rng(3)) for _ in range(5)]
    assert a == b
    assert next_token(logits, None, None) == 1


def test_merged_spec_names_come_from_iospec() -> None:
    cfg = tiny_config("llama")
    spec = IOSpec.for_model(ArchSpec.from_hf_config(cfg), [(1, 2)], merged=True)
    io_json = spec.to_json()
    pairs = state_pairs_from_io_json(io_json)
    assert pairs == spec.state_pairs()
    assert ("past_key_values.1_2.key", "present.1_2.key") in pairs
    dio = DecoderIO.from_json(io_json, pairs)
    wide = next(s for s in dio.states if s.past == "past_key_values.1_2.key")
    assert wide.heads == 2 * cfg.num_key_value_heads
    assert dio.empty_state(1)["past_key_values.1_2.key"].shape == (1, 2 * cfg.num_key_value_heads, 0, 16)


def test_spec_with_unpaired_cache_input_rejected() -> None:
    spec = IOSpec.for_model(ArchSpec.from_hf_config(tiny_config("llama")))
    with pytest.raises(RuntimeSpecError, match="non-cache inputs"):
        DecoderIO.from_json(spec.to_json(), spec.state_pairs()[:-2])


def test_zero_slot_protocol_matches_plain_generation(tiny_export: Path) -> None:
    """The Triton implicit-state protocol, emulated on ORT: the first step sees one zero past position that a
    leading 0 in attention_mask hides; presents are fed back as pasts. Tokens must equal plain generation."""
    export = export_from_dir(tiny_export)
    gen = generator_from_export(export)
    prompt = [5, 17, 3, 99, 42, 7]
    want = gen.generate(prompt, 8)
    state = {s.past: np.zeros((1, s.heads, 1, s.head_dim), np.float32) for s in export.io.states}
    feed, real, got = prompt, 0, []
    for _ in range(8):
        S = len(feed)
        mask = np.asarray([[0] + [1] * (real + S)], np.int64)
        logits, state = gen.step(np.asarray([feed], np.int64), mask, np.arange(real, real + S)[None], state)
        got.append(int(logits[0, -1].argmax()))
        real, feed = real + S, [got[-1]]
    assert got == want


def test_cli_generate_greedy_and_sampled(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", str(tiny_export), "--prompt", "Hi", "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert rc == 0 and out.out.strip() != ""
    assert "new tokens" in out.err  # the token count goes to stderr, stdout holds only the text
    greedy = out.out
    rc = main(["generate", str(tiny_export), "--prompt", "Hi", "--max-new-tokens", "6", "--sample", "--seed", "1"])
    s1 = capsys.readouterr().out
    main(["generate", str(tiny_export), "--prompt", "Hi", "--max-new-tokens", "6", "--sample", "--seed", "1"])
    assert capsys.readouterr().out == s1  # seeded: reproducible
    main(["generate", str(tiny_export), "--prompt", "Hi", "--max-new-tokens", "6", "--no-chat-template"])
    raw = capsys.readouterr().out
    assert rc == 0 and raw.strip() != ""
    assert greedy.strip() != ""


def test_cli_generate_compare(tiny_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", str(tiny_export), "--prompt", "Hi", "--max-new-tokens", "5", "--compare"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--- ONNX Runtime" in out and "--- PyTorch original" in out


def test_cli_generate_bad_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", str(tmp_path / "nope"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "report.json").write_text("{}")
    rc = main(["generate", str(tmp_path), "--prompt", "x"])
    assert rc == 2 and "no 'io' section" in capsys.readouterr().err
