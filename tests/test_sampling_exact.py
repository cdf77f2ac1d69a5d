"""Speculative sampling draws from exactly the target's distribution.

The decoding loop's only sampling-specific code is the prefill's draw (plain sampling) and, each round,
`verify.accept(tree, logits, params, generator)` fed the draft tree and the target's logits for its nodes.
Everything else (growing the tree, the forward under the tree mask, cache compaction, the draft's catch-up) is
shared with greedy decoding, which test_speculative.py checks token for token against plain decoding. So the
guarantee splits in two: `accept` is exact for any tree and logits (part 1, which carries the statistical
power), and the loop hands it the right tree and logits rows (part 2).

1. `accept` on synthetic trees. A synthetic target over an 8-token vocabulary has seeded random next-token
   logits for every context (they depend on the whole path), so node i's logits are those after node i's
   path; a synthetic draft adds seeded noise to them. Rounds run as in the decoding loop: a deterministic
   drafter proposes a tree for the context (its root is the last token), `accept` returns the accepted path
   and the bonus token, and the next round starts from the last output token, until 3 tokens exist. The real
   transforms are in play (temperature 0.9, top-k 4 of 8, top-p 0.9). Per tree shape N_SYNTH = 1500 such
   sequences are drawn and their first 3 tokens compared with the exact product of the target's conditionals.
   Shapes: the root alone (a plain step); a chain of the draft's top tokens; a bushy tree of the draft's top
   tokens (two children per node); a bushy tree of the target's most likely tokens whose root children hold
   the root's whole support (accept-first likely; once all but the last are rejected the residual holds only
   the last, accepted surely, so a child is always accepted); and a tree of unlikely tokens led by a child of
   probability 0 under top-k/top-p (rejection and the residual matter most). For these tests `verify`'s
   `probs_from_logits` is the real transform memoized per distinct logits row (a fresh copy per call).
2. The real loop: `speculative_generate` on stories260K (temperature 0.9, top-k 6, top-p 0.9, tree 8,2,3),
   N_LOOP = 100 generations of 3 tokens per drafter (the untrained EAGLE-3 head, whose proposals are mostly
   rejected, and the target oracle, whose are mostly accepted), against the tokens' exact distribution under
   the target. Token 1 comes from the prefill, tokens 2 and 3 from verification: accepted nodes, a bonus drawn
   from the accepted node's own logits row, or a second round after compaction. Giving a node another node's
   row (its parent's, say) makes the oracle run sample a sequence of probability 0, which fails outright;
   subtler errors in `accept` are left to part 1, since N_LOOP is small.

Both parts use a chi-square goodness-of-fit test over the sequences of the first 3 tokens (categories with
expected count < 5 pooled, any sequence of probability 0 a failure); each test rejects a correct sampler with
probability ALPHA = 1e-3. Power: on the draft bushy tree, part 1's test must reject two broken verifiers, one
whose rejected tokens stay in p (the residual is wrong), and one that draws one uniform per node instead of
one per child (exact for a single child, wrong for siblings). Seeds are fixed, so every result is
deterministic.
"""

import functools

import pytest
import torch
from scipy.stats import chi2

from eagle3.decoding import verify
from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import Eagle3Drafter
from eagle3.decoding.engine import Request
from eagle3.runtimes.model import load_model
from eagle3.decoding.sampling import SamplingParams, probs_from_logits, sample_from_probs
from eagle3.decoding.speculative import speculative_generate
from eagle3.decoding.tree import DraftTree, TreeSpec, ancestor_mask
from oracles import TargetOracle

ALPHA = 1e-3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of one-row ops: on a shared machine one intra-op thread beats two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chi_square_p_value(samples, table):
    """Goodness of fit of samples to {sequence: probability}; fails outright on a sequence of probability 0."""
    expected = {k: v * len(samples) for k, v in table.items()}
    counts = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= set(table), "sampled a sequence the target gives probability 0"
    big = [k for k, e in expected.items() if e >= 5]
    stat, other_obs, other_exp = 0.0, len(samples), float(len(samples))
    for k in big:
        stat += (counts.get(k, 0) - expected[k]) ** 2 / expected[k]
        other_obs -= counts.get(k, 0)
        other_exp -= expected[k]
    dof = len(big) - 1
    if other_exp >= 5:
        stat += (other_obs - other_exp) ** 2 / other_exp
        dof += 1
    return chi2.sf(stat, dof)


