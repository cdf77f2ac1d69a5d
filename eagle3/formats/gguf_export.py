"""Drafts and targets as GGUF files for llama.cpp (a draft for its EAGLE-3 speculative mode, `--spec-type
draft-eagle3`), written by llama.cpp's own converter, so that each file is what llama.cpp expects of its version.

    draft (either layout) -> official layout in a temp folder -> convert_hf_to_gguf.py DRAFT
        --target-model-dir TARGET --outtype T --outfile OUT.part -> OUT
    target folder -> convert_hf_to_gguf.py TARGET --outtype T --outfile OUT.part -> OUT

The converter reads the tapped layers from the draft config's top-level `eagle_aux_hidden_state_layer_ids`
(layer inputs, as eagle3 numbers them; checkpoint.py) into the GGUF's target layers, and takes the tokenizer
and vocabulary from the target's folder. It is not part of any package: `bash scripts/install_peers.sh
--convert-only` fetches it (with the gguf-py it imports) from llama-cpp-python's source distribution into
$EAGLE3_HOME/peers/llama.cpp, or $EAGLE3_LLAMA_CPP names another llama.cpp checkout. llama.cpp's EAGLE-3
support is young: convert with the converter of the llama.cpp that will run the file.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from eagle3.paths import eagle3_home

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
INSTALL = "bash scripts/install_peers.sh --convert-only"


def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py: in $EAGLE3_LLAMA_CPP, else $EAGLE3_HOME/peers/llama.cpp."""
    root = Path(os.environ.get("EAGLE3_LLAMA_CPP") or eagle3_home() / "peers" / "llama.cpp").expanduser()
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not at {script}; run `{INSTALL}` (seconds, no build) "
                                "or set EAGLE3_LLAMA_CPP to a llama.cpp checkout")  # fmt: skip
    # The converter's Llama vocab path imports sentencepiece even for BPE tokenizers.
    if importlib.util.find_spec("sentencepiece") is None:
        raise FileNotFoundError(f"llama.cpp's converter at {script} needs the sentencepiece package, which is not "
                                f"installed; run `{INSTALL}` or `pip install sentencepiece`")  # fmt: skip
    return script


def checked_out_path(out: str | Path, outtype: str, overwrite: bool) -> Path:
    """out as an absolute path, once the type is known and no file of someone's is in the way."""
    if outtype not in OUTTYPES:
        raise ValueError(f"unknown GGUF type {outtype!r}; choose from {', '.join(OUTTYPES)}")
    out = Path(out).expanduser().absolute()
    if out.is_dir() or (out.exists() and not overwrite):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another file")
    return out


def _convert(script: Path, args: list[str], out: Path) -> Path:
    """Runs llama.cpp's converter into OUT.part and renames it when it is whole: no half file is ever left."""
    part = out.with_name(out.name + ".part")
    done = subprocess.run([sys.executable, str(script), *args, "--outfile", str(part)], capture_output=True, text=True)
    if done.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        raise ValueError(f"llama.cpp's converter failed (exit code {done.returncode}): {last.strip()}")
    part.replace(out)
    return out


def export_gguf(src: str | Path, out: str | Path, target: str, outtype: str = "f32", overwrite: bool = False) -> Path:
    """Writes the draft at src as a GGUF file `out` for llama.cpp, with `target` (preset, folder or hub id) as
    the model it drafts for. The file appears whole or not at all; an existing file needs overwrite."""
    from eagle3.formats.checkpoint import load_draft, save_draft
    from eagle3.runtimes.config import load_config
    from eagle3.fetch import resolve_model

    out = checked_out_path(out, outtype, overwrite)
    script = llama_cpp_converter()
    target_dir = resolve_model(target)
    draft = load_draft(src, load_config(target_dir), device="cpu")  # (checks that the draft fits the target)
    with tempfile.TemporaryDirectory(prefix="eagle3-gguf-") as tmp:
        official = save_draft(draft, Path(tmp) / "draft", format="eagle", verifier=str(target_dir))
        return _convert(script, [str(official), "--target-model-dir", str(target_dir), "--outtype", outtype], out)


def export_target_gguf(target: str, out: str | Path, outtype: str = "f32", overwrite: bool = False) -> Path:
    """Writes the target (preset, folder or hub id) as a GGUF file `out` of outtype for llama.cpp: f32 for
    llama.cpp's full precision, q8_0 for its int8. Whole or not at all; an existing file needs overwrite."""
    from eagle3.runtimes.config import load_config
    from eagle3.fetch import resolve_model

    out = checked_out_path(out, outtype, overwrite)
    script = llama_cpp_converter()
    target_dir = resolve_model(target)
    load_config(target_dir)  # (a folder that is no model fails here, in one line)
    return _convert(script, [str(target_dir), "--outtype", outtype], out)
