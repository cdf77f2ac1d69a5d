"""The tests that take a device: losslessness and parity on $EAGLE3_TEST_DEVICE (default cpu), in fp32 and bf16,
so that scripts/device_check.sh can run them on a GPU; on a CPU they run with the rest of the suite."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import Eagle3Drafter
from eagle3.decoding.engine import Engine, Request
from eagle3.decoding.generate import generate
from eagle3.runtimes.model import load_model
from eagle3.decoding.sampling import SamplingParams
from eagle3.decoding.speculative import speculative_generate
from eagle3.runtimes.target import load_target
from eagle3.decoding.tree import AUTO_TREE, TreeSpec
from oracles import TargetOracle

DEVICE = os.environ.get("EAGLE3_TEST_DEVICE", "cpu")
PROMPTS = ["Once upon a time", "Tom had a big red", "One day, a little girl", "The cat sat"]


def requires_device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"EAGLE3_TEST_DEVICE={DEVICE} but no CUDA GPU is available")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def target(request, stories_path):
    requires_device()
    return load_target(str(stories_path), dtype=request.param, device=DEVICE)


def untrained(target):
    model = target.model
    draft = new_draft(model.config, seed=4).to(device=model.device, dtype=model.dtype)
    return Eagle3Drafter(draft.attach(model.embed.weight))


def test_logits_match_transformers(stories_path):
    requires_device()
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    model = load_model(stories_path, device=DEVICE)
    hf = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).to(DEVICE).eval()
    with torch.no_grad():
        model.setup_cache(40)
        ours = model(ids.to(DEVICE)).logits
        theirs = hf(ids.to(DEVICE)).logits
    assert (ours - theirs).abs().max().item() < 1e-3 * max(1.0, theirs.abs().max().item())


def assert_same_output(target, prompt_ids, got, want):
    """fp32: token for token. bf16: token for token up to the first near-tie, where the plain step's two best
    logits lie within bf16's rounding of each other: a forward over a tree (or a batch) runs other kernel
    shapes than a one-token step, so its bf16 logits round differently, and a near-tie can go either way (as
    in every engine without batch-invariant kernels). Past such a tie the texts are different continuations."""
    if got == want or target.model.dtype == torch.float32:
        assert got == want
        return
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert i < min(len(got), len(want)), "one output is a prefix of the other without a near-tie"
    model = target.model
    with torch.inference_mode():
        model.setup_cache(len(prompt_ids) + i + 1)
        logits = model(torch.tensor([list(prompt_ids) + want[:i]], device=model.device), logits="last").logits
    logits = logits[0, -1].float()
    best = float(logits.max())
    tolerance = 4 * 2**-7 * float(logits.abs().max())  # a few bf16 roundings of the largest logit
    assert best - float(logits[got[i]]) <= tolerance, (i, best, float(logits[got[i]]), tolerance)


def test_greedy_speculation_equals_plain_on_the_device(target):
    """In the target's own precision: speculative output equals that precision's plain output."""
    drafters = [(untrained(target), TreeSpec(10, 3, 3)), (untrained(target), AUTO_TREE)]
    if target.model.dtype == torch.float32:
        drafters.append((TargetOracle(load_model(target.path, device=DEVICE)), TreeSpec(12, 4, 2)))
    for prompt in PROMPTS:
        ids = target.encode(prompt)
        plain = generate(target, ids, 80).token_ids
        for drafter, tree in drafters:
            assert_same_output(target, ids, speculative_generate(target, drafter, ids, 80, tree=tree).token_ids, plain)


def test_batched_equals_solo_on_the_device(target):
    prompts = [target.encode(p) for p in PROMPTS]
    solo = [generate(target, p, 50).token_ids for p in prompts]
    for rows in (2, 4):
        engine = Engine(target, untrained(target), TreeSpec(8, 3, 2), max_rows=rows)
        for p, result, alone in zip(prompts, engine.run([Request(p, 50) for p in prompts]), solo):
            assert_same_output(target, p, result.token_ids, alone)


def test_sampling_on_the_device_is_seeded_per_row(target):
    """Seeded sampling in a batch: the same seeds draw the same tokens again, and rows with other seeds other
    tokens (each row has a generator of its own on the device)."""
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=s) for s in range(4)]
    prompt = target.encode(PROMPTS[0])

    def run():
        engine = Engine(target, untrained(target), TreeSpec(8, 3, 2), max_rows=4)
        return [r.token_ids for r in engine.run([Request(prompt, 20, p) for p in params])]

    first = run()
    assert run() == first and len({tuple(t) for t in first}) > 1 and all(len(t) == 20 for t in first)
