"""Draft checkpoints: the official EAGLE/SGLang and speculators/vLLM layouts, conversions, atomic saves.

Reference checkpoints are written by hand here (config.json + tensors with the published names and shapes),
not by save_draft, so the loader is checked against the layouts themselves.
"""

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle3.formats import checkpoint
from eagle3.formats.checkpoint import (
    CLI_COMMANDS, CheckpointExists, add_cli_parsers, convert, init_draft, load_draft, read_draft_config, save_draft,
)  # fmt: skip
from eagle3.runtimes.config import RopeConfig, load_config

# A draft narrower than its target (H=64, H_target=96), with a reduced draft vocabulary.
DIMS = dict(H=64, Ht=96, I=128, heads=4, kv=2, hd=16, vocab=300, dvocab=100)
LAYER_KEYS = (
    "input_layernorm.weight", "hidden_norm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)  # fmt: skip


def tensors(H, Ht, I, heads, kv, hd, vocab, dvocab, prefix="midlayer", vocab_map=True, dtype=torch.float32, seed=0):
    """Random weights with the published key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "fc.weight": (H, 3 * Ht),
        f"{prefix}.input_layernorm.weight": (H,),
        f"{prefix}.hidden_norm.weight": (H,),
        f"{prefix}.self_attn.q_proj.weight": (heads * hd, 2 * H),
        f"{prefix}.self_attn.k_proj.weight": (kv * hd, 2 * H),
        f"{prefix}.self_attn.v_proj.weight": (kv * hd, 2 * H),
        f"{prefix}.self_attn.o_proj.weight": (H, heads * hd),
        f"{prefix}.post_attention_layernorm.weight": (H,),
        f"{prefix}.mlp.gate_proj.weight": (I, H),
        f"{prefix}.mlp.up_proj.weight": (I, H),
        f"{prefix}.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,),
        "lm_head.weight": (dvocab, H),
    }
    out = {k: (torch.randn(*s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}
    if vocab_map:
        used = torch.randperm(vocab, generator=g)[:dvocab].sort().values
        out["d2t"] = used - torch.arange(dvocab)
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[used] = True
        out["t2d"] = t2d
    return out


def official_config(H, Ht, I, heads, kv, hd, vocab, dvocab, **extra):
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": I, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "num_hidden_layers": 1, "vocab_size": vocab, "draft_vocab_size": dvocab, "target_hidden_size": Ht,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "rope_theta": 500000.0, "bias": False,
        "torch_dtype": "float32", "tie_word_embeddings": False, "hidden_act": "silu",
    }  # fmt: skip
    cfg.update(extra)
    return {k: v for k, v in cfg.items() if v is not None}


def speculators_config(H, Ht, I, heads, kv, hd, vocab, dvocab, taps=None, tokens=3):
    cfg = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.3.0",
        "transformer_layer_config": {
            "model_type": "llama", "hidden_size": H, "intermediate_size": I, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": hd, "num_hidden_layers": 1, "vocab_size": vocab,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        },  # fmt: skip
        "draft_vocab_size": dvocab,
        "target_hidden_size": Ht,
        "norm_before_residual": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": tokens}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": "org/target", "architectures": ["LlamaForCausalLM"]},
        },
    }
    if taps is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = list(taps)
    return cfg


def write(folder: Path, config: dict, weights: dict, bin_file: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if bin_file:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        save_file(weights, str(folder / "model.safetensors"))
    return folder


def own_key(name: str) -> str:
    return name.replace("layers.0.", "midlayer.", 1) if name.startswith("layers.0.") else name


def assert_same_tensors(state: dict, reference: dict) -> None:
    """Equal tensors (and dtypes) under the draft's own names, whichever layout either side uses."""
    reference = {own_key(k): v for k, v in reference.items() if k != "embed_tokens.weight"}
    state = {own_key(k): v for k, v in state.items()}
    assert set(state) == set(reference)
    for k, v in reference.items():
        assert state[k].dtype == v.dtype, k
        assert torch.equal(state[k].cpu(), v), k


def canonical(cfg):
    """DraftConfig without the rope fields the rope type does not use (they do not round-trip)."""
    rope = cfg.rope if cfg.rope.type == "llama3" else RopeConfig(cfg.rope.theta, cfg.rope.type, cfg.rope.factor)
    return replace(cfg, rope=rope)


# ---------------------------------------------------------------------------------------------- loading


def test_official_reduced_vocab(tmp_path):
    w = tensors(**DIMS)
    cfg = official_config(**DIMS, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 5]})
    draft = load_draft(write(tmp_path / "d", cfg, w), device="cpu")
    assert_same_tensors(draft.state_dict(), w)
    c = draft.config
    assert (c.hidden_size, c.target_hidden_size, c.vocab_size, c.draft_vocab_size) == (64, 96, 300, 100)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (4, 2, 16, 128)
    assert c.rope.theta == 500000.0 and c.rms_norm_eps == 1e-5 and not c.fc_bias
    assert c.tap_layers == (2, 4, 6)  # SGLang's ids are layer outputs: +1 gives layer inputs
    assert torch.equal(draft.to_target_ids(torch.arange(100)), w["t2d"].nonzero().flatten())