# --- 1. The acceptance rule on synthetic trees ---------------------------------------------------------------

VOCAB = 8
SYNTH_PARAMS = SamplingParams(temperature=0.9, top_p=0.9, top_k=4)
SYNTH_PROMPT = (5,)
SYNTH_TOKENS = 3
N_SYNTH = 1500


def _seeded_normal(context: tuple[int, ...], salt: int) -> torch.Tensor:
    code = 1
    for token in context:
        code = code * (VOCAB + 1) + token + 1
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(2 * code + salt))


@functools.cache
def target_logits(context: tuple[int, ...]) -> torch.Tensor:
    """The synthetic target's next-token logits after a context (not to be modified: cached)."""
    return _seeded_normal(context, 0)


@functools.cache
def target_probs(context: tuple[int, ...]) -> torch.Tensor:
    return probs_from_logits(target_logits(context), SYNTH_PARAMS)


@functools.cache
def draft_logits(context: tuple[int, ...]) -> torch.Tensor:
    return target_logits(context) + _seeded_normal(context, 1)


def by_draft(context):
    return torch.argsort(draft_logits(context), descending=True, stable=True).tolist()


def most_likely(context):
    return torch.argsort(target_probs(context), descending=True, stable=True).tolist()


def unlikely(context):
    """A token of probability 0 first, then the support from its least likely token up, then the other zeros."""
    p = target_probs(context).tolist()
    ascending = sorted(range(VOCAB), key=lambda t: p[t])
    zeros = [t for t in ascending if p[t] == 0]
    return zeros[:1] + [t for t in ascending if p[t] > 0] + zeros[1:]


# name: (children per node at each depth, the proposer's ranking of a context's next tokens)
SHAPES = {
    "root alone": ((), by_draft),
    "draft chain": ((1, 1, 1), by_draft),
    "draft bushy": ((2, 2, 1), by_draft),
    "most likely": ((4, 2, 1), most_likely),
    "unlikely": ((3, 2), unlikely),
}


def synthetic_round(shape: str, context: tuple[int, ...]) -> tuple[DraftTree, torch.Tensor, list[int]]:
    """The tree a deterministic drafter proposes after `context` (its root is context[-1]), the target's
    logits for every node (node i's row: the logits after node i's path), and the node tokens."""
    widths, rank = SHAPES[shape]
    tokens, parents, paths, depths, scores = [context[-1]], [-1], [()], [0], [0.0]
    frontier = [0]
    for width in widths:
        grown = []
        for node in frontier:
            here = context + paths[node]
            logp = torch.log_softmax(draft_logits(here), -1).tolist()
            for token in rank(here)[:width]:
                grown.append(len(tokens))
                tokens.append(token)
                parents.append(node)
                paths.append(paths[node] + (token,))
                depths.append(depths[node] + 1)
                scores.append(scores[node] + logp[token])
        frontier = grown
    children = [[] for _ in tokens]
    for node, parent in enumerate(parents[1:], start=1):
        children[parent].append(node)
    tree = DraftTree(torch.tensor(tokens), parents, torch.tensor(depths), ancestor_mask(parents), children,
                     torch.tensor(scores))  # fmt: skip
    logits = torch.stack([target_logits(context + path) for path in paths])
    return tree, logits, tokens


def exact_synthetic() -> dict[tuple[int, ...], float]:
    """{first SYNTH_TOKENS tokens: probability} under the synthetic target with the sampling transforms."""
    table = {(): 1.0}
    for _ in range(SYNTH_TOKENS):
        table = {s + (t,): q * p for s, q in table.items()
                 for t, p in enumerate(target_probs(SYNTH_PROMPT + s).tolist()) if p > 0}  # fmt: skip
    return table


