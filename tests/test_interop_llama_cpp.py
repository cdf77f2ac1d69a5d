"""Drafts for llama.cpp (`eagle3 convert --to gguf`), proven by llama.cpp's own code: its converter writes the
file, its gguf-py reads back our tensors and the layers we tapped, and its speculative example runs the draft
(`--spec-type draft-eagle3`) beside the target. Each part is skipped, saying why, where that code is absent:
`bash scripts/install_peers.sh --convert-only` fetches the converter; `bash scripts/interop.sh --llama-cpp`
builds the example."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eagle3.formats.checkpoint import save_draft
from eagle3.cli import main
from eagle3.runtimes.config import load_config
from eagle3.methods.draft import new_draft
from eagle3.formats.gguf_export import llama_cpp_converter
from interop import MARKED_TAPS, marked_target_folder, marker_draft, scattered, varied


@pytest.fixture(scope="module")
def converter() -> Path:
    try:
        return llama_cpp_converter()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def gguf_py(converter):
    """llama.cpp's own gguf-py, the one its converter writes with."""
    sys.path.insert(0, str(converter.parent / "gguf-py"))
    try:
        import gguf

        yield gguf
    finally:
        sys.path.remove(str(converter.parent / "gguf-py"))


def varied_draft(stories):
    draft = new_draft(stories.model.config, draft_vocab_size=256, seed=4)
    return scattered(varied(draft), stories.model.config.vocab_size)


def interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows as llama.cpp's RoPE pairs them (adjacent dimensions; eagle3's, like transformers', pairs the
    two halves of each head): what llama.cpp's converter does to every Llama q and k."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_the_gguf_holds_our_tensors_and_taps_as_llama_cpp_reads_them(stories, gguf_py, tmp_path):
    draft = varied_draft(stories)
    src = save_draft(draft, tmp_path / "draft", format="speculators")  # (either layout converts)
    out = tmp_path / "draft.gguf"
    assert main(["convert", str(src), "--to", "gguf", str(out), "--target", str(stories.path)]) == 0
    reader = gguf_py.GGUFReader(out)
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "eagle3"
    assert list(field("eagle3.target_layers")) == [1, 2, 4]  # layer inputs, as tapped here
    assert field("eagle3.target_hidden_size") == 64 and field("eagle3.norm_before_residual") is False
    theirs = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    ours = {"fc.weight": draft.fc.weight, "output.weight": draft.lm_head.weight, "output_norm.weight": draft.norm.weight,
            "blk.0.attn_norm.weight": draft.midlayer.input_layernorm.weight,  # the token embedding's norm
            "blk.0.attn_norm_2.weight": draft.midlayer.hidden_norm.weight,  # the hidden state's
            "blk.0.ffn_norm.weight": draft.midlayer.post_attention_layernorm.weight,
            "blk.0.attn_q.weight": interleaved(draft.midlayer.self_attn.q_proj.weight, draft.config.num_heads),
            "blk.0.attn_k.weight": interleaved(draft.midlayer.self_attn.k_proj.weight, draft.config.num_kv_heads),
            "blk.0.attn_v.weight": draft.midlayer.self_attn.v_proj.weight,
            "blk.0.attn_output.weight": draft.midlayer.self_attn.o_proj.weight,
            "blk.0.ffn_gate.weight": draft.midlayer.mlp.gate_proj.weight,
            "blk.0.ffn_up.weight": draft.midlayer.mlp.up_proj.weight,
            "blk.0.ffn_down.weight": draft.midlayer.mlp.down_proj.weight,
            "d2t": draft.to_target_ids(torch.arange(256))}  # fmt: skip  (llama.cpp keeps target ids, not offsets)
    assert set(theirs) == set(ours)
    for name, tensor in ours.items():
        assert torch.equal(theirs[name].reshape(tensor.shape).to(tensor.dtype), tensor.detach()), name


def test_the_target_goes_to_gguf_beside_its_draft(stories, gguf_py, tmp_path):
    src = save_draft(varied_draft(stories), tmp_path / "draft")
    draft, target = tmp_path / "draft.gguf", tmp_path / "target.gguf"
    args = ["convert", str(src), "--to", "gguf", str(draft), "--target", str(stories.path), "--target-out", str(target)]
    assert main([*args, "--outtype", "q8_0"]) == 0
    reader = gguf_py.GGUFReader(target)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == stories.model.config.num_layers
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    # An existing target file is kept, and nothing is written: both files are checked before either is.
    draft.unlink()
    assert main(args) == 2 and not draft.exists()
    assert main([*args[:-1], str(draft)]) == 2  # (the same file twice)