@pytest.mark.parametrize("bin_file", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_official_full_vocab_defaults(tmp_path, bin_file):
    dims = {**DIMS, "dvocab": DIMS["vocab"], "Ht": DIMS["H"]}
    w = tensors(**dims, vocab_map=False)
    cfg = official_config(**dims, architectures=["LlamaForCausalLM"], rope_theta=None, head_dim=None,
                          draft_vocab_size=None, target_hidden_size=None)  # fmt: skip
    draft = load_draft(write(tmp_path / "d", cfg, w, bin_file), device="cpu")
    c = draft.config
    assert c.rope.theta == 10000.0  # EAGLE's default, never the target's
    assert c.head_dim == 64 // 4 and c.draft_vocab_size == c.vocab_size == 300 and c.target_hidden_size == 64
    assert c.tap_layers is None
    state = draft.state_dict()
    assert torch.equal(state["d2t"], torch.zeros(300, dtype=torch.long))
    assert state["t2d"].dtype == torch.bool and bool(state["t2d"].all())
    assert_same_tensors({k: v for k, v in state.items() if k not in ("d2t", "t2d")}, w)


def test_embed_tokens_is_ignored(tmp_path):
    w = tensors(**DIMS)
    w_embed = {**w, "embed_tokens.weight": torch.randn(DIMS["vocab"], DIMS["H"])}
    draft = load_draft(write(tmp_path / "d", official_config(**DIMS), w_embed), device="cpu")
    assert_same_tensors(draft.state_dict(), w)
    assert draft.embed_weight is None


def test_t2d_is_derived_from_d2t(tmp_path):
    w = tensors(**DIMS)
    t2d = w.pop("t2d")
    draft = load_draft(write(tmp_path / "d", official_config(**DIMS), w), device="cpu")
    assert torch.equal(draft.t2d, t2d)


def test_speculators(tmp_path):
    w = tensors(**DIMS, prefix="layers.0")
    w["embed_tokens.weight"] = torch.randn(DIMS["vocab"], DIMS["H"])  # speculators' converter adds one
    path = write(tmp_path / "s", speculators_config(**DIMS, taps=[2, 4, 6]), w)
    draft = load_draft(path, device="cpu")
    assert_same_tensors(draft.state_dict(), w)
    assert draft.config.tap_layers == (2, 4, 6)  # vLLM's ids are layer inputs, ours
    assert (draft.config.target_hidden_size, draft.config.draft_vocab_size) == (96, 100)
    meta = read_draft_config(path)[1]
    assert (meta.format, meta.verifier, meta.speculative_tokens) == ("speculators", "org/target", 3)


def test_load_dtype_and_device(tmp_path):
    w = tensors(**DIMS, dtype=torch.bfloat16)
    path = write(tmp_path / "d", official_config(**DIMS), w)
    draft = load_draft(path, device="cpu")
    assert draft.fc.weight.dtype == torch.bfloat16 and draft.d2t.dtype == torch.long
    draft = load_draft(path, device="cpu", dtype="float32")
    assert draft.lm_head.weight.dtype == torch.float32 and draft.t2d.dtype == torch.bool


# ---------------------------------------------------------------------------------------------- errors


def test_wrong_shape_names_the_key(tmp_path):
    w = tensors(**DIMS)
    w["midlayer.self_attn.k_proj.weight"] = torch.zeros(DIMS["heads"] * DIMS["hd"], 2 * DIMS["H"])
    with pytest.raises(ValueError, match=r"'midlayer\.self_attn\.k_proj\.weight'.*\(64, 128\), expected \(32, 128\)"):
        load_draft(write(tmp_path / "d", official_config(**DIMS), w), device="cpu")


def test_speculators_wrong_shape_names_the_file_key(tmp_path):
    w = tensors(**DIMS, prefix="layers.0")
    w["fc.weight"] = torch.zeros(DIMS["H"], 3 * DIMS["H"])
    with pytest.raises(ValueError, match=r"'fc\.weight'.*\(64, 192\), expected \(64, 288\)"):
        load_draft(write(tmp_path / "s", speculators_config(**DIMS), w), device="cpu")
    w = tensors(**DIMS, prefix="layers.0")
    w["layers.0.mlp.up_proj.weight"] = torch.zeros(7, 64)
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.up_proj\.weight'.*\(7, 64\), expected \(128, 64\)"):
        load_draft(write(tmp_path / "s2", speculators_config(**DIMS), w), device="cpu")


def test_missing_and_unknown_keys(tmp_path):
    w = tensors(**DIMS)
    del w["norm.weight"]
    with pytest.raises(ValueError, match=r"lacks tensor 'norm\.weight' \(expected shape \(64,\)\)"):
        load_draft(write(tmp_path / "a", official_config(**DIMS), w), device="cpu")
    w = {**tensors(**DIMS), "midlayer.extra.weight": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'midlayer\.extra\.weight'"):
        load_draft(write(tmp_path / "b", official_config(**DIMS), w), device="cpu")
    w = tensors(**DIMS)
    del w["d2t"]
    with pytest.raises(ValueError, match=r"lacks 'd2t'"):
        load_draft(write(tmp_path / "c", official_config(**DIMS), w), device="cpu")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_draft(tmp_path / "nowhere", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_draft(tmp_path / "empty", device="cpu")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(official_config(**DIMS)))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_draft(tmp_path / "noweights", device="cpu")


def test_unsupported_variants(tmp_path):
    w = tensors(**DIMS)
    with pytest.raises(ValueError, match="architectures"):
        load_draft(write(tmp_path / "a", official_config(**DIMS, architectures=["MistralForCausalLM"]), w))
    spec = speculators_config(**DIMS)
    spec["norm_before_residual"] = True
    ws = tensors(**DIMS, prefix="layers.0")
    with pytest.raises(ValueError, match="norm_before_residual"):
        load_draft(write(tmp_path / "b", spec, ws), device="cpu")
    del spec["norm_before_residual"]
    with pytest.raises(ValueError, match="norm_before_residual"):
        load_draft(write(tmp_path / "c", spec, ws), device="cpu")
    with pytest.raises(ValueError, match="one decoder layer"):
        load_draft(write(tmp_path / "d", official_config(**DIMS, num_hidden_layers=2), w), device="cpu")
    for key in ("fc_norm", "norm_output", "norm_before_fc"):  # speculators' variants of the head
        with pytest.raises(ValueError, match=key):
            load_draft(write(tmp_path / key, {**speculators_config(**DIMS), "norm_before_residual": False, key: True},
                             ws), device="cpu")  # fmt: skip


def test_mismatched_target(tmp_path, stories_path):
    stories = load_config(stories_path)  # vocab 512, hidden 64, 5 layers
    path = write(tmp_path / "d", official_config(**DIMS), tensors(**DIMS))
    with pytest.raises(ValueError, match=r"draft and target do not match: .*vocabulary is 300 ids.*512"):
        load_draft(path, target_config=stories, device="cpu")
    dims = {**DIMS, "vocab": 512, "Ht": 64}
    cfg = official_config(**dims, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 2, 7]})
    path = write(tmp_path / "e", cfg, tensors(**dims))
    with pytest.raises(ValueError, match=r"draft and target do not match: tapped layers \[1, 3, 8\] include \[8\]"):
        load_draft(path, target_config=stories, device="cpu")


