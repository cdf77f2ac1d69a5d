"""Plain generation: known outputs, equality with transformers, sampling controls, stops and CLI errors."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.cli import main
from eagle3.decoding.generate import generate, generate_batch
from eagle3.decoding.sampling import SamplingParams, probs_from_logits
from eagle3.decoding.stopping import Stopper, TextStreamer

KARPATHY = ", there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball."


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_stories_known_continuation(capsys):
    code, out, _ = run_cli(capsys, "generate", "--target", "stories260k", "--max-new-tokens", "40", "Once upon a time")
    assert code == 0
    assert out.startswith(KARPATHY)


def test_cli_json_fields(capsys):
    code, out, _ = run_cli(capsys, "generate", "--target", "stories260k", "--max-new-tokens", "12", "--json", "Once upon a time")
    assert code == 0
    row = json.loads(out.strip().splitlines()[-1])
    assert row["new_tokens"] == len(row["token_ids"]) == 12
    assert row["text"] and KARPATHY.startswith(row["text"])
    assert row["wall_s"] > 0 and row["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--top-p", "1.5"], "top-p"),
        (["--top-k", "-1"], "top-k"),
        (["--max-new-tokens", "0"], "max-new-tokens"),
        (["--chat"], "chat template"),
    ],
)
def test_cli_bad_input_is_a_clear_error(capsys, args, message):
    code, out, err = run_cli(capsys, "generate", "--target", "stories260k", *args, "Once upon a time")
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_unknown_model(capsys):
    code, _, err = run_cli(capsys, "generate", "--target", "no-such-model-preset", "hi")
    assert code == 2 and "smollm2-135m" in err  # the message lists the presets


def test_cli_prompt_longer_than_context(capsys):
    code, _, err = run_cli(capsys, "generate", "--target", "stories260k", "once " * 700)
    assert code == 2 and "context of 512" in err


def test_cli_missing_shared(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE3_SHARED", str(tmp_path / "nowhere"))
    monkeypatch.delenv("EAGLE3_STORIES260K", raising=False)
    code, _, err = run_cli(capsys, "generate", "--target", "stories260k", "hi")
    assert code == 2 and "shared" in err


def test_greedy_equals_transformers_generate(stories, stories_path):
    ids = stories.encode("Once upon a time")
    ours = generate(stories, ids, 200).token_ids
    hf = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=200, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[0, len(ids):].tolist()
    # transformers does not stop at EOS here (eos_token_id=None); compare up to our stop.
    assert ours == ref[: len(ours)]
    assert len(ours) == 200 or ours[-1] in stories.eos_token_ids


@pytest.mark.slow
def test_smollm2_chat_greedy_equals_transformers(smollm2, smollm2_path):
    ids = smollm2.encode("What is the capital of France?", chat=True)
    ours = generate(smollm2, ids, 48)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, pad_token_id=2,
                      eos_token_id=sorted(smollm2.eos_token_ids))
    ref = ref[0, len(ids):].tolist()
    assert ours.token_ids == ref
    assert "Paris" in ours.text


def test_batched_prompts_of_different_lengths_match_one_at_a_time(stories):
    prompts = [stories.encode(p) for p in ("Once upon a time, there was a little", "Tom", "The sun was hot and the dog")]
    assert len({len(p) for p in prompts}) == 3  # left padding differs per row
    batch = generate_batch(stories, prompts, 40)
    for prompt, result in zip(prompts, batch):
        alone = generate(stories, prompt, 40)
        assert result.token_ids == alone.token_ids and result.finish_reason == alone.finish_reason
    # A budget the context cuts short for one row only: that row stops at the end of the context.
    long = list(prompts[0]) * (stories.context // len(prompts[0]))
    long = long[: stories.context - 5]
    rows = generate_batch(stories, [long, prompts[1]], 20)
    assert rows[0].new_tokens == 5 and rows[0].finish_reason == "length" and rows[1].new_tokens == 20


def test_sampling_is_reproducible_with_a_seed(stories):
    ids = stories.encode("Once upon a time")
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)
    a = generate(stories, ids, 30, params).token_ids
    b = generate(stories, ids, 30, params).token_ids
    c = generate(stories, ids, 30, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=8)).token_ids
    assert a == b and a != c


def test_probs_temperature_top_k_top_p():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = probs_from_logits(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)
    # top-p 0.8: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 is not.
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    p = probs_from_logits(logits, SamplingParams(temperature=0.5))
    q = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]) ** 2
    assert torch.allclose(p, q / q.sum())
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert p.tolist() == [1.0, 0, 0, 0, 0]


def test_stop_string_cuts_text_and_stops(stories):
    ids = stories.encode("Once upon a time")
    streamed = []
    result = generate(stories, ids, 60, stop_strings=["Lily"], on_text=streamed.append)
    assert result.finish_reason == "stop"
    assert result.text == ", there was a little girl named "
    assert "".join(streamed) == result.text  # the stop string never reaches the terminal
    assert stories.tokenizer.decode(result.token_ids).rstrip().endswith("Lily")


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids if i != 0)


def test_stopper_stops_inside_a_multi_token_run():
    stopper = Stopper(CharTokenizer(), frozenset({0}), max_new_tokens=10)
    assert stopper.extend([1, 2, 0, 3, 4]) == 3  # EOS is kept, what follows is dropped
    assert stopper.finish_reason == "eos" and stopper.token_ids == [1, 2, 0]
    stopper = Stopper(CharTokenizer(), frozenset({0}), max_new_tokens=4)
    assert stopper.extend([1, 2, 3, 4, 5, 6]) == 4 and stopper.finish_reason == "length"
    stopper = Stopper(CharTokenizer(), frozenset({0}), max_new_tokens=10, stop_strings=("cd",))
    assert stopper.extend([1, 2, 3, 4, 5]) == 4 and stopper.finish_reason == "stop" and stopper.text() == "ab"


def test_streamer_holds_back_a_possible_stop_prefix():
    out = []
    s = TextStreamer(out.append, ["END"])
    s.update("abcE")
    s.update("abcEN")
    assert "".join(out) == "abc"
    s.update("abcENx")
    assert "".join(out) == "abcENx"


class CountingTokenizer:
    """A tokenizer that records how many tokens each decode call read."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("which", ["stories", "smollm2"])
