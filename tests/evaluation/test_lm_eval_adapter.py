"""The lm-evaluation-harness adapter answers the harness's three request types exactly as computed by hand from
the model's logits, and agrees with ``eval --mc`` scoring. lm_eval is optional: scripts/test.sh installs it
without its dependencies into .cache/lm_eval (only its API modules are used here; no task is downloaded)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from layerpair.evaluation.data import MCItem
from layerpair.evaluation.metrics import TorchBackend, mc_metrics

_LM_EVAL = os.environ.get("LAYERPAIR_LM_EVAL_DIR")
if _LM_EVAL and _LM_EVAL not in sys.path:
    sys.path.append(_LM_EVAL)
pytest.importorskip("lm_eval", reason="lm_eval not installed (scripts/test.sh puts it in .cache/lm_eval)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from layerpair.evaluation.lm_eval_adapter import LayerpairLM  # noqa: E402


@pytest.fixture(scope="module")
def lm(tiny_checkpoint_with_tokenizer: Path) -> LayerpairLM:
    lm = LayerpairLM(model=str(tiny_checkpoint_with_tokenizer), pairs="1-2", batch_size=3, max_length=24)
    lm.tokenizer.eos_token = "<unk>"  # the tiny tokenizer has no EOS; the harness needs one (its prefix token)
    return lm


def _req(kind: str, *args: Any) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)  # type: ignore[arg-type]


def _logp(lm: LayerpairLM, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(lm.backend.logits(torch.tensor([ids]))[0].double(), -1)


def test_registered_under_layerpair(tiny_checkpoint_with_tokenizer: Path) -> None:
    assert get_model("layerpair") is LayerpairLM
    from layerpair.errors import InputError

    bare = LayerpairLM(model=str(tiny_checkpoint_with_tokenizer))
    with pytest.raises(InputError, match="neither an EOS nor a BOS"):
        _ = bare.eot_token_id


def test_loglikelihood_by_hand(lm: LayerpairLM) -> None:
    reqs = [("The quick brown", " fox"), ("All that glitters is not ", "gold"), ("", "The quick")]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in reqs])
    for (ctx, cont), (ll, greedy) in zip(reqs, got, strict=True):
        if ctx:
            c_ids = lm.tok_encode(ctx.rstrip())
            x_ids = lm.tok_encode(ctx + cont)[len(c_ids) :]  # trailing spaces move to the continuation
        else:
            c_ids, x_ids = [lm.eot_token_id], lm.tok_encode(cont)
        lp = _logp(lm, c_ids + x_ids)
        pos = range(len(c_ids) - 1, len(c_ids) + len(x_ids) - 1)
        assert ll == pytest.approx(sum(float(lp[p, t]) for p, t in zip(pos, x_ids, strict=True)), rel=1e-6)
        assert greedy == all(int(lp[p].argmax()) == t for p, t in zip(pos, x_ids, strict=True))
    assert got[0][0] != pytest.approx(got[1][0])


def test_rolling_covers_every_token_once(lm: LayerpairLM) -> None:
    """The harness's rolling rule, by hand: windows of W = max_length predicted tokens; the first is conditioned
    on the prefix token, each later full window on the one token before it, and the last (partial) window on
    as many preceding tokens as fill it up to W tokens of input."""
    text = "The quick brown fox jumps over the lazy dog. " * 5
    ids = lm.tok_encode(text)
    W = lm.max_length
    assert len(ids) > 2 * W and len(ids) % W  # two full windows and a partial one
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])

    def score(ctx: list[int], cont: list[int]) -> float:
        lp = _logp(lm, ctx + cont)
        return sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))

    want = score([lm.eot_token_id], ids[:W])
    done = W
    while done < len(ids):
        p = min(W, len(ids) - done)
        end = done + p
        want += score(ids[end - W - 1 : end - p], ids[done:end])
        done = end
    assert got == pytest.approx(want, rel=1e-6)
    (short,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", "The quick brown fox")])
    assert short == pytest.approx(score([lm.eot_token_id], lm.tok_encode("The quick brown fox")), rel=1e-6)


def test_generate_until_is_greedy_and_stops(lm: LayerpairLM) -> None:
    ctx = "The quick brown"
    (free,) = lm.generate_until([_req("generate_until", ctx, {"until": ["\n\n\n\n"], "max_gen_toks": 5})])
    ids = lm.tok_encode(ctx)
    new: list[int] = []
    for _ in range(5):
        nxt = int(lm.backend.logits(torch.tensor([ids + new]))[0, -1].argmax())
        if nxt == lm.eot_token_id:
            break
        new.append(nxt)
    assert free == lm.tokenizer.decode(new).split("\n\n\n\n")[0]
    if free.strip():
        stop = free.strip()[-1]
        (cut,) = lm.generate_until([_req("generate_until", ctx, {"until": [stop], "max_gen_toks": 5})])
        assert stop not in cut and free.startswith(cut)
    from layerpair.errors import InputError

    with pytest.raises(InputError, match="greedily"):
        lm.generate_until([_req("generate_until", ctx, {"do_sample": True, "temperature": 0.7})])


def test_agrees_with_eval_mc(lm: LayerpairLM) -> None:
    items = [MCItem("The quick brown", ["fox", "dog", "sky"], 0)]
    assert isinstance(lm.backend, TorchBackend)
    mc = mc_metrics(lm.backend, items, lambda s: lm.tok_encode(s))
    got = lm.loglikelihood([_req("loglikelihood", "The quick brown", " " + c) for c in items[0].choices])
    assert [ll for ll, _ in got] == pytest.approx(mc.loglikelihoods[0], rel=1e-9)


def test_missing_lm_eval_is_one_clear_line(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from layerpair.errors import LayerpairError\n"
        "try:\n    import layerpair.evaluation.lm_eval_adapter\n"
        "except LayerpairError as e:\n    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "needs the 'lm_eval' package" in r.stdout and "pip install lm_eval==0.4.13" in r.stdout, r.stderr
