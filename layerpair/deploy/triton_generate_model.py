"""Triton python-backend model: PROMPT (text) -> tokenize -> ONNX Runtime decode loop -> TEXT (+ TOKENS).

Copied by ``layerpair-export triton`` into ``<name>_generate/1/model.py`` next to ``lp_runtime.py`` (a copy of
``layerpair/decode.py``, the decode core), ``decoder.onnx``, ``io.json`` (I/O spec + state pairs) and ``tokenizer/``.
Needs numpy, onnxruntime (or onnxruntime-gpu) and transformers in the Triton python environment; not layerpair.

Inputs:  PROMPT [1] string (a user turn; the chat template is applied when the tokenizer has one),
         MAX_NEW_TOKENS [1] int32, optional (default: the config parameter ``max_new_tokens``).
Outputs: TEXT [1] string, TOKENS [n] int64 (generated ids, stop token included).
"""

from __future__ import annotations

import json
import os
import site
import sys
from typing import Any


def _apply_pythonpath() -> None:
    """Triton's python stub runs an isolated interpreter (``sys.flags.ignore_environment``), so PYTHONPATH is
    silently ignored; re-apply it (as site dirs, so .pth files of editable installs work). This lets the stub use
    a virtualenv's packages: ``PYTHONPATH=$VENV/lib/python3.X/site-packages tritonserver ...``. In the Triton
    container, pip-install the packages instead (or use the backend's EXECUTION_ENV_PATH)."""
    for p in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if p and p not in sys.path:
            site.addsitedir(p)


_apply_pythonpath()

import numpy as np  # noqa: E402

try:  # only inside Triton's python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (tests, linters)
    pb_utils = None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        here = os.path.join(args["model_repository"], args["model_version"])
        if here not in sys.path:
            sys.path.insert(0, here)
        import onnxruntime as ort
        from lp_runtime import DecoderIO, OrtGenerator
        from transformers import AutoTokenizer

        config = json.loads(args["model_config"])
        self.default_max_new = int(config["parameters"]["max_new_tokens"]["string_value"])
        with open(os.path.join(here, "io.json")) as fh:
            spec = json.load(fh)
        providers: list[Any] = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}), *providers]
        self.generator = OrtGenerator(
            os.path.join(here, spec["model_file"]), DecoderIO.from_json(spec["io"], spec["state_pairs"]), providers
        )
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(here, "tokenizer"))
        eos = self.tokenizer.eos_token_id
        self.stop = [int(eos)] if eos is not None else []

    def _prompt_ids(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt)["input_ids"])

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0]
                prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
                mnt = pb_utils.get_input_tensor_by_name(request, "MAX_NEW_TOKENS")
                max_new = int(mnt.as_numpy().reshape(-1)[0]) if mnt is not None else self.default_max_new
                if max_new < 1:
                    raise ValueError(f"MAX_NEW_TOKENS must be >= 1, got {max_new}")
                out = self.generator.generate(self._prompt_ids(prompt), max_new, self.stop)
                text = str(self.tokenizer.decode(out, skip_special_tokens=True))
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("TEXT", np.array([text.encode("utf-8")], dtype=np.object_)),
                            pb_utils.Tensor("TOKENS", np.asarray(out, dtype=np.int64)),
                        ]
                    )
                )
            except Exception as e:  # one bad request must not take the model down
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}")))
        return responses

    def finalize(self) -> None:
        self.generator = None  # type: ignore[assignment]
