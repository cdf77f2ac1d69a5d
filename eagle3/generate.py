"""Plain autoregressive decoding on the native runtime: prefill, then one token per forward."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from eagle3.sampling import SamplingParams, make_generator, next_token
from eagle3.stopping import Stopper, TextStreamer
from eagle3.target import Target


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    finish_reason: str  # "eos", "stop" or "length"
    prompt_tokens: int
    wall_s: float
    prefill_s: float
    method: str = "vanilla"

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "new_tokens": self.new_tokens, "tokens_per_s": self.tokens_per_s}


def room_for(target: Target, prompt_ids: Sequence[int], max_new_tokens: int) -> int:
    """How many new tokens fit: the budget, capped by what the context leaves after the prompt."""
    target.check_prompt(list(prompt_ids))
    if max_new_tokens < 1:
        raise ValueError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    return min(max_new_tokens, target.context - len(prompt_ids))


@torch.inference_mode()
def generate(
    target: Target,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    stop_strings: Sequence[str] = (),
    on_text: Callable[[str], object] | None = None,
) -> GenerationResult:
    """Greedy or sampled decoding of up to max_new_tokens after the prompt; streams text to on_text."""
    budget = room_for(target, prompt_ids, max_new_tokens)
    model = target.model
    stopper = Stopper(target.tokenizer, target.eos_token_ids, budget, tuple(stop_strings), track_text=on_text is not None)
    streamer = TextStreamer(on_text, stop_strings) if on_text else None
    generator = make_generator(sampling, model.device)
    start = time.perf_counter()
    model.empty_cache(len(prompt_ids) + budget)
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    logits = model(tokens, logits="last").logits[:, -1]
    token = next_token(logits, sampling, generator)
    prefill_s = time.perf_counter() - start
    while True:
        stopper.extend([token.item()])
        if streamer:
            streamer.update(stopper.text(), final=stopper.done)
        if stopper.done:
            break
        logits = model(token.view(1, 1), logits="last").logits[:, -1]
        token = next_token(logits, sampling, generator)
    wall_s = time.perf_counter() - start
    return GenerationResult(
        text=stopper.text(),
        token_ids=stopper.token_ids,
        finish_reason=stopper.finish_reason,
        prompt_tokens=len(prompt_ids),
        wall_s=wall_s,
        prefill_s=prefill_s,
    )
