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


def generate_stateful(
    url: str, model: str, prompt_ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy decode against the onnxruntime/tensorrt model with the KV cache held by Triton."""
    import tritonclient.http as httpclient

    c = _client(url)
    ids_name, mask_name, pos_name, logits_name = _names(c.get_model_config(model))
    seq = random.randint(1, 2**62)
    feed, real, out = list(prompt_ids), 0, []  # real: positions in the cache (not counting the zero slot)
    for step in range(max_new_tokens):
        S = len(feed)
        arrays = {
            ids_name: np.asarray([feed], np.int64),  # [1,S]
            mask_name: np.asarray([[0] + [1] * (real + S)], np.int64),  # [1,1+T]: leading 0 = initial zero slot
            pos_name: np.arange(real, real + S, dtype=np.int64)[None],  # [1,S]
        }
        inputs = []
        for name, a in arrays.items():
            t = httpclient.InferInput(name, list(a.shape), "INT64")
            t.set_data_from_numpy(a)
            inputs.append(t)
        last = step == max_new_tokens - 1
        res = c.infer(
            model,
            inputs,
            outputs=[httpclient.InferRequestedOutput(logits_name)],
            sequence_id=seq,
            sequence_start=step == 0,
            sequence_end=last,
        )
        tok = int(np.argmax(res.as_numpy(logits_name)[0, -1]))
        out.append(tok)
        real += S
        feed = [tok]
        if tok in stop_ids:
            if not last:  # free the sequence slot now instead of after max_sequence_idle_microseconds
                end = dict(arrays)
                end[ids_name] = np.asarray([[tok]], np.int64)
                end[mask_name] = np.asarray([[0] + [1] * (real + 1)], np.int64)
                end[pos_name] = np.asarray([[real]], np.int64)
                ins = []
                for name, a in end.items():
                    t = httpclient.InferInput(name, list(a.shape), "INT64")
                    t.set_data_from_numpy(a)
                    ins.append(t)
                c.infer(model, ins, sequence_id=seq, sequence_end=True)
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