def synthetic_prefixes(shape: str, n: int, seed: int = 0) -> tuple[list[tuple[int, ...]], list[int]]:
    """n draws of the first SYNTH_TOKENS tokens by rounds of verify.accept, and per round its accepted length."""
    generator = torch.Generator().manual_seed(seed)
    rounds, samples, accepted = {}, [], []
    for _ in range(n):
        out = ()
        while len(out) < SYNTH_TOKENS:
            context = SYNTH_PROMPT + out
            if context not in rounds:
                rounds[context] = synthetic_round(shape, context)
            tree, logits, tokens = rounds[context]
            path, bonus = verify.accept(tree, logits, SYNTH_PARAMS, generator)
            out += tuple(tokens[node] for node in path[1:]) + (bonus,)
            accepted.append(len(path) - 1)
        samples.append(out[:SYNTH_TOKENS])
    return samples, accepted


@pytest.fixture
def memoized_transform(monkeypatch):
    """accept recomputes the target's distribution at every node it visits, and the synthetic runs visit a few
    dozen logits rows thousands of times: the real transform, computed once per distinct row, a fresh copy per
    call (accept edits p in place). (raising=False: should verify stop importing it, tests only get slower.)"""
    cache = {}

    def probs(logits, params):
        key = (logits.dtype, tuple(logits.shape), logits.numpy().tobytes(), params)
        if key not in cache:
            cache[key] = probs_from_logits(logits, params)
        return cache[key].clone()

    monkeypatch.setattr(verify, "probs_from_logits", probs, raising=False)


def test_the_synthetic_trees_have_their_shapes():
    table = exact_synthetic()
    assert abs(sum(table.values()) - 1) < 1e-5
    sizes = {int((target_probs(SYNTH_PROMPT + s[:i]) > 0).sum()) for s in table for i in range(SYNTH_TOKENS)}
    assert min(sizes) < SYNTH_PARAMS.top_k == max(sizes) < VOCAB  # top-k cuts everywhere, top-p somewhere too
    p = target_probs(SYNTH_PROMPT)
    support = set(p.nonzero().flatten().tolist())
    trees = {shape: synthetic_round(shape, SYNTH_PROMPT)[0] for shape in SHAPES}
    assert trees["root alone"].size == 1
    chain = trees["draft chain"]
    assert chain.size == 4 and all(len(c) <= 1 for c in chain.children) and chain.depths.tolist() == [0, 1, 2, 3]
    assert [len(trees["draft bushy"].children[n]) for n in (0, 1, 2)] == [2, 2, 2]
    likely = trees["most likely"]
    assert {likely.tokens[c].item() for c in likely.children[0]} >= support  # the residual would be empty
    low = trees["unlikely"]
    first, second = (low.tokens[c].item() for c in low.children[0][:2])
    assert p[first] == 0 and p[second] == min(p[t] for t in support)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_accept_samples_the_target_distribution(memoized_transform, shape):
    samples, accepted = synthetic_prefixes(shape, N_SYNTH, seed=list(SHAPES).index(shape))
    assert chi_square_p_value(samples, exact_synthetic()) > ALPHA
    if shape == "most likely":  # each root's children hold its whole support: one is always accepted
        assert accepted.count(0) == 0
    elif shape != "root alone":  # both outcomes of a round occurred: some accepted a child, some none
        assert 0 < accepted.count(0) < len(accepted)


def broken_residual(tree, logits, params, generator):
    """Rejected tokens stay in p: the residual (and each later sibling's acceptance) is wrong."""
    tokens, path = tree.tokens.tolist(), [0]
    while True:
        p = verify.probs_from_logits(logits[path[-1]], params)
        child = next((c for c in tree.children[path[-1]]
                      if torch.rand((), generator=generator) < p[tokens[c]]), None)  # fmt: skip
        if child is None:
            return path, int(sample_from_probs(p, generator))
        path.append(child)


