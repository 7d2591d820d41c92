"""lm-evaluation-harness adapter: any harness task on a layer-parallel model (PyTorch, or an exported ONNX).

    import lm_eval
    from layerpair.evaluation.lm_eval_adapter import LayerpairLM   # registers --model layerpair

    lm = LayerpairLM(model="smollm2-135m", pairs="20:24")           # or onnx="out/smollm2-135m-lp20-24"
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "arc_easy"])
    # or: lm_eval.simple_evaluate(model="layerpair", model_args="model=smollm2-135m,pairs=20:24", tasks=[...])

The harness does the task work (datasets, prompts, metrics); this class answers its three request types with
the harness's own conventions: ``TemplateLM`` splits context/continuation and puts the prefix token before an
empty context, rolling log-likelihoods use the harness's disjoint windows of ``max_length`` with one token of
context, ``is_greedy`` is the argmax test over the continuation, and ``generate_until`` is greedy decoding
(sampling requests are refused: the harness's generative tasks here are greedy). lm_eval is optional: it is not
a dependency of layerpair-export (``pip install lm_eval==0.4.13``) and this module fails with one line without
it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from layerpair.errors import InputError
from layerpair.evaluation.metrics import LogitsBackend, OnnxBackend, TorchBackend, continuation_logprobs
from layerpair.evaluation.selection import with_pairs

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - exercised by test_lm_eval_adapter's subprocess check
    raise InputError(
        "the lm-evaluation-harness adapter needs the 'lm_eval' package", "pip install lm_eval==0.4.13"
    ) from None


@register_model("layerpair")
class LayerpairLM(TemplateLM):  # type: ignore[misc]
    """A checkpoint with ``pairs`` run in parallel, scored by the reference PyTorch decoder or an ONNX export."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        pairs: str = "none",
        onnx: str | None = None,
        batch_size: int | str = 8,
        max_length: int | str = 2048,
        max_gen_toks: int | str = 256,
        **_: Any,
    ) -> None:
        super().__init__()
        from layerpair.exporter.loading import load_checkpoint
        from layerpair.exporter.pairs import parse_pairs

        ck = load_checkpoint(model)
        if ck.tokenizer is None:
            raise InputError(f"model '{model}' has no tokenizer", "use a checkpoint that ships one")
        self.tokenizer = ck.tokenizer
        dec0 = ck.decoder(())
        self.pairs = parse_pairs(pairs, ck.arch.num_layers)
        self.backend: LogitsBackend
        if onnx is not None:
            path = Path(onnx)
            self.backend = OnnxBackend(path if path.suffix == ".onnx" else path / "model.onnx")
        else:
            self.backend = TorchBackend(with_pairs(dec0, self.pairs))
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # ---- TemplateLM ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """EOS (the harness's prefix of empty contexts and end of generation), else BOS."""
        for tid in (self.tokenizer.eos_token_id, self.tokenizer.bos_token_id):
            if tid is not None:
                return int(tid)
        raise InputError("the tokenizer defines neither an EOS nor a BOS token", "use a tokenizer that has one")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        reqs = []
        for _, ctx, cont in requests:
            if not cont:
                raise InputError("a continuation encodes to no tokens", "check the task's answer choices")
            reqs.append(((ctx + cont)[-(self.max_length + 1) :], len(cont)))  # left-truncate like the harness
        return continuation_logprobs(self.backend, reqs, self.batch_size)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            reqs = [(ctx + cont, len(cont)) for ctx, cont in windows]
            out.append(sum(ll for ll, _ in continuation_logprobs(self.backend, reqs, self.batch_size)))
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in (r.args for r in requests):
            kw = dict(gen_kwargs or {})
            if kw.get("do_sample") and float(kw.get("temperature", 1.0)) > 0:
                raise InputError("layerpair's lm-eval adapter decodes greedily only", "run the task without sampling")
            until = kw.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tok_encode(context)[-self.max_length :]
            new: list[int] = []
            text = ""
            for _ in range(int(kw.get("max_gen_toks", self.max_gen_toks))):
                # Whole-sequence forward per token (no cache): simple and exact, slow for long generations.
                nxt = int(self.backend.logits(torch.tensor([ids + new]))[0, -1].argmax())
                if nxt == self.eot_token_id:
                    break
                new.append(nxt)
                text = self.tokenizer.decode(new)
                if any(s in text for s in until):
                    break
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out