# ---------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("fmt", ["eagle", "speculators"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_round_trip(tmp_path, fmt, dtype):
    src = write(tmp_path / "src", official_config(**DIMS, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 5]}),
                tensors(**DIMS, dtype=dtype))  # fmt: skip
    draft = load_draft(src, device="cpu")
    out = save_draft(draft, tmp_path / "out", fmt, verifier="org/target", speculative_tokens=4)
    again = load_draft(out, device="cpu")
    assert_same_tensors(again.state_dict(), draft.state_dict())
    assert canonical(again.config) == canonical(draft.config)
    meta = read_draft_config(out)[1]
    assert (meta.format, meta.verifier, meta.speculative_tokens) == (fmt, "org/target", 4)
    names = set(load_file(str(out / "model.safetensors")))
    prefix = "midlayer." if fmt == "eagle" else "layers.0."
    assert names == {prefix + k for k in LAYER_KEYS} | {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"}
    # The weights are as readable as the config (safetensors alone would create them owner-only).
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777


def test_round_trip_rope_scaling(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    src = write(tmp_path / "src", official_config(**DIMS, rope_scaling=rope), tensors(**DIMS))
    draft = load_draft(src, device="cpu")
    assert draft.config.rope.type == "llama3"
    for fmt in ("eagle", "speculators"):
        out = save_draft(draft, tmp_path / fmt, fmt)
        assert read_draft_config(out)[0] == draft.config


def test_exported_configs(tmp_path):
    src = write(tmp_path / "src", speculators_config(**DIMS, taps=[2, 15, 27], tokens=3),
                tensors(**DIMS, prefix="layers.0"))  # fmt: skip
    draft = load_draft(src, device="cpu")
    eagle = json.loads((save_draft(draft, tmp_path / "e", "eagle") / "config.json").read_text())
    assert eagle["architectures"] == ["LlamaForCausalLMEagle3"] and eagle["num_hidden_layers"] == 1
    assert eagle["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 14, 26]  # SGLang: layer outputs
    assert eagle["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]  # vLLM: layer inputs
    assert (eagle["vocab_size"], eagle["draft_vocab_size"], eagle["target_hidden_size"]) == (300, 100, 96)
    assert eagle["rope_theta"] == 10000.0 and eagle["bias"] is False and eagle["tie_word_embeddings"] is False
    assert eagle["torch_dtype"] == "float32" and eagle["hidden_act"] == "silu" and "rope_scaling" not in eagle
    spec = json.loads((save_draft(draft, tmp_path / "s", "speculators", verifier="org/t", speculative_tokens=2)
                       / "config.json").read_text())  # fmt: skip
    assert spec["speculators_model_type"] == "eagle3" and spec["architectures"] == ["Eagle3Speculator"]
    assert spec["norm_before_residual"] is False and spec["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert spec["draft_vocab_size"] == 100 and spec["target_hidden_size"] == 96
    layer = spec["transformer_layer_config"]
    assert (layer["num_hidden_layers"], layer["vocab_size"], layer["hidden_size"], layer["head_dim"]) == (1, 300, 64, 16)
    sc = spec["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"][0] == {"proposal_type": "greedy", "speculative_tokens": 2,
                                         "verifier_accept_k": 1, "accept_tolerance": 0.0}  # fmt: skip
    assert sc["verifier"] == {"name_or_path": "org/t", "architectures": []}
    assert "speculators_version" in spec


def test_eagle_speculators_eagle(tmp_path):
    w = tensors(**DIMS)
    src = write(tmp_path / "src", official_config(**DIMS, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 14, 26]}), w)
    mid = convert(src, "speculators", tmp_path / "mid", verifier="org/target")
    spec = json.loads((mid / "config.json").read_text())
    assert spec["norm_before_residual"] is False and spec["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert spec["speculators_config"]["verifier"]["name_or_path"] == "org/target"
    assert_same_tensors(load_file(str(mid / "model.safetensors")), w)
    back = convert(mid, "eagle", tmp_path / "back")
    assert_same_tensors(load_file(str(back / "model.safetensors")), w)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 14, 26] and cfg["draft_vocab_size"] == 100
    assert canonical(read_draft_config(back)[0]) == canonical(read_draft_config(src)[0])


def test_convert_to_half_precision(tmp_path):
    w = tensors(**DIMS)
    src = write(tmp_path / "src", official_config(**DIMS), w)
    half = convert(src, "eagle", tmp_path / "half", dtype=torch.float16)
    got = load_file(str(half / "model.safetensors"))
    assert got["fc.weight"].dtype == torch.float16 and got["d2t"].dtype == w["d2t"].dtype  # ids stay integers
    assert torch.equal(got["fc.weight"], w["fc.weight"].half())
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "float16"
    assert (half / "model.safetensors").stat().st_size < 0.6 * (src / "model.safetensors").stat().st_size


def test_speculators_eagle_speculators(tmp_path):
    w = tensors(**DIMS, prefix="layers.0")
    src = write(tmp_path / "src", speculators_config(**DIMS, taps=[2, 4, 6], tokens=3), w)
    mid = convert(src, "eagle", tmp_path / "mid")
    assert json.loads((mid / "config.json").read_text())["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]
    back = convert(mid, "speculators", tmp_path / "back")
    assert_same_tensors(load_file(str(back / "model.safetensors")), w)
    assert set(load_file(str(back / "model.safetensors"))) == set(w) - {"embed_tokens.weight"}
    a, b = (json.loads((p / "config.json").read_text()) for p in (src, back))
    for key in ("speculators_model_type", "draft_vocab_size", "target_hidden_size", "norm_before_residual",
                "eagle_aux_hidden_state_layer_ids"):  # fmt: skip
        assert b[key] == a[key], key
    assert "norm_before_residual" in b
    assert b["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert b["speculators_config"]["verifier"] == a["speculators_config"]["verifier"]


def test_save_is_atomic(tmp_path, monkeypatch):
    draft = load_draft(write(tmp_path / "src", official_config(**DIMS), tensors(**DIMS)), device="cpu")

    def fail(tensors, path):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_write_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        save_draft(draft, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temp folder left behind

    monkeypatch.undo()
    save_draft(draft, tmp_path / "out", "speculators")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(checkpoint, "_write_weights", fail)
    with pytest.raises(OSError):
        save_draft(draft, tmp_path / "out", "eagle", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_save_never_deletes_what_it_did_not_write(tmp_path):
    """A folder that holds files is refused without overwrite; with it, only config.json and model.safetensors
    are replaced and every other file stays."""
    draft = load_draft(write(tmp_path / "src", official_config(**DIMS), tensors(**DIMS)), device="cpu")
    save_draft(draft, tmp_path / "out")
    with pytest.raises(CheckpointExists, match="--overwrite"):
        save_draft(draft, tmp_path / "out", "speculators")
    (tmp_path / "out" / "README.md").write_text("model card")
    save_draft(draft, tmp_path / "out", "speculators", overwrite=True)
    assert read_draft_config(tmp_path / "out")[1].format == "speculators"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (tmp_path / "out" / "README.md").read_text() == "model card"

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        save_draft(draft, tmp_path / "other")
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
    (tmp_path / "other" / "pytorch_model.bin").write_bytes(b"old weights")  # would shadow the new ones
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        save_draft(draft, tmp_path / "other", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        save_draft(draft, tmp_path / "file", overwrite=True)

    (tmp_path / "empty").mkdir()  # an empty folder is as good as none
    save_draft(draft, tmp_path / "empty")
    assert read_draft_config(tmp_path / "empty")[1].format == "eagle"


def test_interrupted_saves_leave_temps_that_the_next_save_removes(tmp_path):
    draft = load_draft(write(tmp_path / "src", official_config(**DIMS), tensors(**DIMS)), device="cpu")
    dead = 2**22 + 12345  # a process id no live process has (above Linux's default pid_max)
    stale = tmp_path / f".out.tmp-{dead}-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    mine = tmp_path / f".out.tmp-{os.getpid()}-live"  # a live writer's temp is never touched
    mine.mkdir()
    save_draft(draft, tmp_path / "out")
    assert not stale.exists() and mine.exists()


# ---------------------------------------------------------------------------------------------- with a target


def test_stories_forward(tmp_path, stories_path):
    from eagle3.runtimes.model import load_model

    model = load_model(stories_path, device="cpu")
    dims = dict(H=64, Ht=64, I=172, heads=8, kv=4, hd=8, vocab=512, dvocab=128)
    cfg = official_config(**dims, eagle_config={"eagle_aux_hidden_state_layer_ids": [0, 1, 3]})
    draft = load_draft(write(tmp_path / "d", cfg, tensors(**dims)), target_config=load_config(stories_path), device="cpu")
    assert draft.config.tap_layers == (1, 2, 4) == load_config(stories_path).default_tap_layers
    draft.attach(model.embed.weight)
    draft.setup_cache(16)
    h = draft(torch.tensor([[1, 2, 3]]), torch.randn(1, 3, 192), torch.arange(3))
    assert h.shape == (1, 3, 64) and bool(torch.isfinite(h).all())
    logits = draft.logits(h)
    assert logits.shape == (1, 3, 128) and bool(torch.isfinite(logits).all())


def test_init_draft_and_cli(tmp_path, stories_path):
    out = init_draft(str(stories_path), tmp_path / "fresh", draft_vocab_size=100)
    target = load_config(stories_path)
    draft = load_draft(out, target_config=target, device="cpu")
    assert draft.config.draft_vocab_size == 100 and draft.config.tap_layers == target.default_tap_layers
    meta = read_draft_config(out)[1]
    assert meta.verifier == str(stories_path) and meta.verifier_architectures == ("LlamaForCausalLM",)

    parser = argparse.ArgumentParser()
    add_cli_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", str(out), str(tmp_path / "spec"), "--to", "speculators"])
    assert CLI_COMMANDS[args.command](args) == 0
    spec = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert spec["speculators_config"]["verifier"]["architectures"] == ["LlamaForCausalLM"]
    assert_same_tensors(load_draft(tmp_path / "spec", device="cpu").state_dict(), draft.state_dict())
    args = parser.parse_args(["draft-init", "--target", str(stories_path), str(tmp_path / "init2"), "--draft-vocab", "64"])
    assert CLI_COMMANDS[args.command](args) == 0
    assert read_draft_config(tmp_path / "init2")[0].draft_vocab_size == 64
