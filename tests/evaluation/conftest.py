"""Fixtures for the evaluation tests: a tiny Llama as a Decoder, a tiny trained tokenizer, one tiny export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layerpair.arch import ArchSpec
from layerpair.exporter.model import Decoder
from tests.conftest import tiny_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "All that glitters is not gold. Where there is smoke there is fire. Actions speak louder than words. "
) * 8


@pytest.fixture(scope="session")
def tiny_llama() -> Decoder:
    m = tiny_model("llama", seed=1, num_hidden_layers=6)
    with torch.no_grad():  # larger weights: a random tiny model is otherwise near-uniform and pairs change nothing
        for name, p in m.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(4.0)
            if name == "lm_head.weight":
                p.mul_(20.0)
    return Decoder.from_hf(m, ArchSpec.from_hf_config(m.config), ())


def sample_text(dec: Decoder, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] tokens sampled (temperature 1) from ``dec`` with its own plan, starting from random tokens."""
    from layerpair.evaluation.forward import logits_from_ids

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, dec.arch.vocab_size, (n, 1), generator=g)
    with torch.no_grad():
        while ids.shape[1] < length:
            probs = torch.softmax(logits_from_ids(dec, ids)[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BPE tokenizer with <= 128 ids (the tiny models' vocab), trained on TEXT, saved HF-style."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>"], limit_alphabet=60, show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    d = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_checkpoint_with_tokenizer(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    import shutil

    d = tmp_path_factory.mktemp("ckpt-tok") / "llama"
    tiny_model("llama", seed=1, num_hidden_layers=6).save_pretrained(d)
    for f in tiny_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d