def test_incremental_text_equals_a_full_decode_and_stays_cheap(request, which):
    """Stop strings and streaming see the text of every prefix of the output, decoded a few tokens at a time:
    it equals the full decode of those tokens whenever that ends on a whole character, and no decode call
    reads the whole output again."""
    tokenizer = request.getfixturevalue(which).tokenizer
    # Real text in several scripts: rare characters become byte tokens, so a character often spans tokens.
    # (Random ids are no test: byte-fallback decoders rewrite invalid byte runs that later bytes extend.)
    text = "Hello, world! 日本語のテキスト ✓ café naïve — «quoted» 🙂 Ωmega, 12·3 = 36. " * 8
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(tokenizer)
    stopper = Stopper(counting, frozenset(), len(ids), stop_strings=("\x00never",))
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    complete = 0
    for i, token in enumerate(ids):
        stopper.extend([token])
        full = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        assert whole.startswith(stopper._text), i  # text once shown is never rewritten
        if not full.endswith("\ufffd"):  # (mid-character, HF's decoders blank a whole byte run)
            assert stopper._text == full, i
            complete += 1
    assert complete > len(ids) // 2
    assert stopper.finish_reason == "length" and stopper.text() == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(counting.lengths) < 30


def test_the_package_top_is_the_library_front_door_and_imports_nothing_heavy():
    """`from eagle3 import load_target, generate, ...` gives the subpackages' own objects, imported on first use:
    `import eagle3` alone imports neither torch nor any subpackage."""
    import subprocess
    import sys

    import eagle3

    for name, module in eagle3._PUBLIC.items():
        assert getattr(eagle3, name) is getattr(__import__(module, fromlist=[name]), name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        eagle3.nothing  # noqa: B018
    probe = "import sys, eagle3; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('eagle3.')))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"
