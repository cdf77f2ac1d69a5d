"""Plain decoding: the engine with a drafter that proposes nothing, one token per forward after the prefill."""

from __future__ import annotations

from typing import Callable, Sequence

from eagle3.decoding.engine import Engine, GenerationResult, Request
from eagle3.decoding.sampling import SamplingParams
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import PLAIN


def _plain(result) -> GenerationResult:
    fields = ("text", "token_ids", "finish_reason", "prompt_tokens", "wall_s", "prefill_s")
    return GenerationResult(**{k: getattr(result, k) for k in fields}, method="vanilla")


def generate(
    target: Target,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    stop_strings: Sequence[str] = (),
    on_text: Callable[[str], object] | None = None,
) -> GenerationResult:
    """Greedy or sampled decoding of up to max_new_tokens after the prompt; streams text to on_text."""
    engine = Engine(target, tree=PLAIN, method="vanilla")
    return _plain(engine.run([Request(prompt_ids, max_new_tokens, sampling, stop_strings, on_text)])[0])


def generate_batch(
    target: Target,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    max_rows: int | None = None,
) -> list[GenerationResult]:
    """Plain decoding of several prompts at once (throughput: regenerating training data), greedy or sampled,
    max_rows at a time (default: all); each result is what `generate` gives for that prompt alone, up to float
    summation order. With sampling, every row draws from its own generator seeded alike."""
    engine = Engine(target, tree=PLAIN, max_rows=max_rows or max(1, len(prompts)), method="vanilla")
    return [_plain(r) for r in engine.run([Request(p, max_new_tokens, sampling) for p in prompts])]
