"""Speculative sampling draws from exactly the target's distribution.

On stories260K (vocabulary 512) with temperature, top-k and top-p in play, the first three generated tokens
are drawn N times by speculative decoding and compared with their exact distribution under the target (the
distribution plain sampling draws from), by a chi-square goodness-of-fit test over (x1, x2, x3), categories
with expected count < 5 pooled. Token 1 comes from the prefill; tokens 2 and 3 come out of tree verification
(accepted draft tokens, or residual / bonus draws).

False-alarm rate: each test rejects a correct sampler with probability ALPHA = 1e-3 (seeds are fixed, so a run
is deterministic). The last test checks the test's power: with the residual step broken (a rejected token is
not removed from p) the same test must reject.
"""

import pytest
import torch
from scipy.stats import chi2

from eagle3 import verify
from eagle3.draft import new_draft
from eagle3.drafter import Eagle3Drafter
from eagle3.model import load_model
from eagle3.sampling import SamplingParams, probs_from_logits
from eagle3.speculative import speculative_generate
from eagle3.tree import TreeSpec
from oracles import TargetOracle

ALPHA = 1e-3
N = 1000
PARAMS = dict(temperature=0.9, top_p=0.9, top_k=12)
TREE = TreeSpec(8, 3, 3)


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


def chi_square_p_value(samples, table):
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


def speculative_triples(target, drafter, prompt, params_kw, n, seed0=0):
    samples = []
    for seed in range(seed0, seed0 + n):
        params = SamplingParams(**params_kw, seed=seed)
        out = speculative_generate(target, drafter, prompt, 3, params, tree=TREE)
        samples.append(tuple(out.token_ids))
    return samples


@pytest.fixture(scope="module")
def setup(stories):
    prompt = stories.encode("One day, Tom")  # a prompt with real choices (83 possible triples)
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
    samples = speculative_triples(stories, drafters[which], prompt, PARAMS, N)
    assert chi_square_p_value(samples, table) > ALPHA


def test_the_test_catches_a_broken_residual(stories, setup, monkeypatch):
    prompt, table, drafters = setup

    def broken(tree, logits, params, generator):  # rejected tokens stay in p: the residual is wrong
        tokens, path = tree.tokens.tolist(), [0]
        while True:
            p = probs_from_logits(logits[path[-1]], params)
            child = next((c for c in tree.children[path[-1]]
                          if torch.rand((), generator=generator) < p[tokens[c]]), None)
            if child is None:
                return path, int(torch.multinomial(p, 1, generator=generator))
            path.append(child)

    monkeypatch.setattr(verify, "accept_sampling", broken)
    samples = speculative_triples(stories, drafters["oracle"], prompt, PARAMS, N)
    assert chi_square_p_value(samples, table) < ALPHA
