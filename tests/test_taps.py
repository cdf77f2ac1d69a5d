"""A draft reads the target layers its checkpoint names, not the target's defaults: through every layout and
conversion, and with several drafters on one target."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.formats.checkpoint import save_draft
from eagle3.cli import main
from eagle3.training.data import tokenize_text
from eagle3.methods.draft import new_draft
from eagle3.methods.drafter import load_drafter
from eagle3.decoding.generate import generate
from eagle3.decoding.sampling import SamplingParams
from eagle3.decoding.speculative import speculative_generate
from eagle3.training.train import TrainConfig, train
from eagle3.decoding.tree import TreeSpec

OTHER_TAPS = (0, 3, 4)  # stories260K's defaults are (1, 2, 4)
PROMPTS = ["Once upon a time", "Tom and Lily", "One day, a little", "The cat"]


def recording(drafter):
    """The drafter, with the features of every commit kept in drafter.seen."""
    drafter.seen = []
    commit = drafter.commit

    def record(row, tokens, features):
        drafter.seen.append(features.clone())
        return commit(row, tokens, features)

    drafter.commit = record
    return drafter


def hf_taps(stories_path, ids, layers):
    """The inputs of the given decoder layers by transformers, concatenated in layer order."""
    hf = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    with torch.no_grad():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.cat([states[i][0] for i in sorted(layers)], dim=-1)


def test_a_draft_reads_the_layers_its_checkpoint_names(stories, stories_path, tmp_path):
    assert stories.model.config.default_tap_layers != OTHER_TAPS
    save_draft(new_draft(stories.model.config, seed=1, tap_layers=OTHER_TAPS), tmp_path / "other")
    save_draft(new_draft(stories.model.config, seed=1), tmp_path / "default")
    # The official layout states SGLang's ids (layer outputs) nested and vLLM's (layer inputs) at the top.
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [-1, 2, 3]
    assert config["eagle_aux_hidden_state_layer_ids"] == list(OTHER_TAPS)
    other = recording(load_drafter(tmp_path / "other", stories))
    default = recording(load_drafter(tmp_path / "default", stories))
    assert other.tap_layers == OTHER_TAPS and default.tap_layers == (1, 2, 4)
    ids = stories.encode(PROMPTS[0])
    # Used in turns on one target: each gets its own layers (no tap state is left behind by the other).
    for drafter in (other, default, other):
        speculative_generate(stories, drafter, ids, 8, tree=TreeSpec(6, 3, 2))
    for drafter, layers, runs in ((other, OTHER_TAPS, 2), (default, (1, 2, 4), 1)):
        firsts = [f for f in drafter.seen if len(f) == len(ids)]  # each generation's first commit: the prompt
        assert len(firsts) == runs
        for features in firsts:
            assert torch.allclose(features, hf_taps(stories_path, ids, layers), atol=1e-4)


def test_wrong_taps_are_refused(stories, tmp_path):
    for taps, message in (((0, 3, 9), "outside the target's 5 layers"), ((1, 1, 4), "3 distinct")):
        save_draft(new_draft(stories.model.config, tap_layers=taps), tmp_path / str(taps))
        with pytest.raises(ValueError, match=message):
            load_drafter(tmp_path / str(taps), stories)


def test_tap_num_layers_is_the_last_layers_output(stories):
    """Tap N (N layers) is what drafters of the top feature read: the last layer's output, before the final
    norm (the runtimes' agreement on it is test_runtimes.py's)."""
    model, n = stories.model, stories.model.config.num_layers
    ids = torch.tensor([stories.encode("Once upon a time")])
    model.setup_cache(ids.shape[1])
    hidden = model(ids, logits="hidden").hidden
    model.setup_cache(ids.shape[1])
    out = model(ids, taps=(1, n))
    assert torch.equal(out.taps[..., -stories.model.config.hidden_size :], hidden)
    assert not torch.equal(out.taps[..., : stories.model.config.hidden_size], hidden)
    model.setup_cache(ids.shape[1])
    with pytest.raises(ValueError, match="last layer's output"):
        model(ids, taps=(n + 1,))


@pytest.fixture(scope="module")
def trained_other_taps(stories, tmp_path_factory):
    """A draft trained on the layers OTHER_TAPS, on text the target wrote."""
    texts = []
    for i, prompt in enumerate(PROMPTS * 3):
        out = generate(stories, stories.encode(prompt), 60, SamplingParams(temperature=0.8, seed=i))
        texts.append(prompt + out.text)
    examples = [tokenize_text(stories.tokenizer, t) for t in texts]
    cfg = TrainConfig(steps=60, batch_size=4, lr=1e-2, warmup=5, ttt_steps=2, draft_vocab_size=256,
                      save_every=100, tap_layers=OTHER_TAPS)  # fmt: skip
    out = tmp_path_factory.mktemp("taps") / "run"
    train(stories, examples, out, cfg, progress=False)
    return out / "draft"


def accept_lengths(stories, draft_path):
    drafter = load_drafter(draft_path, stories)
    lengths, outputs = [], []
    for prompt in PROMPTS[:3]:
        result = speculative_generate(stories, drafter, stories.encode(prompt), 40, tree=TreeSpec(8, 3, 3))
        lengths += result.accept_lengths
        outputs.append(result.token_ids)
    return lengths, outputs


def test_non_default_taps_survive_conversion_to_speculators_and_back(stories, trained_other_taps, tmp_path, capsys):
    lengths, outputs = accept_lengths(stories, trained_other_taps)
    tau = sum(lengths) / len(lengths)
    assert tau > 1.3  # trained: tokens get accepted
    assert main(["convert", str(trained_other_taps), str(tmp_path / "vllm"), "--to", "speculators"]) == 0
    assert json.loads((tmp_path / "vllm" / "config.json").read_text())["eagle_aux_hidden_state_layer_ids"] == [0, 3, 4]
    assert main(["convert", str(tmp_path / "vllm"), str(tmp_path / "back"), "--to", "eagle"]) == 0
    for path in (tmp_path / "vllm", tmp_path / "back"):
        assert accept_lengths(stories, path) == (lengths, outputs)  # the same proposals, round by round

    # The comparison can fail: the same weights reading the target's default layers propose other trees.
    wrong = tmp_path / "wrong"
    assert main(["convert", str(trained_other_taps), str(wrong), "--to", "speculators"]) == 0
    config = json.loads((wrong / "config.json").read_text())
    config["eagle_aux_hidden_state_layer_ids"] = list(stories.model.config.default_tap_layers)
    (wrong / "config.json").write_text(json.dumps(config))
    wrong_lengths, wrong_outputs = accept_lengths(stories, wrong)
    assert wrong_outputs == outputs  # lossless either way
    assert wrong_lengths != lengths
