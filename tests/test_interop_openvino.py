"""Drafts and OpenVINO GenAI, proven by GenAI's own code: `eagle3 convert --to openvino` writes the target and the
draft as IR; GenAI's LLMPipeline decodes the target exactly as eagle3 does, and with the draft (its EAGLE-3
speculative mode, which moves our fc into the target and taps the layers the draft names) gives the same
tokens again.

Skipped with the reason when openvino-genai is not installed (it is in the test extras)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

genai = pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (pip install openvino-genai)")

import openvino as ov  # noqa: E402

import eagle3.openvino_export as openvino_export  # noqa: E402
from eagle3.checkpoint import save_draft  # noqa: E402
from eagle3.cli import main  # noqa: E402
from eagle3.config import ModelConfig  # noqa: E402
from eagle3.draft import new_draft  # noqa: E402
from eagle3.generate import generate  # noqa: E402
from eagle3.model import Transformer  # noqa: E402
from interop import scattered, varied  # noqa: E402

PROMPTS = ("Once upon a time", "The little dog")


@pytest.fixture(scope="module")
def exported(stories, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openvino")
    draft = scattered(varied(new_draft(stories.model.config, draft_vocab_size=256, seed=3)), stories.model.config.vocab_size)
    src = save_draft(draft, tmp / "draft")
    assert main(["convert", str(src), "--to", "openvino", str(tmp / "out"), "--target", str(stories.path)]) == 0
    return draft, tmp / "out"


def config(tokens: int, assistant: int | None = None):
    cfg = genai.GenerationConfig()
    cfg.max_new_tokens, cfg.ignore_eos = tokens, True
    if assistant is not None:
        cfg.num_assistant_tokens = assistant
    return cfg


def test_the_draft_ir_names_our_taps_and_vocabulary_as_genai_reads_them(exported):
    draft, out = exported
    ir = ov.Core().read_model(out / "draft" / "openvino_model.xml")
    assert ir.get_rt_info(["eagle3_mode"]).astype(str) == "True"
    assert ir.get_rt_info(["hidden_layers_list"]).astype(str).split() == ["0", "1", "3"]  # layer outputs: taps 1, 2, 4
    d2t = ir.output("d2t").get_node().input_value(0).get_node()
    assert d2t.get_type_name() == "Constant" and np.array_equal(d2t.get_data(), draft.d2t.numpy())
    assert [p.get_any_name() for p in ir.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    for name in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml", "config.json"):
        assert (out / "target" / name).is_file(), name


def test_genai_decodes_our_target_as_we_do_and_our_draft_losslessly(stories, exported):
    _, out = exported
    plain_pipe = genai.LLMPipeline(str(out / "target"), "CPU")
    spec_pipe = genai.LLMPipeline(str(out / "target"), "CPU", draft_model=genai.draft_model(str(out / "draft"), "CPU"))
    for text in PROMPTS:
        prompt = stories.encode(text)
        ours = generate(stories, prompt, 40).token_ids
        ids = ov.Tensor(np.array([prompt], dtype=np.int64))
        plain = list(plain_pipe.generate(ids, config(40)).tokens[0])
        assert plain == list(ours), text
        for assistant in (1, 3, 5):
            assert list(spec_pipe.generate(ids, config(40, assistant)).tokens[0]) == plain, (text, assistant)


# A target whose layer 3 alone writes a marker on channel M (layer 4 takes it away again), so that only one
# layer's output carries it, and which always predicts token A; a draft that predicts A when its third tap holds
# the marker and B otherwise. Taps (1, 2, 4): the third is layer 4's input, layer 3's output.
V, D, M, A, B = 64, 16, 5, 7, 9
MARKED = ModelConfig(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=16, num_layers=5, num_heads=2,
                     num_kv_heads=1, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5, eos_token_ids=(V - 1,))  # fmt: skip


def marked_target() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(MARKED)
    inner = MARKED.intermediate_size
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight[:, 0] = 1.0  # a constant channel the MLPs read
        model.embed.weight[:, 8:] = 0.01 * torch.randn(V, D - 8)
        for block in model.layers:  # (attention's output projection stays zero)
            block.attn_norm.fill_(1.0), block.mlp_norm.fill_(1.0), block.qkv_weight.normal_(0, 0.1)
        put, take = model.layers[3], model.layers[4]
        put.gate_up_weight[0, 0], put.gate_up_weight[0, inner], put.down_weight[0, M] = 4.0, 1.0, 5.0 / 64
        take.gate_up_weight[0, 0], take.gate_up_weight[M, inner], take.down_weight[0, M] = 10.0, 1.0, -0.1624
        model.norm.fill_(1.0)
        model.lm_head_weight[0, A] = 10.0
    return model


def marker_draft():
    draft = new_draft(MARKED, draft_vocab_size=V, tap_layers=(1, 2, 4))
    with torch.no_grad():
        for p in draft.parameters():
            p.zero_()
        for norm in (draft.norm, draft.midlayer.input_layernorm, draft.midlayer.hidden_norm,
                     draft.midlayer.post_attention_layernorm):  # fmt: skip
            norm.weight.fill_(1.0)
        draft.fc.weight[0, 2 * D + M] = 1.0  # the third tap's marker ...
        draft.fc.weight[1, 2 * D] = 1.0  # ... and its constant channel
        draft.lm_head.weight[A, 0], draft.lm_head.weight[B, 1] = 1.0, 2.0
    return draft


def test_genai_taps_the_layers_the_draft_names(tmp_path, monkeypatch):
    model, draft = marked_target(), marker_draft()
    # Here: the marker is in tap 4 (layer 4's input) alone, and the draft reads it there.
    draft.attach(model.embed.weight)
    for taps, expected in (((1, 2, 4), A), ((1, 2, 3), B)):
        model.setup_cache(8), draft.setup_cache(8)
        with torch.no_grad():
            hidden = model(torch.tensor([[1, 2, 3]]), taps=taps).taps
            assert draft.logits(draft(torch.tensor([[2, 3, 4]]), hidden, torch.arange(3))).argmax(-1).eq(expected).all()

    def accepted(layers_for) -> tuple[int, int]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        monkeypatch.setattr(openvino_export, "genai_hidden_layers", layers_for)
        openvino_export.write_genai_folders(model, draft, out)
        props = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
        pipe = genai.LLMPipeline(str(out / "target"), "CPU", draft_model=genai.draft_model(str(out / "draft"), "CPU",
                                 **props), **props)  # fmt: skip
        result = pipe.generate(ov.Tensor(np.array([[1, 2, 3, 4]], dtype=np.int64)), config(24, 3))
        assert list(result.tokens[0]) == [A] * 24
        metrics = result.extended_perf_metrics
        return metrics.get_num_accepted_tokens(), metrics.get_num_draft_tokens()

    # GenAI reads the marked layer, as exported: every drafted token is accepted ...
    got, drafted = accepted(openvino_export.genai_hidden_layers)
    assert drafted > 0 and got == drafted
    # ... and with the third layer one off either way, never (the check can fail).
    for shift in (1, -1):
        assert accepted(lambda taps, s=shift: [taps[0] - 1, taps[1] - 1, taps[2] - 1 + s])[0] == 0


def test_convert_to_openvino_refuses_what_it_cannot_do(stories, exported, tmp_path, capsys):
    _, out = exported
    src = save_draft(new_draft(stories.model.config, seed=1), tmp_path / "draft")
    assert main(["convert", str(src), "--to", "openvino", str(tmp_path / "a")]) == 2
    assert "--target" in capsys.readouterr().err
    before = sorted(p.name for p in out.iterdir())
    assert main(["convert", str(src), "--to", "openvino", str(out), "--target", str(stories.path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before
    for overrides, reason in (({"fc_bias": True}, "fc bias"), ({"tap_layers": (0, 2, 4)}, "tap 0")):
        odd = new_draft(stories.model.config, seed=1, **overrides)
        with torch.no_grad():
            odd.fc.bias.zero_() if odd.fc.bias is not None else None
        src = save_draft(odd, tmp_path / reason.replace(" ", "-"))
        assert main(["convert", str(src), "--to", "openvino", str(tmp_path / "b"), "--target", str(stories.path)]) == 2
        assert reason in capsys.readouterr().err and not (tmp_path / "b").exists()
