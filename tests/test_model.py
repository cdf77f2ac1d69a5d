"""The native runtime against transformers, and the tree-attention / compaction contract."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from eagle3.runtimes.config import default_tap_layers, load_config, UnsupportedModel, config_from_hf
from eagle3.runtimes.cpu_layout import PATHS, add_few_row_copies, set_paths
from eagle3.runtimes.model import load_model
from eagle3.runtimes.norm_folding import fold_norms

TOL = 1e-4


def close(a, b) -> bool:
    """max |a - b| <= 1e-4 * max(1, RMS(b)): absolute for unit-scale tensors, relative to the tensor's scale
    otherwise. SmolLM2's residual stream reaches 2.5e4 (massive activations), where one fp32 ulp is already
    2e-3, and any change of summation order (our [in, out] weight layout) moves its logits by ~1e-4;
    transformers' own eager and sdpa attention differ by 7e-5 there."""
    scale = max(1.0, b.float().pow(2).mean().sqrt().item())
    return (a - b).abs().max().item() <= TOL * scale


def tiny_config(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=8, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    if kind == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return LlamaConfig(**common, rope_parameters=rope)
    if kind == "llama-linear":
        return LlamaConfig(**common, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if kind == "llama-dynamic":
        # max_position_embeddings 64 < the 80 positions the test runs: the NTK stretch kicks in.
        return LlamaConfig(**{**common, "max_position_embeddings": 64},
                           rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    if kind == "llama-bias-tied":
        return LlamaConfig(**{**common, "tie_word_embeddings": True}, attention_bias=True, mlp_bias=True)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if kind == "mistral-sliding":
        return MistralConfig(**common, sliding_window=16)
    raise ValueError(kind)


def hf_reference(folder, ids):
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids, output_hidden_states=True)


def check_parity(folder, ids, chunks=(None,), tap_layers=None):
    """Logits and taps equal transformers', whether the sequence runs in one prefill or in chunks; taps are
    the inputs of the layers asked for (default: the EAGLE-3 defaults), concatenated in layer order. Both the
    model as defined and after the post-load steps load_target applies (norms folded, few-row copies), with
    each matmul path for every row count."""
    ref = hf_reference(folder, ids)
    served = [set_paths(add_few_row_copies(fold_norms(load_model(folder, device="cpu"))), (path,) * 65) for path in PATHS]
    for model in (load_model(folder, device="cpu"), *served):  # as defined, and as served by every matmul path
        model.setup_cache(ids.shape[1])
        layers = tap_layers or default_tap_layers(model.config.num_layers)
        n = ids.shape[1]
        bounds = [0, *[c for c in chunks if c], n]
        logits, taps = [], []
        with torch.no_grad():
            for a, b in zip(bounds, bounds[1:]):
                out = model(ids[:, a:b], taps=layers)
                logits.append(out.logits)
                taps.append(out.taps)
        logits, taps = torch.cat(logits, 1), torch.cat(taps, 1)
        ref_taps = torch.cat([ref.hidden_states[i] for i in sorted(layers)], -1)
        assert close(logits, ref.logits)
        assert close(taps, ref_taps)


def test_folding_norms_moves_them_into_the_matmuls(stories_path):
    """fold_norms leaves no norm weight behind, changes the logits only by rounding, and a second fold is a
    no-op (it must not scale the matrices twice)."""
    ids = torch.randint(3, 512, (1, 24), generator=torch.Generator().manual_seed(1))

    def logits(model):
        model.setup_cache(24)
        with torch.no_grad():
            return model(ids).logits

    plain = load_model(stories_path, device="cpu")
    assert plain.norm is not None and plain.layers[0].attn_norm is not None
    folded = fold_norms(load_model(stories_path, device="cpu"))
    assert folded.norm is None and all(b.attn_norm is None and b.mlp_norm is None for b in folded.layers)
    assert not any(name == "norm" or name.endswith(("attn_norm", "mlp_norm")) for name in folded.state_dict())
    assert close(logits(folded), logits(plain))
    once = folded.layers[0].qkv_weight.clone()
    fold_norms(folded)
    assert folded.layers[0].qkv_weight.equal(once)


KINDS = ["llama3", "llama-linear", "llama-dynamic", "llama-bias-tied", "qwen2", "qwen3", "mistral-sliding"]


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_random_models_match_transformers(kind, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(kind)
    hf = AutoModelForCausalLM.from_config(cfg)
    for name, p in hf.named_parameters():  # non-trivial norms and biases, so that a mix-up would show
        if "norm" in name:
            p.data.normal_(1.0, 0.2)
        elif name.endswith("bias"):
            p.data.normal_(0.0, 0.2)
    hf.save_pretrained(tmp_path)
    length = 80 if kind == "llama-dynamic" else 40
    if kind == "llama-dynamic":
        cfg_dict = load_config(tmp_path)
        assert cfg_dict.rope.type == "dynamic"
        # Grow past max_position_embeddings in one forward: HF recomputes the base for the full length.
        check_parity(tmp_path, torch.randint(0, 97, (1, length)))
    else:
        check_parity(tmp_path, torch.randint(0, 97, (1, length)), chunks=(17, 30, 31))


def test_stories260k_matches_transformers(stories_path):
    torch.manual_seed(1)
    check_parity(stories_path, torch.randint(3, 512, (1, 50)), chunks=(20, 21))
    # Any layers, listed in any order, come back in layer order (as SGLang and vLLM concatenate them).
    check_parity(stories_path, torch.randint(3, 512, (1, 20)), tap_layers=(4, 0, 3))


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_path):
    torch.manual_seed(2)
    check_parity(smollm2_path, torch.randint(0, 49152, (1, 24)), chunks=(20,))


def test_tap_layer_rule():
    assert default_tap_layers(32) == (2, 16, 29)  # Llama-3.1-8B, as in the EAGLE-3 release
    assert default_tap_layers(30) == (2, 15, 27)  # SmolLM2-135M
    assert default_tap_layers(5) == (1, 2, 4)  # stories260K
    assert default_tap_layers(3) == (0, 1, 2)
    for n in range(3, 80):
        taps = default_tap_layers(n)
        assert len(set(taps)) == 3 and list(taps) == sorted(taps) and taps[-1] < n
    with pytest.raises(UnsupportedModel):
        default_tap_layers(2)


def test_unsupported_architecture_is_refused_with_the_supported_list():
    with pytest.raises(UnsupportedModel, match="llama.*mistral.*qwen2.*qwen3"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModel, match="yarn"):
        config_from_hf({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 4,
                        "intermediate_size": 8, "vocab_size": 8, "rope_scaling": {"type": "yarn", "factor": 2.0}})


# ---------------------------------------------------------------------------------------------- trees

# A small tree over 7 new tokens: parent index of each node (-1: child of the committed prefix).
PARENTS = [-1, 0, 0, 1, 1, 2, 5]


def tree_structure(parents):
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parents):
        mask[i, i] = True
        if p >= 0:
            mask[i] |= mask[p]
        depth.append(0 if p < 0 else depth[p] + 1)
    return mask, torch.tensor(depth)


def path_to(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


def test_tree_forward_equals_each_path_alone(stories):
    model = stories.model
    torch.manual_seed(3)
    prefix = torch.randint(3, 512, (1, 12))
    tree_tokens = torch.randint(3, 512, (1, len(PARENTS)))
    mask, depth = tree_structure(PARENTS)
    with torch.no_grad():
        model.setup_cache(64)
        model(prefix, logits="none")
        start = model.cache.length
        tree_logits = model(tree_tokens, positions=start + depth, tree_mask=mask).logits[0]
        for node in range(len(PARENTS)):
            path = path_to(PARENTS, node)
            model.cache.truncate(start)
            path_logits = model(tree_tokens[:, path]).logits[0, -1]
            assert close(path_logits, tree_logits[node]), node


def test_compaction_then_decoding_equals_decoding_the_path(stories):
    model = stories.model
    torch.manual_seed(4)
    prefix = torch.randint(3, 512, (1, 10))
    tree_tokens = torch.randint(3, 512, (1, len(PARENTS)))
    follow = torch.randint(3, 512, (1, 5))
    mask, depth = tree_structure(PARENTS)
    accepted = path_to(PARENTS, 6)  # nodes 0, 2, 5, 6: not a prefix of the slots, so slots really move
    assert accepted == [0, 2, 5, 6]
    with torch.no_grad():
        model.setup_cache(64)
        model(prefix, logits="none")
        start = model.cache.length
        model(tree_tokens, positions=start + depth, tree_mask=mask, logits="none")
        model.cache.compact([start], [accepted])
        assert model.cache.length == start + len(accepted)
        after_compaction = model(follow, taps=(1, 2, 4))

        model.cache.truncate(0)
        direct = model(torch.cat([prefix, tree_tokens[:, accepted], follow], dim=1), taps=(1, 2, 4))
    assert close(after_compaction.logits[0], direct.logits[0, -5:])
    assert close(after_compaction.taps[0], direct.taps[0, -5:])


def ragged_rows_equal_each_row_alone(model, vocab, prefixes, parents, accepted):
    """Rows of different lengths (each prefilled alone into its row), each with its own tree and accepted
    path, verified in one forward and compacted together: every row's tree logits, and its logits and taps
    after compaction, equal that row's sequence decoded alone."""
    torch.manual_seed(5)
    B, n = len(prefixes), max(len(p) for p in parents)
    trees = torch.randint(3, vocab, (B, n))
    masks, positions = torch.zeros(B, n, n, dtype=torch.bool), torch.zeros(B, n, dtype=torch.long)
    for b, (prefix, ps) in enumerate(zip(prefixes, parents)):
        mask, depth = tree_structure(ps)
        masks[b] = torch.eye(n, dtype=torch.bool)  # padding nodes see themselves only
        masks[b, : len(ps), : len(ps)] = mask
        positions[b] = len(prefix) + torch.cat([depth, torch.zeros(n - len(ps), dtype=torch.long)])
    follow = torch.randint(3, vocab, (B, 3))
    taps = (0, 1, model.config.num_layers - 1)
    with torch.no_grad():
        model.setup_cache(64, batch_size=B)
        for b, prefix in enumerate(prefixes):
            model(torch.tensor([prefix]), logits="none", rows=range(b, b + 1))
        starts = list(model.cache.lengths)
        assert starts == [len(p) for p in prefixes]
        tree_logits = model(trees, positions, masks).logits
        model.cache.compact(starts, accepted)
        assert model.cache.lengths == [s + len(a) for s, a in zip(starts, accepted)]
        after = model(follow, taps=taps)
        model.setup_cache(64)
        for b, (prefix, ps) in enumerate(zip(prefixes, parents)):
            for node in range(len(ps)):
                model.cache.truncate(0)
                alone = model(torch.tensor([prefix + trees[b, path_to(ps, node)].tolist()])).logits[0, -1]
                assert close(tree_logits[b, node], alone), (b, node)
            model.cache.truncate(0)
            direct = model(torch.tensor([prefix + trees[b, accepted[b]].tolist() + follow[b].tolist()]), taps=taps)
            assert close(after.logits[b], direct.logits[0, -3:]), b
            assert close(after.taps[b], direct.taps[0, -3:]), b


def test_ragged_rows_equal_each_row_alone(stories):
    prefixes = [list(range(3, 15)), list(range(20, 25)), list(range(40, 60))]
    parents = [PARENTS, [-1, 0, 1], [-1, 0, 0, 2]]
    accepted = [path_to(PARENTS, 6), [0], path_to([-1, 0, 0, 2], 3)]
    ragged_rows_equal_each_row_alone(stories.model, 512, prefixes, parents, accepted)


def test_ragged_rows_with_a_sliding_window(tmp_path):
    """Mistral's sliding window, measured per row in positions, with rows of different lengths past it."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("mistral-sliding")).save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu")
    prefixes = [list(range(3, 30)), list(range(10, 15)), list(range(40, 61))]
    parents = [PARENTS, [-1, 0, 1], [-1, 0, 0, 2]]
    accepted = [path_to(PARENTS, 5), [0, 1, 2], [0, 2]]
    ragged_rows_equal_each_row_alone(model, 97, prefixes, parents, accepted)


def test_cache_overflow_and_context_errors(stories):
    model = stories.model
    model.setup_cache(8)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.ones(1, 9, dtype=torch.long))
    model.setup_cache(16)
    with pytest.raises(ValueError, match="context"):
        model(torch.ones(1, 1, dtype=torch.long), positions=torch.tensor([600]))
