"""A target model ready to use: the native runtime, its tokenizer, its stop tokens and prompt encoding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from eagle3.fetch import DEFAULT_TARGET, resolve_model
from eagle3.runtimes.cpu_layout import for_device
from eagle3.runtimes.model import Transformer, load_model
from eagle3.runtimes.native_weights import to_native
from eagle3.runtimes.norm_folding import fold_norms
from eagle3.paths import eagle3_home

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# What runs the target's forward passes (--runtime): eagle3's PyTorch model; the same model with its weights
# on eagle3's native CPU kernels, fp32, int8 or w8a8, and its decoder layers one native call per verify
# (native_weights.py, native_forward.py); or its graph compiled by OpenVINO for the CPU with fp32 or int8
# weights (openvino_runtime.py).
RUNTIMES = ("torch", "native", "native-int8", "native-w8a8", "openvino", "openvino-int8")
AUTO_RUNTIME = "auto"  # the commands' default: see choose_runtime


def choose_runtime(dtype: str | torch.dtype = "float32", device: str | None = None) -> str:
    """What `--runtime auto` runs: the native kernels in fp32 where the target runs on the CPU in float32 and
    the kernels build here (a C++ compiler), the PyTorch model otherwise (a GPU, another dtype). fp32 only:
    the int8 precisions change the output, so they stay the user's choice."""
    from eagle3.runtimes import native
    from eagle3.runtimes.model import default_device

    on_cpu = torch.device(device).type == "cpu" if device is not None else default_device().type == "cpu"
    return "native" if on_cpu and _float32(dtype) and native.library() is not None else "torch"


def _float32(dtype: str | torch.dtype) -> bool:
    return dtype in ("float32", "fp32", torch.float32)


class PromptTooLong(ValueError):
    """The prompt leaves no room in the model's context for a single new token."""


@dataclass
class Target:
    name: str
    path: Path
    model: Transformer
    tokenizer: object  # a transformers tokenizer
    eos_token_ids: frozenset[int]
    runtime: str = "torch"  # what runs the forward passes (RUNTIMES)

    @property
    def context(self) -> int:
        return self.model.config.context_length

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        """Token ids of a prompt: raw (with the tokenizer's own special tokens, e.g. BOS) or through the
        tokenizer's chat template as one user turn."""
        if not chat:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.encode_chat(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered by the tokenizer's chat template, ready for the assistant."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.name} has no chat template; run without --chat")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens but {self.name} has a context of {self.context} "
                "tokens, which leaves no room to generate"
            )


def load_target(
    name_or_path: str = DEFAULT_TARGET, dtype: str | torch.dtype = "float32", device: str | None = None,
    runtime: str = "torch",
) -> Target:
    """Fetches (if needed) and loads a target by preset name, local folder or hub id, for a runtime (RUNTIMES, or
    "auto": choose_runtime's pick)."""
    from transformers import AutoTokenizer

    if runtime == AUTO_RUNTIME:
        runtime = choose_runtime(dtype, device)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {AUTO_RUNTIME}, {', '.join(RUNTIMES)}")
    if runtime != "torch":  # (the others build their own weights from fp32 ones, on the CPU)
        if not _float32(dtype) or (device is not None and torch.device(device).type != "cpu"):
            raise ValueError(f"--runtime {runtime} runs on the CPU from float32 weights (int8 is its own choice); "
                             "drop --dtype and --device")  # fmt: skip
        if runtime.startswith("openvino"):
            from eagle3.runtimes.openvino_runtime import require_openvino

            require_openvino()
        device = "cpu"

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = resolve_model(name_or_path)
    hint = _rebuild_hint(path)
    try:
        # Post-load steps, outside the model's definition: norms into matmuls (every device and runtime) ...
        model = fold_norms(load_model(path, dtype=dtype, device=device))
    except (ValueError, OSError) as err:
        if not hint:
            raise
        raise ValueError(f"{err}{hint}") from None
    # ... then the runtime's: the device's weight layout (on a CPU, few-row copies of the folded matrices), or
    # the native kernels' (fp32, int8 or w8a8); OpenVINO builds its own graph from the folded model.
    if runtime == "torch":
        model = for_device(model)
    elif runtime.startswith("native"):
        model = to_native(model, runtime.removeprefix("native-") if "-" in runtime else "fp32")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many types for a broken tokenizer folder
        raise ValueError(f"could not load the tokenizer in {path} ({type(err).__name__}: {err}){hint}") from None
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    if runtime.startswith("openvino"):
        from eagle3.runtimes.openvino_runtime import check_supported

        check_supported(model)
    return Target(name=name_or_path, path=path, model=model, tokenizer=tokenizer, eos_token_ids=frozenset(eos),
                  runtime=runtime)  # fmt: skip


def _rebuild_hint(path: Path) -> str:
    """For a model eagle3 built in its cache: how to have it built again."""
    models = eagle3_home() / "models"
    return f"; delete {path} to have eagle3 build it again" if models in path.resolve().parents else ""


def encode_messages(target: Target, messages: list[dict]) -> list[int]:
    """A conversation's token ids: the chat template when the tokenizer has one; otherwise the turns' text, one
    per line (base models such as stories260K)."""
    if getattr(target.tokenizer, "chat_template", None):
        return target.encode_chat(messages)
    return target.encode("\n".join(m["content"] for m in messages))
