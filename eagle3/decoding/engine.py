"""The decoding engine: speculative rounds over a batch of sequences, for any drafter.

A round (`Engine.step`) runs every live row at once:

    plan (tree sizes) -> propose (drafter: catch up, grow each row's tree; with lookup, n-gram chains grafted
    on) -> verify (target: one forward over every row's tree) -> accept (each row its own path and next token)
    -> commit (target cache, drafter) -> stop rules, per row; finished rows leave

A sequence joins between rounds (`Engine.add`): its prompt is prefilled into the next free row and its first
token drawn. Plain decoding is the drafter that proposes nothing (drafter.NoDrafter): the same loop, one token
per round. Output is exactly plain decoding's, per row: greedy token for token, sampling in distribution.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Sequence

import torch

from eagle3.methods.drafter import Drafter, NoDrafter
from eagle3.methods.pld import GraftPrice, LookupGraft
from eagle3.decoding.policy import FixedTree, RoundReport, TreePolicy
from eagle3.runtimes.runtime import make_runtime
from eagle3.decoding.sampling import SamplingParams, make_generator, next_token
from eagle3.decoding.stopping import Stopper, TextStreamer
from eagle3.runtimes.target import Target
from eagle3.decoding.tree import PLAIN, TreeSpec, root_only
from eagle3.decoding.verify import accept_rows


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    finish_reason: str  # "eos", "stop" or "length" ("cancelled": Engine.cancel)
    prompt_tokens: int
    wall_s: float  # from the request's prefill to its last token
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


@dataclass
class Request:
    prompt_ids: Sequence[int]
    max_new_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop_strings: Sequence[str] = ()
    on_text: Callable[[str], object] | None = None


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


@dataclass
class _Sequence:
    """A request being decoded: its row is its index in Engine.sequences."""

    id: int
    request: Request
    stopper: Stopper
    streamer: TextStreamer | None
    generator: torch.Generator | None
    root: int  # the last committed token: the next round's root, not yet in the target's cache
    started: float
    prefill_s: float
    accept_lengths: list[int] = field(default_factory=list)
    plain_rounds: int = 0


class Engine:
    """Decodes requests with a target and a drafter, max_rows at a time (continuous batching: a finished row
    takes the next request at once). tree: the drafted trees' sizes; auto trees are sized each round by
    `policy` (default: autotree.AutoTree on this machine's cost model), fixed ones by policy.FixedTree. lookup:
    graft each row's prompt-lookup chain onto its tree every round, plain rounds included (pld.LookupGraft)."""

    def __init__(self, target: Target, drafter: Drafter | None = None, tree: TreeSpec = TreeSpec(),
                 policy: TreePolicy | None = None, max_rows: int = 1, method: str = "eagle3",
                 lookup: LookupGraft | None = None):  # fmt: skip
        self.target, self.drafter, self.lookup = target, drafter or NoDrafter(), lookup
        if isinstance(self.drafter, NoDrafter):  # nothing to draft: every round a plain one
            tree, policy = PLAIN, None
        self.tree, self.method, self.max_rows = tree, method, max_rows
        if policy is None:
            if tree.auto:
                from eagle3.decoding.autotree import auto_tree

                policy = auto_tree(target, self.drafter, tree)
            else:
                policy = FixedTree(tree)
        self.policy = policy
        self.runtime = make_runtime(target, self.drafter.tap_layers)
        self.sequences: list[_Sequence] = []
        self._report: RoundReport | None = None  # the last round's, for the policy
        self._ids = 0

    @property
    def last_round(self) -> RoundReport | None:
        """What the last round did (None before the first round of a batch)."""
        return self._report

    def open(self, max_len: int) -> None:
        """An empty batch for sequences of up to max_len positions (capped by the context)."""
        max_len = min(max_len, self.target.context)
        grafted = self.lookup.num_tokens if self.lookup else 0
        self.runtime.open(self.max_rows, max_len, spare=self.tree.total_tokens + grafted)  # (room for padding)
        self.drafter.open(self.max_rows, max_len + self.tree.depth * self.tree.top_k)  # room for tree rows
        if self.lookup:
            self.lookup.open()
        self.sequences, self._report = [], None

    @torch.inference_mode()
    def add(self, request: Request) -> int:
        """Prefills a request into the next free row and draws its first token; returns its id."""
        budget = room_for(self.target, request.prompt_ids, request.max_new_tokens)
        if len(self.sequences) >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        started = time.perf_counter()
        stopper = Stopper(self.target.tokenizer, self.target.eos_token_ids, budget, tuple(request.stop_strings),
                          track_text=request.on_text is not None)  # fmt: skip
        streamer = TextStreamer(request.on_text, request.stop_strings) if request.on_text else None
        generator = make_generator(request.sampling, self.target.model.device)
        row, logits, taps = self.runtime.prefill(request.prompt_ids)
        root = int(next_token(logits, request.sampling, generator))
        stopper.extend([root])
        if streamer:
            streamer.update(stopper.text())
        self.drafter.join(row, request.prompt_ids)
        # The drafter pairs the feature of position t with token t + 1.
        tokens = torch.tensor([*list(request.prompt_ids)[1:], root], dtype=torch.long, device=self.target.model.device)
        self.drafter.commit(row, tokens, taps)
        if self.lookup:
            self.lookup.join(row, request.prompt_ids)
            self.lookup.commit(row, [root])
        self._ids += 1
        self.sequences.append(_Sequence(self._ids, request, stopper, streamer, generator, root, started,
                                        time.perf_counter() - started))  # fmt: skip
        return self._ids

    @torch.inference_mode()
    def step(self) -> list[tuple[int, SpeculativeResult]]:
        """One round for every row; returns the (id, result) of the sequences that finished (some may have
        finished with their first token, before any round)."""
        finished = self._leave()
        if self.sequences:
            self._round()
        return finished + self._leave()

    def _round(self) -> None:
        sequences, runtime = self.sequences, self.runtime
        draft_start = time.perf_counter()
        contexts = [runtime.length(row) for row in range(len(sequences))]
        plan = self.policy.size(self._report, contexts)
        drafted = plan.drafted
        if drafted:
            plan.specs = [self._fit(spec, row) for row, spec in enumerate(plan.specs)]
            trees = self.drafter.propose(plan).trees
        else:  # plain steps; the drafter catches up on these tokens when it next drafts
            trees = [root_only(seq.root) for seq in sequences]
        if self.lookup:  # each row's prompt-lookup chain merged into its tree, in plain rounds too
            rooms = [runtime.max_len - runtime.length(row) - tree.size for row, tree in enumerate(trees)]
            trees = self.lookup.graft_rows(trees, rooms, self._graft_price(plan, trees, draft_start))
        verify_start = time.perf_counter()
        logits, taps = runtime.verify(trees)
        accepted = accept_rows(trees, logits, [s.request.sampling for s in sequences], [s.generator for s in sequences])
        runtime.commit([path for path, _ in accepted])
        device = self.target.model.device
        for b, (seq, tree, (path, bonus)) in enumerate(zip(sequences, trees, accepted)):
            new_tokens = [*tree.tokens[path[1:]].tolist(), bonus] if len(path) > 1 else [bonus]
            seq.stopper.extend(new_tokens)
            if tree.size > 1:  # (a drafted tree, or a plain round's root with a lookup chain grafted on)
                seq.accept_lengths.append(len(path))
            else:
                seq.plain_rounds += 1
            features = None if taps is None else taps[b, path]  # (a copy: a runtime may reuse its taps buffer)
            self.drafter.commit(b, torch.tensor(new_tokens, dtype=torch.long, device=device), features)
            if self.lookup:
                self.lookup.commit(b, new_tokens)
            seq.root = new_tokens[-1]
        # (the new tokens are on the host: the round's work is done, on CUDA too)
        done = time.perf_counter()
        self._report = RoundReport(plan, trees, [path for path, _ in accepted], contexts,
                                   (verify_start - draft_start) * 1000, (done - verify_start) * 1000)  # fmt: skip
        for seq in sequences:  # (after the round's timing: the policy prices the round, not the printing)
            if seq.streamer and not seq.stopper.done:
                seq.streamer.update(seq.stopper.text())

    @staticmethod
    def _graft_price(plan, trees: list, draft_start: float) -> GraftPrice | None:
        """The batch's round as its policy priced it, for weighing lookup chains (None: the policy prices nothing):
        every row's expected tokens (1 + its tree's expected accepted draft tokens) and the round's ms."""
        if plan.verify_prices is None:
            return None
        verify_ms = plan.verify_prices()
        tokens = sum(1.0 + getattr(plan.sizers.get(row), "gain", 0.0) for row in range(len(trees)))
        padded = min(max(tree.size for tree in trees), len(verify_ms))
        spent = (time.perf_counter() - draft_start) * 1000
        return GraftPrice(tokens, spent + float(verify_ms[padded - 1]), verify_ms, padded)

    def _fit(self, spec: TreeSpec, row: int) -> TreeSpec:
        """Near the end of the context a row's tree shrinks to what still fits, down to the root alone."""
        room = self.runtime.max_len - self.runtime.length(row)
        return spec if room >= spec.total_tokens else replace(spec, total_tokens=max(room, 1))

    @torch.inference_mode()
    def cancel(self, seq_id: int) -> SpeculativeResult | None:
        """Takes a sequence out between rounds (its client went away), freeing its row; returns what it had
        generated (finish_reason "cancelled"), or None when no running sequence has that id."""
        row = next((row for row, seq in enumerate(self.sequences) if seq.id == seq_id), None)
        if row is None:
            return None
        seq = self.sequences[row]
        if not seq.stopper.done:
            seq.stopper.finish_reason = "cancelled"
        self._remove(row)
        return self._result(seq)

    def _leave(self) -> list[tuple[int, SpeculativeResult]]:
        """Finished rows (stopped, or out of room) leave, the highest first; returns their results."""
        done = []
        for row in reversed(range(len(self.sequences))):
            seq = self.sequences[row]
            if seq.stopper.done or self.runtime.length(row) >= self.runtime.max_len:
                self._remove(row)
                done.append((seq.id, self._result(seq)))
        return done[::-1]

    def _remove(self, row: int) -> None:
        """Frees a row: the last row moves into it (runtime, drafter and sequence list alike)."""
        self.runtime.release(row)
        self.drafter.release(row)
        if self.lookup:
            self.lookup.release(row)
        self.sequences[row] = self.sequences[-1]
        self.sequences.pop()

    def _result(self, seq: _Sequence) -> SpeculativeResult:
        if seq.streamer:
            seq.streamer.update(seq.stopper.text(), final=True)
        return SpeculativeResult(
            text=seq.stopper.text(), token_ids=seq.stopper.token_ids,
            finish_reason=seq.stopper.finish_reason or "length", prompt_tokens=len(seq.request.prompt_ids),
            wall_s=time.perf_counter() - seq.started, prefill_s=seq.prefill_s, method=self.method,
            rounds=len(seq.accept_lengths) + seq.plain_rounds, accept_lengths=seq.accept_lengths,
            plain_rounds=seq.plain_rounds,
        )  # fmt: skip

    def run(self, requests: Sequence[Request]) -> list[SpeculativeResult]:
        """Decodes every request, max_rows at a time, each joining as soon as a row is free; results in the
        requests' order."""
        if not requests:
            return []
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        self.open(longest + self.tree.total_tokens)
        results: dict[int, SpeculativeResult] = {}
        order, waiting = [], list(requests)
        while waiting or self.sequences:
            while waiting and len(self.sequences) < self.max_rows:
                order.append(self.add(waiting.pop(0)))
            results.update(self.step())
        return [results[i] for i in order]
