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

from eagle3.formats.checkpoint import save_draft  # noqa: E402
from eagle3.cli import main  # noqa: E402
from eagle3.methods.draft import new_draft  # noqa: E402
from eagle3.decoding.generate import generate  # noqa: E402
from eagle3.runtimes.openvino_runtime import own_signal_stack  # noqa: E402
from eagle3.runtimes.target import load_target  # noqa: E402
from interop import MARKED_TAPS, TOKEN_A, marked_target_folder, marker_draft, scattered, varied  # noqa: E402

PROMPTS = ("Once upon a time", "The little dog")
F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}  # (CPUs with bf16 would default to it)


@pytest.fixture(autouse=True)
def signal_stack():
    """GenAI's pipelines, like OpenVINO's compiled models, leave the thread an alternate signal stack that dies
    with them; a later SIGTERM (test_train sends one) then crashed the process."""
    with own_signal_stack():
        yield


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
    plain_pipe = genai.LLMPipeline(str(out / "target"), "CPU", **F32)
    spec_pipe = genai.LLMPipeline(str(out / "target"), "CPU", draft_model=genai.draft_model(str(out / "draft"), "CPU",
                                  **F32), **F32)  # fmt: skip
    for text in PROMPTS:
        prompt = stories.encode(text)
        ours = generate(stories, prompt, 40).token_ids
        ids = ov.Tensor(np.array([prompt], dtype=np.int64))
        plain = list(plain_pipe.generate(ids, config(40)).tokens[0])
        assert plain == list(ours), text
        for assistant in (1, 3, 5):
            assert list(spec_pipe.generate(ids, config(40, assistant)).tokens[0]) == plain, (text, assistant)


def test_an_int8_target_decodes_as_its_dequantized_weights_and_our_draft_losslessly(stories, tmp_path):
    """--target-precision int8 stores every matrix as int8 with a scale per output row (the embedding lookup stays
    fp32) and asks OpenVINO not to quantize activations: GenAI then decodes as eagle3 decodes a copy of the target
    whose matrices hold those int8 values times their scales, and its EAGLE-3 pipeline still equals its plain
    decoding on that target. (stories260K is too narrow for OpenVINO to quantize its activations anyway; what the
    option changes on SmolLM2 is measured in docs/results/2026-12-05-peers-genai.md.)"""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from eagle3.runtimes.native_weights import int8_rows

    draft = scattered(varied(new_draft(stories.model.config, draft_vocab_size=256, seed=3)), stories.model.config.vocab_size)
    src = save_draft(draft, tmp_path / "draft")
    assert main(["convert", str(src), "--to", "openvino", str(tmp_path / "ov"), "--target", str(stories.path),
                 "--target-precision", "int8"]) == 0  # fmt: skip
    ir = ov.Core().read_model(tmp_path / "ov" / "target" / "openvino_model.xml")
    int8 = [op for op in ir.get_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert len(int8) == 7 * stories.model.config.num_layers + 1  # q, k, v, o, gate, up, down per layer; the head
    assert ir.get_rt_info(["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"]).astype(str) == "0"

    # The reference: the same model with each matrix dequantized, the head untied from the embedding lookup.
    reference = tmp_path / "reference"
    shutil.copytree(stories.path, reference)
    weights = load_file(reference / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    for name, w in weights.items():
        if w.dim() == 2 and name != "model.embed_tokens.weight":
            q, scale = int8_rows(w)
            weights[name] = q.float() * scale[:, None]
    save_file(weights, reference / "model.safetensors")
    config_file = reference / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tie_word_embeddings": False}))
    dequantized = load_target(str(reference))

    plain_pipe = genai.LLMPipeline(str(tmp_path / "ov" / "target"), "CPU", **F32)
    spec_pipe = genai.LLMPipeline(str(tmp_path / "ov" / "target"), "CPU",
                                  draft_model=genai.draft_model(str(tmp_path / "ov" / "draft"), "CPU", **F32), **F32)
    for text in PROMPTS:
        prompt = stories.encode(text)
        ids = ov.Tensor(np.array([prompt], dtype=np.int64))
        plain = list(plain_pipe.generate(ids, config(40)).tokens[0])
        assert plain == list(generate(dequantized, prompt, 40).token_ids), text
        assert list(spec_pipe.generate(ids, config(40, 3)).tokens[0]) == plain, text


@pytest.fixture(scope="module")
def marked(stories, tmp_path_factory):
    """The marked target (tests/interop.py) as a checkpoint folder, loaded."""
    folder = marked_target_folder(tmp_path_factory.mktemp("marked") / "target", stories.path)
    return load_target(str(folder), device="cpu")


def test_genai_taps_the_layers_the_draft_names(marked, tmp_path):
    def accepted(taps) -> int:
        src = save_draft(marker_draft(marked.model.config, taps), tmp_path / f"draft-{taps[2]}")
        out = tmp_path / f"out-{taps[2]}"
        assert main(["convert", str(src), "--to", "openvino", str(out), "--target", str(marked.path)]) == 0
        pipe = genai.LLMPipeline(str(out / "target"), "CPU", draft_model=genai.draft_model(str(out / "draft"), "CPU",
                                 **F32), **F32)  # fmt: skip
        result = pipe.generate(ov.Tensor(np.array([[1, 20, 30, 40]], dtype=np.int64)), config(24, 3))
        assert list(result.tokens[0]) == [TOKEN_A] * 24
        metrics = result.extended_perf_metrics
        assert metrics.get_num_draft_tokens() > 0
        return metrics.get_num_accepted_tokens() / metrics.get_num_draft_tokens()

    # GenAI feeds the draft the marked layer, as exported: every drafted token is accepted; with the third tap one
    # layer off either way, none is (the check can fail).
    assert accepted(MARKED_TAPS) == 1.0
    assert accepted((1, 2, 3)) == 0.0 and accepted((1, 2, 5)) == 0.0


def test_convert_to_openvino_refuses_what_it_cannot_do(stories, exported, tmp_path, capsys):
    _, out = exported
    src = save_draft(new_draft(stories.model.config, seed=1), tmp_path / "draft")
    assert main(["convert", str(src), "--to", "openvino", str(tmp_path / "a")]) == 2
    assert "--target" in capsys.readouterr().err
    assert main(["convert", str(src), "--to", "eagle", str(tmp_path / "a"), "--target-precision", "int8"]) == 2
    assert "--target-precision goes with --to openvino" in capsys.readouterr().err and not (tmp_path / "a").exists()
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
