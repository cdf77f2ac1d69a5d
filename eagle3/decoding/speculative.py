"""Speculative decoding of one prompt: prompt -> target prefill -> draft tree -> verify -> accept -> next round.

The round itself, for any drafter and any number of sequences, is engine.Engine's; this is its one-sequence
front. Output is exactly plain decoding's: greedy token for token, sampling in distribution.
"""

from __future__ import annotations

from typing import Callable, Sequence

from eagle3.methods.drafter import Drafter
from eagle3.decoding.engine import Engine, Request, SpeculativeResult
from eagle3.methods.pld import LookupGraft
from eagle3.decoding.policy import TreePolicy
from eagle3.decoding.sampling import SamplingParams
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import TreeSpec


def speculative_generate(
    target: Target,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 256,
    sampling: SamplingParams = SamplingParams(),
    stop_strings: Sequence[str] = (),
    on_text: Callable[[str], object] | None = None,
    tree: TreeSpec = TreeSpec(),
    method: str = "eagle3",
    policy: TreePolicy | None = None,
    lookup: int = 0,
) -> SpeculativeResult:
    """Generates like `generate`, a tree per round. With tree.auto, `policy` sizes each round's tree (default:
    a fresh AutoTree on this machine's cached cost model; pass one to keep its acceptance corrections). lookup:
    graft a prompt-lookup chain of up to that many tokens onto every round's tree (pld.LookupGraft)."""
    engine = Engine(target, drafter, tree, policy, method=method, lookup=LookupGraft(lookup) if lookup else None)
    return engine.run([Request(prompt_ids, max_new_tokens, sampling, stop_strings, on_text)])[0]
