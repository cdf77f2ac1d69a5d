"""Speculative decoding: prompt -> target prefill -> draft tree -> verify -> accept -> next round.

Each round the drafter grows a tree from the last accepted token (the root, not yet in the target's cache),
the target scores the whole tree in one forward pass under the tree mask, verification picks the accepted
path and the target's own next token, the target's KV cache keeps just that path, and the drafter catches up
on the accepted tokens with the target's true features. Output is exactly plain decoding's: greedy token for
token, sampling in distribution.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from eagle3.autotree import AutoTree, auto_tree
from eagle3.drafter import Drafter
from eagle3.generate import GenerationResult, room_for
from eagle3.sampling import SamplingParams, make_generator, next_token
from eagle3.stopping import Stopper, TextStreamer
from eagle3.target import Target
from eagle3.tree import TreeSpec, grow_tree, root_only
from eagle3.verify import accept


@dataclass
class SpeculativeResult(GenerationResult):
    method: str = "eagle3"
    rounds: int = 0  # target forward passes after the prefill
    accept_lengths: list[int] = field(default_factory=list)  # per drafted round: accepted draft tokens + 1
    plain_rounds: int = 0  # rounds without a draft (auto trees skip drafting while it does not pay)

    @property
    def tau(self) -> float:
        """Mean acceptance length of the drafted rounds (the papers' tau; plain rounds are not counted)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0

    def to_json(self) -> dict:
        return {**super().to_json(), "tau": self.tau}


@torch.inference_mode()
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
    policy: AutoTree | None = None,
) -> SpeculativeResult:
    """Generates like `generate`, a tree per round. With tree.auto, `policy` sizes each round's tree (default:
    a fresh AutoTree on this machine's cached cost model; pass one to keep its acceptance corrections)."""
    budget = room_for(target, prompt_ids, max_new_tokens)
    if tree.auto and policy is None:
        policy = auto_tree(target, drafter, tree)
    if not tree.auto:
        policy = None
    model, device = target.model, target.model.device
    stopper = Stopper(target.tokenizer, target.eos_token_ids, budget, tuple(stop_strings), track_text=on_text is not None)
    streamer = TextStreamer(on_text, stop_strings) if on_text else None
    generator = make_generator(sampling, device)
    accept_lengths, plain_rounds = [], 0

    taps = drafter.tap_layers  # the layers this drafter reads (none for prompt lookup: no taps at all)
    start = time.perf_counter()
    max_len = min(len(prompt_ids) + budget + tree.total_tokens, target.context)
    model.empty_cache(max_len)
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    out = model(prompt, logits="last", taps=taps)
    root = next_token(out.logits[:, -1], sampling, generator)
    prefill_s = time.perf_counter() - start
    root_token = root.item()
    stopper.extend([root_token])
    drafter.reset(prompt_ids, max_len + tree.depth * tree.top_k)  # room for the tree's draft rows too
    # What the draft has not seen yet, as chunks concatenated only when it drafts (plain steps append a token
    # each: no copy of the prompt's features per round). The drafter pairs the feature of position t with
    # token t + 1.
    catch_tokens = [prompt[0, 1:], root.view(1)]
    catch_features, catch_start = [out.taps[0]] if taps else None, 0
    committed = len(prompt_ids)  # tokens in the target's cache; the root comes next

    while not stopper.done:
        if streamer:
            streamer.update(stopper.text())
        draft_start = time.perf_counter()
        drafted = policy is None or policy.should_draft()
        if drafted:
            tokens = torch.cat(catch_tokens)
            features = torch.cat(catch_features) if taps else None
            root_logp, root_ids = drafter.catch_up(tokens, features, catch_start, tree.top_k)
            # Near the end of the context the tree shrinks to what still fits (down to the root alone).
            room = model.cache.max_len - committed
            spec = tree if room >= tree.total_tokens else replace(tree, total_tokens=max(room, 1))
            if policy is not None:
                # (a drafter may read less than it is given: the EAGLE-3 drafter's prompt window)
                policy.context, policy.catch_up = committed, getattr(drafter, "caught_up", len(tokens))
            draft_tree = grow_tree(root_token, root_logp, root_ids, drafter.expand, spec, policy)
            drafter.end_round()
        else:  # a plain step; the draft catches up on these tokens at the next drafted round
            draft_tree = root_only(root_token)

        # The tree lives on the host; positions stay there too (the runtime reads their max without a sync).
        verify_start = time.perf_counter()
        positions = committed + draft_tree.depths
        out = model(draft_tree.tokens.view(1, -1).to(device), positions, draft_tree.mask.to(device), taps=taps)
        path, bonus = accept(draft_tree, out.logits[0], sampling, generator)
        model.cache.compact([committed], [path])
        new_tokens = draft_tree.tokens[path[1:]].tolist() + [bonus]
        stopper.extend(new_tokens)
        if drafted:
            accept_lengths.append(len(path))
        else:
            plain_rounds += 1
        if policy is not None:  # (new_tokens is on the host: the round's work is done, on CUDA too)
            phases_ms = ((verify_start - draft_start) * 1000, (time.perf_counter() - verify_start) * 1000)
            policy.observe(draft_tree.depths[1:], draft_tree.scores[1:], len(path) - 1, phases_ms)

        new_catch = torch.tensor(new_tokens, dtype=torch.long, device=device)
        new_features = out.taps[0, torch.tensor(path, device=device)] if taps else None
        if drafted:  # the draft is level with the committed tokens: start afresh
            catch_tokens, catch_features, catch_start = [], [] if taps else None, committed
        catch_tokens.append(new_catch)
        if taps:
            catch_features.append(new_features)
        root_token = new_tokens[-1]
        committed += len(path)
        if committed >= model.cache.max_len:  # no room left for another round (the budget is spent too)
            break

    if streamer:
        streamer.update(stopper.text(), final=True)
    wall_s = time.perf_counter() - start
    return SpeculativeResult(
        text=stopper.text(),
        token_ids=stopper.token_ids,
        finish_reason=stopper.finish_reason or "length",
        prompt_tokens=len(prompt_ids),
        wall_s=wall_s,
        prefill_s=prefill_s,
        method=method,
        rounds=len(accept_lengths) + plain_rounds,
        accept_lengths=accept_lengths,
        plain_rounds=plain_rounds,
    )