def test_convert_to_gguf_refuses_what_it_cannot_do(stories, tmp_path, monkeypatch, capsys):
    src = save_draft(varied_draft(stories), tmp_path / "draft")
    assert main(["convert", str(src), "--to", "gguf", str(tmp_path / "a.gguf")]) == 2
    assert "--target" in capsys.readouterr().err
    monkeypatch.setenv("EAGLE3_LLAMA_CPP", str(tmp_path / "nowhere"))
    assert main(["convert", str(src), "--to", "gguf", str(tmp_path / "a.gguf"), "--target", str(stories.path)]) == 2
    assert "install_peers.sh --convert-only" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists()
    # A converter whose Python dependencies are missing is named as such, before it runs.
    fake = tmp_path / "llama.cpp"
    fake.mkdir()
    (fake / "convert_hf_to_gguf.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("EAGLE3_LLAMA_CPP", str(fake))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sentencepiece" else find_spec(name, *a))  # fmt: skip
    assert main(["convert", str(src), "--to", "gguf", str(tmp_path / "a.gguf"), "--target", str(stories.path)]) == 2
    assert "needs the sentencepiece package" in capsys.readouterr().err
    assert not (tmp_path / "a.gguf").exists()


def speculative_example(converter: Path) -> Path:
    for build in ("build/bin", "build"):
        binary = converter.parent / build / "llama-speculative-simple"
        if binary.is_file():
            return binary
    pytest.skip(f"llama.cpp's llama-speculative-simple is not built beside {converter} (bash scripts/interop.sh "
                "--llama-cpp)")  # fmt: skip


def test_llama_cpp_runs_our_draft_beside_its_target(stories, converter, tmp_path):
    binary = speculative_example(converter)
    target, draft = tmp_path / "target.gguf", tmp_path / "draft.gguf"
    src = save_draft(new_draft(stories.model.config, seed=1), tmp_path / "draft")
    assert main(["convert", str(src), "--to", "gguf", str(draft), "--target", str(stories.path), "--target-out",
                 str(target)]) == 0  # fmt: skip
    run = subprocess.run([str(binary), "-m", str(target), "-md", str(draft), "--spec-type", "draft-eagle3", "-p",
                          "Once upon a time", "-n", "24", "--temp", "0", "-t", "2", "--spec-draft-n-max", "3"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "LLAMA_ARG_LOG_COLORS": "off"})  # fmt: skip
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-1500:]
    assert re.search(r"n_draft\s*=\s*\d+", log) and re.search(r"n_accept\s*=\s*\d+", log), log[-1500:]


def test_llama_cpp_taps_the_layers_the_draft_names(stories, converter, tmp_path):
    """The marked target and draft (tests/interop.py): llama.cpp accepts every drafted token when the draft names
    the marked layer, and none when its third tap is one layer off either way."""
    binary = speculative_example(converter)
    folder = marked_target_folder(tmp_path / "target", stories.path)
    target_config = load_config(folder)

    def accepted(taps) -> float:
        src = save_draft(marker_draft(target_config, taps), tmp_path / f"draft-{taps[2]}")
        target, draft = tmp_path / "target.gguf", tmp_path / f"draft-{taps[2]}.gguf"
        extra = [] if target.exists() else ["--target-out", str(target)]
        assert main(["convert", str(src), "--to", "gguf", str(draft), "--target", str(folder), *extra]) == 0
        run = subprocess.run([str(binary), "-m", str(target), "-md", str(draft), "--spec-type", "draft-eagle3", "-p",
                              "Once upon a time", "-n", "24", "--temp", "0", "-t", "2", "--spec-draft-n-max", "3",
                              "--spec-draft-n-min", "3", "--spec-draft-p-min", "0"], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "LLAMA_ARG_LOG_COLORS": "off"})  # fmt: skip
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-1500:]
        drafted = int(re.search(r"n_drafted\s*=\s*(\d+)", log).group(1))
        assert drafted > 0, log[-1500:]
        return int(re.search(r"n_accept\s*=\s*(\d+)", log).group(1)) / drafted

    assert accepted(MARKED_TAPS) == 1.0
    assert accepted((1, 2, 3)) == 0.0 and accepted((1, 2, 5)) == 0.0
