"""EAGLE-3 draft checkpoints on disk: the official EAGLE / SGLang layout and the speculators (vLLM) layout.

Both are a folder with config.json and model.safetensors (pytorch_model.bin is read too). The tensors are the
same in both; only the names of the decoder layer's tensors and the config differ:

  official (EAGLE, SGLang, SpecForge)          speculators (vLLM)
  config.json: a Llama config,                 config.json: speculators_model_type "eagle3",
    architectures [LlamaForCausalLMEagle3],      architectures [Eagle3Speculator], transformer_layer_config
    num_hidden_layers 1, draft_vocab_size,       (the layer's Llama config), draft_vocab_size,
    target_hidden_size, bias (fc bias),          target_hidden_size, norm_before_residual,
    eagle_config.eagle_aux_hidden_state_...      eagle_aux_hidden_state_layer_ids, speculators_config
  midlayer.* (Eagle3Draft.state_dict() keys)   layers.0.*
  fc.weight, norm.weight, lm_head.weight, d2t [draft_vocab] int64, t2d [target_vocab] bool: in both

Tapped target layers: DraftConfig.tap_layers are *inputs* of target decoder layers (transformers'
output_hidden_states[i]; 0 is the token embeddings). The two layouts number them differently:

- SGLang reads `eagle_config.eagle_aux_hidden_state_layer_ids` of the draft config.json
  (sglang/srt/model_executor/model_runner.py: `eagle_config["eagle_aux_hidden_state_layer_ids"]` ->
  `self.model.set_eagle3_layers_to_capture(ids)`), and its targets capture `[val + 1 for val in layer_ids]`
  (sglang/srt/models/llama.py, qwen3.py, ...: `set_eagle3_layers_to_capture`; the code comment there: "we plus
  1 here because in sglang, for the ith layer, it takes the output of the (i-1)th layer as aux hidden
  state"), where LlamaModel.forward appends `hidden_states + residual` *before* running layer i. So SGLang ids
  are layer OUTPUTS: id = tap - 1 (Llama-3.1-8B: taps 2, 16, 29 are written [1, 15, 28]; tap 0, the token
  embeddings, becomes -1, which SGLang's +1 maps back to 0). Without ids, SGLang
  captures [2, N//2, N-3] unshifted, i.e. our default taps. (Newer SGLang, PR #25454 "drop +1 offset on aux
  layer ids when first id != 1", applies the +1 only when the first id is 1; that agrees with this
  convention whenever the first tap is layer 2, as the EAGLE-3 default is.)
- vLLM reads `eagle_aux_hidden_state_layer_ids` (top level of the draft's hf_config; speculators'
  `update_eagle3` in vllm/transformers_utils/configs/speculators/algos.py copies it there unchanged) in
  gpu_model_runner._get_eagle3_aux_layers_from_config and passes it straight to
  `set_aux_hidden_state_layers`; LlamaModel.forward appends `hidden_states + residual` when
  `idx in aux_hidden_state_layers` *before* running layer idx. So vLLM ids are layer INPUTS, our taps as is
  (its default (2, N//2, N-3) is the same as SGLang's). Recent vLLM also falls back to the nested
  `eagle_config` ids, unshifted, which is off by one against SGLang; so the official layout written here
  also carries the top-level key (inputs), which vLLM reads first and SGLang ignores.

norm_before_residual: vLLM's update_eagle3 defaults a missing value to true, speculators' config to false;
this draft implements false (the residual is the un-normed hidden, as in EAGLE and SGLang), so it is always
written explicitly and a checkpoint saying true (or nothing, in the speculators layout) is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from eagle3 import options
from eagle3.runtimes.config import ModelConfig, RopeConfig, load_config
from eagle3.methods.draft import DraftConfig, Eagle3Draft, draft_config_from_hf, new_draft
from eagle3.files import atomic_path, read_json_object
from eagle3.runtimes.model import default_device, read_state_dict

FORMATS = ("eagle", "speculators")
OFFICIAL_ARCHITECTURES = ("LlamaForCausalLMEagle3", "LlamaForCausalLM", "Eagle3LlamaForCausalLM")
SPECULATORS_VERSION = "0.3.0"  # the speculators config schema this layout follows
DEFAULT_SPECULATIVE_TOKENS = 5
# Tensors some checkpoints carry that the draft does not use: the token embeddings (the draft shares the
# target's) and speculators' training-time copies of the verifier's head.
IGNORED_KEYS = ("embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight")
TAPS_KEY = "eagle_aux_hidden_state_layer_ids"


class CheckpointExists(FileExistsError, ValueError):
    """The output path holds something other than a draft checkpoint; it is not overwritten."""


@dataclass(frozen=True)
class DraftMeta:
    """What a checkpoint says beyond the draft itself: its layout, the target it was made for, and the
    number of speculative tokens (speculators' greedy proposal)."""

    format: str
    verifier: str | None = None
    verifier_architectures: tuple[str, ...] = ()
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS


# ---------------------------------------------------------------------------------------------- config


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rope_to_hf(rope: RopeConfig) -> dict:
    out: dict = {"rope_theta": rope.theta}
    if rope.type != "default":
        scaling: dict = {"rope_type": rope.type, "factor": rope.factor}
        if rope.type == "llama3":
            scaling.update(
                low_freq_factor=rope.low_freq_factor,
                high_freq_factor=rope.high_freq_factor,
                original_max_position_embeddings=rope.original_max_position_embeddings,
            )
        out["rope_scaling"] = scaling
    return out


def llama_layer_config(cfg: DraftConfig, dtype: torch.dtype) -> dict:
    """The Llama config of the draft's one decoder layer (vocab_size is the target's)."""
    return {
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        **_rope_to_hf(cfg.rope),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": _dtype_name(dtype),
        "dtype": _dtype_name(dtype),
    }


def _official_config(cfg: DraftConfig, dtype: torch.dtype, meta: DraftMeta) -> dict:
    out = {
        "architectures": ["LlamaForCausalLMEagle3"],
        **llama_layer_config(cfg, dtype),
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "bias": cfg.fc_bias,
    }
    if cfg.tap_layers is not None:
        out["eagle_config"] = {TAPS_KEY: [t - 1 for t in cfg.tap_layers]}  # SGLang: layer outputs
        out[TAPS_KEY] = list(cfg.tap_layers)  # vLLM: layer inputs (read first there, ignored by SGLang)
    # Not read by any engine; kept so that a speculators -> eagle -> speculators conversion loses nothing.
    out["eagle3_meta"] = {
        "verifier": {"name_or_path": meta.verifier, "architectures": list(meta.verifier_architectures)},
        "speculative_tokens": meta.speculative_tokens,
    }
    return out


def _speculators_config(cfg: DraftConfig, dtype: torch.dtype, meta: DraftMeta) -> dict:
    out = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": llama_layer_config(cfg, dtype),
        "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size,
        "norm_before_residual": False,  # explicit: vLLM reads a missing value as true
    }
    if cfg.tap_layers is not None:
        out[TAPS_KEY] = list(cfg.tap_layers)  # vLLM: layer inputs, our convention
    if cfg.fc_bias:
        out["fc_bias"] = True  # vLLM's Eagle3 fc has no bias: such a draft loads here only
    out["speculators_config"] = {
        "algorithm": "eagle3",
        "proposal_methods": [
            {"proposal_type": "greedy", "speculative_tokens": meta.speculative_tokens,
             "verifier_accept_k": 1, "accept_tolerance": 0.0}  # fmt: skip
        ],
        "default_proposal_method": "greedy",
        "verifier": {"name_or_path": meta.verifier, "architectures": list(meta.verifier_architectures)},
    }
    out["torch_dtype"] = out["dtype"] = _dtype_name(dtype)
    return out


