"""Deploy fixtures: one tiny export (random Llama, pairs (1,2), a character tokenizer with a chat template),
built through the real export pipeline once per session."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from tests.conftest import tiny_model

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer(vocab_size: int = 128) -> object:
    """A fast character-level tokenizer (< vocab_size ids) with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT directory of `layerpair-export <tiny llama dir> --pairs 1-2 --triton REPO` (model.onnx, report.json,
    tokenizer/); the repository the flag wrote is OUT/../tiny-repo (see ``tiny_flag_repo``)."""
    from layerpair.cli import main

    root = tmp_path_factory.mktemp("deploy")
    ckpt = root / "tiny-llama"
    tiny_model("llama").save_pretrained(ckpt)
    char_tokenizer().save_pretrained(str(ckpt))  # type: ignore[attr-defined]
    out = root / "tiny-lp"
    assert main([str(ckpt), "--pairs", "1-2", "-o", str(out), "--triton", str(root / "tiny-repo")]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_flag_repo(tiny_export: Path) -> Path:
    """The model repository written by the export's ``--triton`` flag."""
    return tiny_export.parent / "tiny-repo"
