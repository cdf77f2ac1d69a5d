"""Sampling parameters and the target's next-token distribution (temperature, top-k, top-p).

Plain and speculative decoding both draw through `probs_from_logits`, so "the target's distribution" means
one thing everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

MIN_TEMPERATURE = 1e-3  # below it (but above 0) softmax(logits / T) can overflow: 0 is greedy
MAX_TEMPERATURE = 100.0  # far past uniform already
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (top_p and top_k are then irrelevant)
    top_p: float = 1.0  # nucleus: keep the smallest set of top tokens holding at least this mass
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not (t == 0 or (math.isfinite(t) and MIN_TEMPERATURE <= t <= MAX_TEMPERATURE)):
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t}")
        if not 0 < self.top_p <= 1:  # (NaN fails this too)
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A seeded generator for sampling (None for greedy); an unseeded run draws a fresh seed."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def probs_from_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distribution over the last axis, in fp32: softmax(logits / T), then top-k, then top-p."""
    if params.greedy:
        raise ValueError("greedy decoding has no sampling distribution")
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from_probs(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of probs [..., V] -> [...]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Greedy argmax or a draw from the target's distribution, for logits [..., V] -> [...]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample_from_probs(probs_from_logits(logits, params), generator)
