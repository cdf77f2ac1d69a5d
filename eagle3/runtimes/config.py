"""ModelConfig: what the native runtime needs to know about a Llama-family model, read from its HF config.json.

Both config spellings are accepted: transformers 4.x (`rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eagle3.files import read_json_object

# model_type -> HF architecture name, for the family the native runtime implements.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class UnsupportedModel(ValueError):
    """The checkpoint is outside the family the native runtime implements."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = False
    # Per-layer sliding attention window (None: full attention), as Mistral and Qwen2/3 define it.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant to run: dynamic NTK scaling stretches max_position_embeddings."""
        if self.rope.type == "dynamic":
            return int(self.max_position_embeddings * max(self.rope.factor, 1.0))
        return self.max_position_embeddings

    @property
    def default_tap_layers(self) -> tuple[int, int, int]:
        return default_tap_layers(self.num_layers)


def default_tap_layers(num_layers: int) -> tuple[int, int, int]:
    """Which decoder layers' inputs feed the EAGLE-3 draft (low, mid, high).

    The EAGLE-3 convention is the inputs of layers (2, N//2, N-3), i.e. transformers'
    output_hidden_states[2], [N//2], [N-3] (Llama-3.1-8B: 2, 16, 29). It needs N >= 7 to give three
    distinct layers; shallower models use (1, N//2, N-1) for 4 <= N <= 6 (stories260K, N=5: 1, 2, 4),
    and (0, 1, 2) for N = 3 (0 being the token embeddings).
    """
    n = num_layers
    if n >= 7:
        return (2, n // 2, n - 3)
    if n >= 4:
        return (1, n // 2, n - 1)
    if n == 3:
        return (0, 1, 2)
    raise UnsupportedModel(f"EAGLE-3 needs three distinct hidden-state taps; a {n}-layer model has too few layers")


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _rope_from_hf(cfg: dict) -> RopeConfig:
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModel("per-layer-type rope_parameters are not supported by the native runtime")
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModel(
            f"rope type {rope_type!r} is not supported by the native runtime (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(merged.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModel("partial_rotary_factor != 1 is not supported by the native runtime")
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        factor=float(merged.get("factor", 1.0)),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            merged.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_windows(cfg: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    layer_types = cfg.get("layer_types")
    if window is None:
        return (None,) * num_layers
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        first_full = cfg.get("max_window_layers", num_layers)
        return tuple(window if i >= first_full else None for i in range(num_layers))
    return (int(window),) * num_layers


def config_from_hf(cfg: dict) -> ModelConfig:
    """Builds a ModelConfig from a HF config.json dict; raises UnsupportedModel outside the family."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise UnsupportedModel(
            f"model_type {model_type!r} ({archs}) is not supported; the native runtime covers the Llama family: "
            + ", ".join(f"{t} ({a})" for t, a in SUPPORTED_MODEL_TYPES.items())
            + " (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3)"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise UnsupportedModel("pretraining_tp != 1 is not supported")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    attention_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        # Qwen2 always has q/k/v biases (and none on o_proj); elsewhere attention_bias covers all four.
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(cfg, model_type, layers),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
    )


def load_config(folder: str | Path) -> ModelConfig:
    """Reads config.json (and generation_config.json's eos ids, which chat models often extend) from a folder,
    with a one-line error naming the file when it is unreadable or inconsistent."""
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a Hugging Face model folder")
    cfg = read_json_object(path)
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        gen = read_json_object(gen_path)
        try:
            eos = _as_tuple(cfg.get("eos_token_id")) + _as_tuple(gen.get("eos_token_id"))
        except (TypeError, ValueError):
            raise ValueError(f"{folder}: eos_token_id must be an integer or a list of integers") from None
        cfg = {**cfg, "eos_token_id": list(dict.fromkeys(eos))}
    try:
        config = config_from_hf(cfg)
    except KeyError as err:
        raise ValueError(f"{path} lacks {err.args[0]!r}") from None
    except UnsupportedModel:
        raise
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} has a value of the wrong type ({err})") from None
    _check_sizes(config, path)
    return config


def _check_sizes(cfg: ModelConfig, path: Path) -> None:
    """Sizes a model can have: positive, heads grouping evenly, eps and rope values finite and positive."""
    sizes = {"vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
             "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
             "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
             "max_position_embeddings": cfg.max_position_embeddings}  # fmt: skip
    bad = [f"{k} {v}" for k, v in sizes.items() if not 0 < v <= 10**8]
    if bad:
        raise ValueError(f"{path}: sizes must be positive (and below 1e8), got {', '.join(bad)}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{path}: {cfg.num_heads} attention heads do not group evenly over {cfg.num_kv_heads} kv heads")
    if cfg.head_dim % 2:
        raise ValueError(f"{path}: head_dim {cfg.head_dim} is odd; rotary embeddings need an even one")
    if not (0 < cfg.rms_norm_eps < 1 and 0 < cfg.rope.theta < float("inf") and 0 < cfg.rope.factor < float("inf")):
        raise ValueError(f"{path}: rms_norm_eps, rope_theta and the rope factor must be finite and positive")
