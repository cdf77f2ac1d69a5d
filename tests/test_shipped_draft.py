"""The draft shipped for SmolLM2-135M: small, in the official layout, lossless, and trained (it gets accepted)."""

import json

import pytest
from safetensors import safe_open

from eagle3.methods.drafter import load_drafter
from eagle3.fetch import resolve_draft, shipped_draft
from eagle3.decoding.generate import generate
from eagle3.decoding.speculative import speculative_generate
from eagle3.decoding.tree import TreeSpec

pytestmark = pytest.mark.slow


def test_shipped_draft_is_small_and_in_the_official_layout():
    folder = shipped_draft("smollm2-135m")
    assert folder is not None and resolve_draft("default", "smollm2-135m") == folder
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] < config["vocab_size"]
    with safe_open(weights, "pt") as f:
        keys = set(f.keys())
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight", "d2t", "t2d"} <= keys


def test_shipped_draft_is_lossless_and_accepted(smollm2):
    ids = smollm2.encode("Give me three tips for staying healthy.", chat=True)
    plain = generate(smollm2, ids, 64)
    taus = {}
    for int8 in (False, True):  # the lm_head in float32, then in int8 (the default on CPU)
        drafter = load_drafter(shipped_draft("smollm2-135m"), smollm2, int8=int8)
        assert (getattr(drafter.draft.lm_head, "int8", None) is not None) == int8
        spec = speculative_generate(smollm2, drafter, ids, 64, tree=TreeSpec(16, 4, 4))
        assert spec.token_ids == plain.token_ids
        taus[int8] = spec.tau
    # An untrained draft scores about 1.0; the shipped one (measured 1.43 here) must be clearly accepted, and
    # an int8 lm_head must not cost it much.
    assert taus[False] > 1.3 and taus[True] > taus[False] - 0.1