def _refuse_unsupported(cfg: dict, where: str) -> None:
    """Variants of the EAGLE-3 head this draft does not implement."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    # (speculators' variants: norms on the taps before fc, and the normed output fed back as the next step's
    # hidden, "Eagle 3.1")
    for key in ("attention_bias", "mlp_bias", "norm_before_fc", "fc_norm", "norm_output"):
        if cfg.get(key):
            raise ValueError(f"{where}: {key}=true is not supported by this EAGLE-3 draft")
    if cfg.get("norm_before_residual"):
        raise ValueError(
            f"{where}: norm_before_residual=true is not supported (this draft's residual is the un-normed hidden)"
        )
    if (cfg.get("eagle_config") or {}).get("use_aux_hidden_state", True) is False:
        raise ValueError(f"{where}: eagle_config.use_aux_hidden_state=false (an EAGLE-1 style head) is not supported")


def _draft_config(hf: dict, where: str) -> DraftConfig:
    """draft_config_from_hf, with config errors turned into ValueErrors that name the file."""
    try:
        return draft_config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"{where} lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def _taps(ids, shift: int, where: str) -> tuple[int, ...] | None:
    if ids is None:
        return None
    if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{where}: {TAPS_KEY} must be a list of integers, got {ids!r}")
    return tuple(i + shift for i in ids) or None


def _parse_official(cfg: dict, where: str) -> tuple[DraftConfig, DraftMeta]:
    archs = cfg.get("architectures") or []
    if not any(a in OFFICIAL_ARCHITECTURES for a in archs):
        raise ValueError(
            f"{where}: architectures {archs} is not an EAGLE-3 draft (expected one of {', '.join(OFFICIAL_ARCHITECTURES)}, "
            "or speculators_model_type 'eagle3')"
        )
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"{where}: model_type {cfg['model_type']!r} is not supported (an EAGLE-3 draft is a llama layer)")
    _refuse_unsupported(cfg, where)
    nested = (cfg.get("eagle_config") or {}).get(TAPS_KEY)
    # SGLang's nested ids (layer outputs) win; else vLLM's top-level ids (layer inputs).
    taps = _taps(nested, 1, where) if nested is not None else _taps(cfg.get(TAPS_KEY), 0, where)
    base = {k: v for k, v in cfg.items() if k not in (TAPS_KEY, "eagle_config")}
    dcfg = replace(_draft_config(base, where), tap_layers=taps)
    extra = cfg.get("eagle3_meta") or {}
    verifier = extra.get("verifier") or {}
    meta = DraftMeta(
        "eagle", verifier.get("name_or_path"), tuple(verifier.get("architectures") or ()),
        int(extra.get("speculative_tokens", DEFAULT_SPECULATIVE_TOKENS)),
    )  # fmt: skip
    return dcfg, meta


def _parse_speculators(cfg: dict, where: str) -> tuple[DraftConfig, DraftMeta]:
    if cfg.get("speculators_model_type") != "eagle3":
        kind = cfg.get("speculators_model_type")
        raise ValueError(f"{where}: speculators_model_type {kind!r} is not supported (only 'eagle3')")
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ValueError(f"{where} lacks transformer_layer_config (the Llama config of the draft's layer)")
    if "norm_before_residual" not in cfg:
        raise ValueError(
            f"{where} does not say norm_before_residual; vLLM would read it as true, which this draft does not implement"
        )
    head_flags = ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output")  # (top level there)
    _refuse_unsupported({**layer, **{k: cfg[k] for k in head_flags if k in cfg}}, where)
    if layer.get("bias"):  # vLLM reads a layer "bias" as attention bias
        raise ValueError(f"{where}: transformer_layer_config.bias=true (attention bias) is not supported")
    flat = {k: v for k, v in layer.items() if k not in ("bias", TAPS_KEY, "eagle_config")}
    flat.update(
        draft_vocab_size=cfg.get("draft_vocab_size"),
        target_hidden_size=cfg.get("target_hidden_size"),
        bias=bool(cfg.get("fc_bias", False)),
    )
    dcfg = replace(_draft_config(flat, where), tap_layers=_taps(cfg.get(TAPS_KEY), 0, where))
    spec = cfg.get("speculators_config") or {}
    verifier = spec.get("verifier") or {}
    methods = spec.get("proposal_methods") or [{}]
    meta = DraftMeta(
        "speculators", verifier.get("name_or_path"), tuple(verifier.get("architectures") or ()),
        int(methods[0].get("speculative_tokens", DEFAULT_SPECULATIVE_TOKENS)),
    )  # fmt: skip
    return dcfg, meta


def _read_config_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"draft checkpoint {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"draft checkpoint {path} is not a folder (expected config.json + model.safetensors)")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: not a draft checkpoint folder")
    return read_json_object(config_path)


def read_draft_config(path: str | Path) -> tuple[DraftConfig, DraftMeta]:
    """The DraftConfig of a checkpoint folder (either layout) and what else its config says."""
    path = Path(path).expanduser()
    cfg = _read_config_json(path)
    where = str(path / "config.json")
    if "speculators_model_type" in cfg:
        return _parse_speculators(cfg, where)
    return _parse_official(cfg, where)


# ---------------------------------------------------------------------------------------------- weights


def _file_key(key: str, fmt: str) -> str:
    """Eagle3Draft.state_dict() key -> the name in a checkpoint of layout fmt."""
    if fmt == "speculators" and key.startswith("midlayer."):
        return "layers.0." + key.removeprefix("midlayer.")
    return key


def _expected(cfg: DraftConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        ref = Eagle3Draft(cfg)
    return {k: (tuple(v.shape), v.dtype) for k, v in ref.state_dict().items()}


def _vocab_maps(state: dict[str, Tensor], cfg: DraftConfig, where: str) -> None:
    """Fills in d2t/t2d where a checkpoint may leave them out, and checks d2t."""
    if "d2t" not in state:
        if not cfg.full_vocab:
            raise ValueError(
                f"{where} lacks 'd2t' (expected shape ({cfg.draft_vocab_size},)): a draft vocabulary of "
                f"{cfg.draft_vocab_size} < {cfg.vocab_size} target ids needs the draft-to-target map"
            )
        state["d2t"] = torch.zeros(cfg.draft_vocab_size, dtype=torch.long)
    d2t = state["d2t"]
    if tuple(d2t.shape) != (cfg.draft_vocab_size,):
        raise ValueError(f"tensor 'd2t' in {where} has shape {tuple(d2t.shape)}, expected ({cfg.draft_vocab_size},)")
    if d2t.dtype.is_floating_point or d2t.dtype == torch.bool:
        raise ValueError(f"tensor 'd2t' in {where} has dtype {d2t.dtype}, expected an integer type")
    d2t = state["d2t"] = d2t.long()
    targets = torch.arange(cfg.draft_vocab_size) + d2t
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= cfg.vocab_size):
        raise ValueError(f"tensor 'd2t' in {where} maps draft ids outside the target vocabulary [0, {cfg.vocab_size})")
    if "t2d" not in state:  # it follows from d2t
        t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        t2d[targets] = True
        state["t2d"] = t2d
    elif tuple(state["t2d"].shape) != (cfg.vocab_size,):
        raise ValueError(f"tensor 't2d' in {where} has shape {tuple(state['t2d'].shape)}, expected ({cfg.vocab_size},)")
    state["t2d"] = state["t2d"].bool()


def _state_from_file(raw: dict[str, Tensor], cfg: DraftConfig, fmt: str, where: str) -> dict[str, Tensor]:
    """Checkpoint tensors -> Eagle3Draft.state_dict() keys, checking names and shapes against the config."""
    expected = _expected(cfg)
    file_to_key = {_file_key(k, fmt): k for k in expected}
    if fmt == "speculators":  # some converters keep the official names; vLLM accepts both
        file_to_key.update({k: k for k in expected})
    state: dict[str, Tensor] = {}
    for name, tensor in raw.items():
        if name in IGNORED_KEYS:
            continue
        key = file_to_key.get(name)
        if key is None:
            raise ValueError(
                f"unexpected tensor {name!r} of shape {tuple(tensor.shape)} in {where}; an EAGLE-3 draft with this "
                f"config.json has: {', '.join(sorted(_file_key(k, fmt) for k in expected))}"
            )
        if key in state:
            raise ValueError(f"{where} holds {key!r} twice (as {_file_key(key, fmt)!r} and {key!r})")
        state[key] = tensor
    _vocab_maps(state, cfg, where)
    for key, (shape, _) in expected.items():
        name = _file_key(key, fmt)
        if key not in state:
            raise ValueError(f"{where} lacks tensor {name!r} (expected shape {shape})")
        found = tuple(state[key].shape)
        if found != shape:
            raise ValueError(f"tensor {name!r} in {where} has shape {found}, expected {shape} (from config.json)")
        if key not in ("d2t", "t2d") and not state[key].dtype.is_floating_point:
            raise ValueError(f"tensor {name!r} in {where} has dtype {state[key].dtype}, expected a floating point type")
    return state


def _weights_file(path: Path) -> str:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (path / name).is_file():
            return str(path / name)
    return str(path)


def _load(path: str | Path, device=None, dtype=None) -> tuple[Eagle3Draft, DraftMeta]:
    path = Path(path).expanduser()
    cfg, meta = read_draft_config(path)
    raw = read_state_dict(path)  # FileNotFoundError when there are no weights
    state = _state_from_file(raw, cfg, meta.format, _weights_file(path))
    if isinstance(dtype, str):
        from eagle3.runtimes.target import DTYPES

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or state["fc.weight"].dtype  # one dtype for all weights, the checkpoint's by default
    device = torch.device(device) if device is not None else default_device()
    state = {
        k: v.to(device=device, dtype=dtype if v.dtype.is_floating_point else v.dtype).contiguous()
        for k, v in state.items()
    }
    with torch.device("meta"):
        draft = Eagle3Draft(cfg)
    draft.load_state_dict(state, strict=True, assign=True)
    return draft.eval(), meta


def check_fits(cfg: DraftConfig, target: ModelConfig) -> None:
    """Raises ValueError("draft and target do not match: ...") unless the draft can run on this target."""
    problems = []
    if cfg.vocab_size != target.vocab_size:
        problems.append(f"the draft's target vocabulary is {cfg.vocab_size} ids, the target's is {target.vocab_size}")
    if cfg.target_hidden_size != target.hidden_size:
        problems.append(
            f"the draft's target_hidden_size is {cfg.target_hidden_size}, the target's hidden size is {target.hidden_size}"
        )
    if cfg.hidden_size != target.hidden_size:
        problems.append(
            f"the draft's hidden size is {cfg.hidden_size} but it shares the target's token embeddings, "
            f"which are {target.hidden_size} wide"
        )
    taps = cfg.tap_layers if cfg.tap_layers is not None else target.default_tap_layers
    bad = [t for t in taps if not 0 <= t < target.num_layers]
    if bad:
        problems.append(f"tapped layers {list(taps)} include {bad}, outside the target's {target.num_layers} layers")
    if len(set(taps)) != 3:
        problems.append(f"the draft fuses 3 distinct tapped layers (its fc reads 3 x {cfg.target_hidden_size}), "
                        f"its config names {list(taps)}")  # fmt: skip
    if problems:
        raise ValueError("draft and target do not match: " + "; ".join(problems))


def load_draft(
    path: str | Path, target_config: ModelConfig | None = None, device=None, dtype=None
) -> Eagle3Draft:
    """Loads a draft checkpoint folder of either layout (detected from config.json).

    With target_config, first checks that the draft fits that target, and a config that names no tapped
    layers gets the target's defaults. Weights keep the checkpoint's dtype unless dtype is given; device
    defaults to cuda when present. The token embeddings are the target's: call
    draft.attach(target.model.embed.weight) before running it.
    """
    if target_config is None:
        return _load(path, device, dtype)[0]
    check_fits(read_draft_config(path)[0], target_config)
    draft = _load(path, device, dtype)[0]
    if draft.config.tap_layers is None:
        draft.config = replace(draft.config, tap_layers=tuple(target_config.default_tap_layers))
    return draft


# ---------------------------------------------------------------------------------------------- save


def _write_weights(tensors: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


# Weights a loader would read beside or instead of a new model.safetensors: --overwrite refuses to leave them.
SHADOWING = ("model.safetensors.index.json", "pytorch_model.bin")


def _check_writable(out: Path, overwrite: bool) -> bool:
    """Whether out holds files already (then, with overwrite, only the checkpoint's own two are replaced);
    refuses a folder that holds files without overwrite, and anything that is not a folder."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CheckpointExists(f"{out} exists and is not a folder; not writing a checkpoint there")
    if not out.exists() or not any(out.iterdir()):
        return False
    if not overwrite:
        raise CheckpointExists(f"{out} exists and is not empty; pass --overwrite to replace its config.json and "
                               "model.safetensors (other files are kept), or choose another folder")  # fmt: skip
    stale = [name for name in SHADOWING if (out / name).exists()]
    if stale:
        raise CheckpointExists(f"{out} holds {', '.join(stale)}, which --overwrite would leave beside the new "
                               "weights; remove it or choose another folder")  # fmt: skip
    return True


def _verifier_architectures(verifier: str | None) -> tuple[str, ...]:
    """The architectures of a verifier given as a local model folder (nothing is fetched)."""
    if verifier is None:
        return ()
    config = Path(verifier).expanduser() / "config.json"
    try:
        return tuple(json.loads(config.read_text()).get("architectures") or ())
    except (OSError, ValueError, AttributeError):
        return ()


def save_draft(
    draft: Eagle3Draft,
    out_dir: str | Path,
    format: str = "eagle",
    verifier: str | None = None,
    speculative_tokens: int = DEFAULT_SPECULATIVE_TOKENS,
    verifier_architectures: list[str] | tuple[str, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves a draft as a checkpoint folder: format "eagle" (official EAGLE / SGLang) or "speculators" (vLLM).

    verifier names the target (Hub id or path) for the speculators config. A new folder is written whole under
    a temp name and renamed into place. A folder that holds files is refused unless overwrite, which replaces
    just config.json and model.safetensors (each atomically, the weights first) and keeps every other file.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown checkpoint format {format!r}; choose from {', '.join(FORMATS)}")
    if speculative_tokens < 1:
        raise ValueError(f"speculative_tokens must be >= 1, got {speculative_tokens}")
    out = Path(out_dir).expanduser().absolute()
    cfg = draft.config
    archs = tuple(verifier_architectures) if verifier_architectures is not None else _verifier_architectures(verifier)
    meta = DraftMeta(format, verifier, archs, speculative_tokens)
    dtype = draft.fc.weight.dtype
    config = (_official_config if format == "eagle" else _speculators_config)(cfg, dtype, meta)
    tensors = {_file_key(k, format): v.detach().to("cpu").contiguous() for k, v in draft.state_dict().items()}

    def write_into(folder: Path, atomic: bool) -> None:
        for name, write in (("model.safetensors", lambda p: _write_weights(tensors, p)),
                            ("config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))):  # fmt: skip
            if atomic:
                with atomic_path(folder / name) as temp:
                    write(temp)
                    _readable(temp)
            else:
                write(folder / name)
                _readable(folder / name)

    if _check_writable(out, overwrite):
        write_into(out, atomic=True)
    else:
        with atomic_path(out, folder=True) as temp:
            write_into(temp, atomic=False)
    return out


def _readable(path: Path) -> None:
    """safetensors creates its files owner-only (0600): give them the mode any new file gets (umask applied)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


# ---------------------------------------------------------------------------------------------- tools


def convert(
    src: str | Path, fmt: str, out: str | Path, verifier: str | None = None, speculative_tokens: int | None = None,
    dtype: torch.dtype | None = None, overwrite: bool = False,
) -> Path:
    """Loads a draft checkpoint of either layout and saves it in layout fmt; every tensor is kept as is, or
    its floating-point weights cast to dtype (half precision halves the file; loading casts to the target's).

    The verifier and speculative_tokens default to what the source checkpoint says; out is written as
    save_draft writes (overwrite: into a folder that holds files).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(FORMATS)}")
    draft, meta = _load(src, device="cpu", dtype=dtype)
    archs = meta.verifier_architectures if verifier is None else None
    return save_draft(
        draft, out, fmt,
        verifier=verifier if verifier is not None else meta.verifier,
        speculative_tokens=speculative_tokens or meta.speculative_tokens,
        verifier_architectures=archs, overwrite=overwrite,
    )  # fmt: skip


def init_draft(
    target_name_or_path: str, out: str | Path, draft_vocab_size: int | None = None, format: str = "eagle", seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Saves a fresh, untrained draft shaped for a target (preset, local folder or Hub id)."""
    from eagle3.fetch import resolve_model

    folder = resolve_model(target_name_or_path)
    target = load_config(folder)
    if draft_vocab_size is not None and not 1 <= draft_vocab_size <= target.vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {target.vocab_size}], got {draft_vocab_size}")
    draft = new_draft(target, draft_vocab_size, seed=seed)
    return save_draft(draft, out, format, verifier=target_name_or_path,
                      verifier_architectures=_verifier_architectures(str(folder)), overwrite=overwrite)  # fmt: skip


OVERWRITE_HELP = "write into an existing folder: replaces config.json and model.safetensors, keeps other files"


def add_cli_parsers(sub: argparse._SubParsersAction) -> None:
    """Adds `convert` and `draft-init` to the eagle3 command line; their handlers are CLI_COMMANDS."""
    from eagle3.formats.gguf_export import OUTTYPES

    p = sub.add_parser("convert", help="convert a draft checkpoint between the EAGLE/SGLang and speculators/vLLM layouts, "
                       "to a GGUF file for llama.cpp, or with its target to OpenVINO IR for OpenVINO GenAI")  # fmt: skip
    p.add_argument("src", help="draft checkpoint folder (either layout)")
    p.add_argument("out", help="output folder, or file with --to gguf (written atomically; an existing one needs "
                   "--overwrite)")  # fmt: skip
    p.add_argument("--to", dest="fmt", choices=(*FORMATS, "gguf", "openvino"), required=True,
                   help="eagle: official EAGLE/SGLang layout; speculators: vLLM layout; gguf: llama.cpp's EAGLE-3 "
                        "draft, written by llama.cpp's converter (bash scripts/install_peers.sh --convert-only); "
                        "openvino: OUT/target and OUT/draft for OpenVINO GenAI's EAGLE-3 pipeline")  # fmt: skip
    p.add_argument("--target", default=None, help="with --to gguf or openvino: the target the draft is for (preset or "
                   "folder)")  # fmt: skip
    p.add_argument("--outtype", choices=OUTTYPES, default="f32", help="with --to gguf: for the draft and --target-out")
    p.add_argument("--target-precision", choices=("fp32", "int8"), default="fp32", help="with --to openvino: the "
                   "target's matrices (int8: one scale per output row, as --runtime openvino-int8; the draft stays fp32)")
    p.add_argument("--target-out", default=None, help="with --to gguf: also write the target as this GGUF file "
                   "(llama.cpp runs the draft beside it)")  # fmt: skip
    p.add_argument("--verifier", default=None, help="target model name or path recorded in the config")
    p.add_argument("--speculative-tokens", type=options.integer(1, 64), default=None,
                   help="speculators' greedy proposal length")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast the weights (default: keep them as they are)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p = sub.add_parser("draft-init", help="save a fresh, untrained EAGLE-3 draft for a target")
    p.add_argument("out", help="output folder (written atomically; a folder that holds files needs --overwrite)")
    p.add_argument("--target", required=True, help="preset, local folder or hub id")
    p.add_argument("--draft-vocab", type=options.count, default=None, help="draft vocabulary size (default: the target's)")
    p.add_argument("--format", choices=FORMATS, default="eagle")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def convert_command(args: argparse.Namespace) -> int:
    if args.target_precision != "fp32" and args.fmt != "openvino":
        raise ValueError("--target-precision goes with --to openvino")
    if args.fmt == "gguf":
        from eagle3.formats.gguf_export import checked_out_path, export_gguf, export_target_gguf

        if args.target is None:
            raise ValueError("--to gguf needs --target (the model the draft is for: its tokenizer goes in the file)")
        if args.target_out is not None:  # (both files checked before either is written)
            if checked_out_path(args.target_out, args.outtype, args.overwrite) == Path(args.out).expanduser().absolute():
                raise ValueError("--target-out must be another file than the draft's")
        path = export_gguf(args.src, args.out, args.target, args.outtype, args.overwrite)
        print("eagle3: wrote a GGUF draft for llama.cpp (--spec-type draft-eagle3)", file=sys.stderr)
        print(path)
        if args.target_out is not None:
            path = export_target_gguf(args.target, args.target_out, args.outtype, args.overwrite)
            print(f"eagle3: wrote the target as GGUF {args.outtype}", file=sys.stderr)
            print(path)
        return 0
    if args.target_out is not None:
        raise ValueError("--target-out goes with --to gguf")
    if args.fmt == "openvino":
        from eagle3.formats.openvino_export import export_openvino

        if args.target is None:
            raise ValueError("--to openvino needs --target (the model the draft is for: it is exported too)")
        path = export_openvino(args.src, args.out, args.target, args.overwrite, args.target_precision)
        print("eagle3: wrote target/ and draft/ for OpenVINO GenAI (LLMPipeline(target, draft_model=draft_model(draft)))",
              file=sys.stderr)  # fmt: skip
        print(path)
        return 0
    dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
    path = convert(args.src, args.fmt, args.out, args.verifier, args.speculative_tokens, dtype, args.overwrite)
    print(f"eagle3: wrote a {args.fmt} draft checkpoint", file=sys.stderr)
    print(path)
    return 0


def draft_init_command(args: argparse.Namespace) -> int:
    path = init_draft(args.target, args.out, args.draft_vocab, args.format, overwrite=args.overwrite)
    print(f"eagle3: wrote an untrained draft for {args.target}", file=sys.stderr)
    print(path)
    return 0


CLI_COMMANDS = {"convert": convert_command, "draft-init": draft_init_command}
