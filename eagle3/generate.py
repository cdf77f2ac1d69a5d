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


@torch.inference_mode()
def generate_batch(
    target: Target,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
) -> list[GenerationResult]:
    """Plain decoding of several prompts at once (for throughput: regenerating training data), greedy or
    sampled; each result is what `generate` gives for that prompt alone, up to float summation order.

    Prompts are left-padded to one length; padding slots are masked out of attention and positions start
    at 0 at each prompt's first real token. Finished rows keep decoding (cheaper than reshaping the cache)
    until every row is done; their extra tokens are dropped.
    """
    if not prompts:
        return []
    budgets = [room_for(target, p, max_new_tokens) for p in prompts]
    model, device = target.model, target.model.device
    B, width = len(prompts), max(len(p) for p in prompts)
    steps = max(budgets)
    pads = torch.tensor([width - len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, width, dtype=torch.long, device=device)  # id 0 on padding: masked anyway
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
    slots = torch.arange(width + steps, device=device)
    key_mask = slots[None, :] >= pads[:, None]  # [B, slots]: False on each row's padding
    stoppers = [Stopper(target.tokenizer, target.eos_token_ids, b) for b in budgets]
    generator = make_generator(sampling, device)
    start = time.perf_counter()
    model.empty_cache(width + steps, batch_size=B, padded=True)
    positions = (slots[None, :width] - pads[:, None]).clamp_(min=0)
    logits = model(tokens, positions, logits="last", key_mask=key_mask).logits[:, -1]
    prefill_s = time.perf_counter() - start
    for step in range(steps):
        token = next_token(logits, sampling, generator)
        for stopper, t in zip(stoppers, token.tolist()):
            stopper.extend([t])
        if all(s.done for s in stoppers) or step == steps - 1:
            break
        # A finished row may run past the context: its extra tokens are discarded, so any position will do.
        position = (width + step - pads).clamp_(max=target.context - 1)[:, None]
        logits = model(token[:, None], position, logits="last", key_mask=key_mask).logits[:, -1]
    wall_s = time.perf_counter() - start
    return [
        GenerationResult(text=s.text(), token_ids=s.token_ids, finish_reason=s.finish_reason,
                         prompt_tokens=len(p), wall_s=wall_s, prefill_s=prefill_s, method="vanilla-batch")
        for s, p in zip(stoppers, prompts)
    ]  # fmt: skip
