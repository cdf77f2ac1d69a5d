"""Batched decoding is solo decoding, row by row: for any batch size, every row's greedy output equals its
prompt decoded alone, with rows of different lengths finishing at different times and sequences joining as
rows free up; sampled rows draw from exactly the target's distribution."""

import dataclasses

import pytest
import torch

from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import Eagle3Drafter, NoDrafter
from eagle3.decoding.engine import Engine, Request
from eagle3.decoding.generate import generate, generate_batch
from eagle3.runtimes.model import load_model
from eagle3.methods.pld import PromptLookupDrafter
from eagle3.decoding.sampling import SamplingParams
from eagle3.decoding.tree import TreeSpec
from oracles import TargetOracle
from test_sampling_exact import ALPHA, PARAMS, TREE, batched_triples, chi_square_p_value, exact_triples

PROMPTS = ["Once upon a time", "Tom had a big red", "One day, a little girl named Lily went to the park with her mom",
           "The cat", "Sara and Ben were playing in the garden when they saw a small bird", "Max",
           "There was a big tree in the forest", "Mia liked to"]  # fmt: skip
BUDGETS = [60, 25, 90, 7, 40, 120, 1, 55]  # rows finish at different times (and one after its first token)


@pytest.fixture(scope="module")
def eos_target(stories):
    """stories260K with "." as a stop token too, so that some rows end early on EOS."""
    period = stories.tokenizer.convert_tokens_to_ids(".")
    return dataclasses.replace(stories, eos_token_ids=frozenset({*stories.eos_token_ids, period}))


@pytest.fixture(scope="module")
def solo(eos_target):
    return [generate(eos_target, eos_target.encode(p), b).token_ids for p, b in zip(PROMPTS, BUDGETS)]


def drafters(stories):
    untrained = Eagle3Drafter(new_draft(stories.model.config, seed=2).attach(stories.model.embed.weight))
    return {"eagle3": (untrained, TreeSpec(10, 3, 3)), "oracle": (TargetOracle(load_model(stories.path, device="cpu")),
            TreeSpec(12, 4, 2)), "pld": (PromptLookupDrafter(4), PromptLookupDrafter(4).tree),
            "plain": (NoDrafter(), TreeSpec(1, 1, 1))}  # fmt: skip


@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_batched_greedy_equals_solo(eos_target, solo, rows):
    requests = [Request(eos_target.encode(p), b) for p, b in zip(PROMPTS, BUDGETS)]
    for name, (drafter, tree) in drafters(eos_target).items():
        engine = Engine(eos_target, drafter, tree, max_rows=rows)
        results = engine.run(requests)
        assert [r.token_ids for r in results] == solo, (name, rows)
        assert all(r.finish_reason in ("eos", "length") for r in results)
        if name == "oracle":  # long accepted runs happened, so rows really moved ahead of each other
            assert max(max(r.accept_lengths, default=1) for r in results) > 2
    assert {r.finish_reason for r in results} == {"eos", "length"}


def test_rows_join_mid_run_and_leave(eos_target, solo):
    """Driving the engine by hand: a sequence joins while others are half done, rows leave as they finish
    (the last row moving into a freed one), and nothing changes anyone's output."""
    drafter, tree = drafters(eos_target)["eagle3"]
    engine = Engine(eos_target, drafter, tree, max_rows=3)
    engine.open(256)
    ids = {engine.add(Request(eos_target.encode(PROMPTS[i]), BUDGETS[i])): i for i in (2, 5)}
    results = {}
    for _ in range(5):
        results.update(engine.step())
    for i in (0, 4):  # join after five rounds
        ids[engine.add(Request(eos_target.encode(PROMPTS[i]), BUDGETS[i]))] = i
    while engine.sequences:
        results.update(engine.step())
        if results and 7 not in ids.values():  # one more joins once a row has freed up
            ids[engine.add(Request(eos_target.encode(PROMPTS[7]), BUDGETS[7]))] = 7
    assert sorted(ids.values()) == [0, 2, 4, 5, 7]
    for seq_id, i in ids.items():
        assert results[seq_id].token_ids == solo[i], i