def broken_shared_uniform(tree, logits, params, generator):
    """One uniform per node instead of one per child (it saves a draw per sibling): exact for a single child,
    but a sibling tried after a rejection is accepted only if the same u, already known to be >= the earlier
    siblings' probabilities, falls below its own."""
    tokens, path = tree.tokens.tolist(), [0]
    while True:
        p = verify.probs_from_logits(logits[path[-1]], params)
        u, child = torch.rand((), generator=generator), None
        for c in tree.children[path[-1]]:
            if u < p[tokens[c]]:
                child = c
                break
            p[tokens[c]] = 0.0
            p = p / p.sum()
        if child is None:
            return path, int(sample_from_probs(p, generator))
        path.append(child)


@pytest.mark.parametrize("broken", [broken_residual, broken_shared_uniform], ids=lambda f: f.__name__)
def test_the_synthetic_test_catches_a_broken_verifier(memoized_transform, monkeypatch, broken):
    monkeypatch.setattr(verify, "accept_sampling", broken)
    samples, _ = synthetic_prefixes("draft bushy", N_SYNTH, seed=list(SHAPES).index("draft bushy"))
    assert chi_square_p_value(samples, exact_synthetic()) < ALPHA


# --- 2. Through the real decoding loop -----------------------------------------------------------------------

N_LOOP = 100
PARAMS = dict(temperature=0.9, top_p=0.9, top_k=6)
TREE = TreeSpec(8, 2, 3)


def exact_triples(target, prompt, params):
    """{(x1, x2, x3): probability} under the target with the sampling transforms."""
    model = target.model
    with torch.no_grad():
        model.setup_cache(len(prompt) + 3)
        p1 = probs_from_logits(model(torch.tensor([prompt]), logits="last").logits[0, -1], params)
        firsts = p1.nonzero().flatten().tolist()
        seqs2 = torch.tensor([prompt + [a] for a in firsts])
        model.setup_cache(len(prompt) + 3, batch_size=len(firsts))
        p2 = probs_from_logits(model(seqs2, logits="last").logits[:, -1], params)
        pairs = [(a, b) for i, a in enumerate(firsts) for b in p2[i].nonzero().flatten().tolist()]
        seqs3 = torch.tensor([prompt + [a, b] for a, b in pairs])
        model.setup_cache(len(prompt) + 3, batch_size=len(pairs))
        p3 = probs_from_logits(model(seqs3, logits="last").logits[:, -1], params)
    model.setup_cache(64)
    table = {}
    for j, (a, b) in enumerate(pairs):
        base = float(p1[a]) * float(p2[firsts.index(a), b])
        for c in p3[j].nonzero().flatten().tolist():
            table[(a, b, c)] = base * float(p3[j, c])
    return table


def batched_triples(engine, prompt, runs=25, rows=4):
    """First three tokens of runs x rows sequences of one prompt, decoded `rows` at a time, each with a seed."""
    samples = []
    for run in range(runs):
        requests = [Request(prompt, 3, SamplingParams(**PARAMS, seed=rows * run + row)) for row in range(rows)]
        samples += [tuple(r.token_ids) for r in engine.run(requests)]
    return samples


def speculative_triples(target, drafter, prompt, params_kw, n, seed0=0, lookup=0):
    samples = []
    for seed in range(seed0, seed0 + n):
        params = SamplingParams(**params_kw, seed=seed)
        out = speculative_generate(target, drafter, prompt, 3, params, tree=TREE, lookup=lookup)
        samples.append(tuple(out.token_ids))
    return samples


@pytest.fixture(scope="module")
def setup(stories):
    prompt = stories.encode("One day, Tom")  # a prompt with real choices (43 possible triples)
    table = exact_triples(stories, prompt, SamplingParams(**PARAMS))
    drafters = {
        "untrained": Eagle3Drafter(new_draft(stories.model.config).attach(stories.model.embed.weight)),
        "oracle": TargetOracle(load_model(stories.path, device="cpu")),
    }
    return prompt, table, drafters


@pytest.mark.parametrize("which", ["untrained", "oracle"])
def test_speculative_sampling_matches_the_target_distribution(stories, setup, which):
    prompt, table, drafters = setup
    assert abs(sum(table.values()) - 1) < 1e-4
    samples = speculative_triples(stories, drafters[which], prompt, PARAMS, N_LOOP)
    assert chi_square_p_value(samples, table) > ALPHA
