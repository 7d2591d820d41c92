"""Greedy generation against a Triton server holding a ``layerpair-export triton`` repository.

    python client.py --model layerpair_generate --prompt "What is the capital of France?"   # python model
    python client.py --model layerpair_onnx --prompt "..." --tokenizer REPO/tokenizer        # stateful decoder

Needs ``tritonclient[http]`` (and ``transformers`` for the stateful models, which take token ids). Copied into
the repository as ``client.py``; also importable (``generate_text``, ``generate_stateful``) for tests.

Stateful protocol (see layerpair/deploy/triton.py): one sequence id per generation; the first request sets
``sequence_start``; Triton feeds the KV cache back as implicit state; its initial state holds one zero position
that ``attention_mask``'s leading 0 masks out; position ids count real tokens; the last request sets
``sequence_end`` (an extra 1-token request when generation stops early, so the batch slot is freed at once).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

try:
    from layerpair.decode import decode, greedy
except ImportError:  # the copy in a model repository: the decode core is lp_runtime.py beside it
    from lp_runtime import decode, greedy  # type: ignore[no-redef]


def _client(url: str) -> Any:
    import tritonclient.http as httpclient

    return httpclient.InferenceServerClient(url=url)


def generate_text(url: str, model: str, prompt: str, max_new_tokens: int = 64, timeout_s: float = 600) -> str:
    """The python-backend model: text in, text out."""
    import tritonclient.http as httpclient

    c = _client(url)
    p = httpclient.InferInput("PROMPT", [1], "BYTES")
    p.set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    n = httpclient.InferInput("MAX_NEW_TOKENS", [1], "INT32")
    n.set_data_from_numpy(np.array([max_new_tokens], dtype=np.int32))
    res = c.infer(model, [p, n], outputs=[httpclient.InferRequestedOutput("TEXT")], timeout=int(timeout_s * 1e6))
    out = res.as_numpy("TEXT").reshape(-1)[0]
    return out.decode("utf-8") if isinstance(out, bytes) else str(out)


def _names(config: dict[str, Any]) -> tuple[str, str, str, str]:
    """input_ids, attention_mask, position_ids, logits from the served config (IOSpec order)."""
    ins = [i["name"] for i in config["input"]]
    return ins[0], ins[1], ins[2], config["output"][0]["name"]


def _infer_inputs(arrays: dict[str, np.ndarray]) -> list[Any]:
    import tritonclient.http as httpclient

    inputs = []
    for name, a in arrays.items():
        t = httpclient.InferInput(name, list(a.shape), "INT64")
        t.set_data_from_numpy(a)
        inputs.append(t)
    return inputs


class _ServerStep:
    """One request of a Triton sequence as a step of the decode loop: the KV cache lives in the server (the loop's
    state is unused), the first request starts the sequence and the ``max_new_tokens``-th ends it. After ``end()``
    a request only ends the sequence early (no logits asked; the loop gets zeros it never uses)."""

    def __init__(self, c: Any, model: str, names: tuple[str, str, str, str], max_new_tokens: int) -> None:
        self.c, self.model, self.names, self.max_new_tokens = c, model, names, max_new_tokens
        self.seq = random.randint(1, 2**62)
        self.calls, self.ending = 0, False

    def end(self) -> None:
        self.ending = True

    def __call__(self, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, state: Any) -> tuple[np.ndarray, Any]:
        import tritonclient.http as httpclient

        ids_name, mask_name, pos_name, logits_name = self.names
        inputs = _infer_inputs({ids_name: ids, mask_name: mask, pos_name: pos})
        self.calls += 1
        if self.ending:  # free the sequence slot now instead of after max_sequence_idle_microseconds
            self.c.infer(self.model, inputs, sequence_id=self.seq, sequence_end=True)
            return np.zeros((1, 1, 1), np.float32), state
        res = self.c.infer(
            self.model,
            inputs,
            outputs=[httpclient.InferRequestedOutput(logits_name)],
            sequence_id=self.seq,
            sequence_start=self.calls == 1,
            sequence_end=self.calls == self.max_new_tokens,
        )
        return res.as_numpy(logits_name), state


def generate_stateful(
    url: str, model: str, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy decode against the onnxruntime/tensorrt model with the KV cache held by Triton, through the one
    decode loop (``layerpair.decode``; ``lp_runtime.py`` beside this script in a model repository)."""
    c = _client(url)
    step = _ServerStep(c, model, _names(c.get_model_config(model)), max_new_tokens)
    S = len(prompt_ids)
    ids = np.asarray([list(prompt_ids)], np.int64)  # [1,S]
    mask = np.asarray([[0] + [1] * S], np.int64)  # [1,1+S]: the leading 0 masks the initial zero slot
    loop = decode(step, ids, None, max_new_tokens, greedy, mask, np.arange(S, dtype=np.int64)[None])
    out: list[int] = []
    for tok_B, _ in loop:
        out.append(int(tok_B[0]))
        if out[-1] in stop_ids:
            if len(out) < max_new_tokens:  # one more request, that only ends the sequence
                step.end()
                next(loop)
            break
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8000", help="Triton HTTP endpoint (default 127.0.0.1:8000)")
    p.add_argument("--model", default="layerpair_generate", help="model name in the repository")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tokenizer", type=Path, default=Path(__file__).parent / "tokenizer", help="for stateful models")
    p.add_argument("--no-chat-template", action="store_true")
    args = p.parse_args(argv)
    config = _client(args.url).get_model_config(args.model)
    if config.get("backend") == "python":
        print(generate_text(args.url, args.model, args.prompt, args.max_new_tokens))
        return 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.tokenizer))
    if getattr(tok, "chat_template", None) and not args.no_chat_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tok(args.prompt)["input_ids"])
    stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = generate_stateful(args.url, args.model, ids, args.max_new_tokens, stop)
    print(tok.decode(out, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