def test_generate_batch_equals_solo(stories):
    prompts = [stories.encode(p) for p in PROMPTS]
    alone = [generate(stories, p, 40).token_ids for p in prompts]
    assert [r.token_ids for r in generate_batch(stories, prompts, 40, max_rows=3)] == alone


@pytest.mark.parametrize("which", ["eagle3", "oracle"])
def test_batched_sampling_matches_the_target_distribution(stories, which):
    """Four rows of one prompt, each with its own seed, decoded together: their first three tokens fit the
    target's exact distribution (chi-square, as test_sampling_exact)."""
    prompt = stories.encode("One day, Tom")
    table = exact_triples(stories, prompt, SamplingParams(**PARAMS))
    drafter = drafters(stories)[which][0]
    samples = batched_triples(Engine(stories, drafter, TREE, max_rows=4), prompt)
    assert chi_square_p_value(samples, table) > ALPHA
    # Rows are independent: the same seed in another row, or alone, draws the same tokens.
    alone = Engine(stories, drafter, TREE).run([Request(prompt, 3, SamplingParams(**PARAMS, seed=5))])[0]
    assert tuple(alone.token_ids) == samples[5]


def test_a_full_batch_refuses_another_sequence(stories):
    engine = Engine(stories, max_rows=1)
    engine.open(64)
    engine.add(Request(stories.encode("Once"), 5))
    with pytest.raises(ValueError, match="full"):
        engine.add(Request(stories.encode("Twice"), 5))
    with torch.inference_mode():
        assert engine.sequences[0].stopper.token_ids


def test_bench_at_batch_sizes(tmp_path, capsys, monkeypatch):
    """`eagle3 bench --batch-size`: every method at every batch size, outputs identical to plain decoding at
    B=1, throughput reported; an interrupted run resumes from its finished cells."""
    import json

    from eagle3.evaluation import batchbench
    from eagle3.cli import main

    monkeypatch.setenv("EAGLE3_HOME", str(tmp_path / "home"))  # the auto tree's cost model is measured here
    data = tmp_path / "eval"
    data.mkdir()
    (data / "mt_bench.jsonl").write_text("\n".join(json.dumps({"question_id": i, "turns": [p]})
                                                   for i, p in enumerate(PROMPTS[:5])) + "\n")  # fmt: skip
    assert main(["draft-init", str(tmp_path / "draft"), "--target", "stories260k"]) == 0
    args = ["bench", "--target", "stories260k", "--draft", str(tmp_path / "draft"), "--methods", "vanilla,eagle3",
            "--tree", "8,3,2", "auto", "--batch-size", "1,3", "--max-new-tokens", "20", "--data-dir", str(data),
            "--out", str(tmp_path / "out"), "--threads", "1"]  # fmt: skip
    real = batchbench.run_cell
    calls = []

    def stop_after_three(*a, **k):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(a[1])
        return real(*a, **k)

    monkeypatch.setattr(batchbench, "run_cell", stop_after_three)
    calls.clear()
    assert main(args) == 130 and "--resume" in capsys.readouterr().err
    monkeypatch.setattr(batchbench, "run_cell", real)
    assert main(args + ["--resume"]) == 0
    results = json.loads((tmp_path / "out" / "batch.json").read_text())
    summary = results["summary"]
    assert set(summary) == {"vanilla", "eagle3 8,3,2", "eagle3 auto"} and len(results["cells"]) == 6
    for per in summary.values():
        assert set(per) == {"1", "3"}
        for entry in per.values():
            assert entry["identical"] == entry["n"] == 5 and entry["tokens_per_s"] > 0
    assert summary["eagle3 8,3,2"]["3"]["tau"] >= 1 and summary["vanilla"]["1"]["speedup"] == 1
    assert (tmp_path / "out" / "throughput.png").stat().st_size > 1000
    assert "| eagle3 auto |" in (tmp_path / "out" / "batch.md").read_text()
