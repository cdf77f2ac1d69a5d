"""EAGLE (Li et al., 2024) and EAGLE-2: a one-layer draft that autoregresses on the target's top feature.

    x_t = fc([embedding(token t+1) ; feature t])        (2H -> H, with a bias)
    feature'_t = a Llama decoder layer (no input norm) over x, attending to the earlier positions
    logits_t = the target's own lm_head(feature'_t)     (predicts token t+2)

The feature is the target's last hidden state after its final norm (what its lm_head reads), and inside the
draft tree the draft feeds its own predicted features back, as EAGLE does. EAGLE-2 is the same draft with a
dynamic tree (the engine's tree growth, or `--tree auto`); EAGLE verifies a static tree (bench method `eagle`).
Training (`eagle3 train --method eagle`): feature regression (smooth L1) plus 0.1 x cross-entropy against
the target's distribution, with uniform noise U(-0.1, 0.1) on the input features, as in the EAGLE paper;
`--method hass` trains the same draft with HASS's harmonized context alignment (unrolled on its own features
for --ttt-steps, as EAGLE-3's training-time test) and harmonized objective distillation (an extra top-10
cross-entropy term).

Checkpoints use EAGLE's published layout, which its own code loads: a config.json that is a Llama config of
one layer (`bias`: whether fc has one, true by default) and the layer's weights, `fc.*` and `layers.0.*`, in
model.safetensors (written here) or pytorch_model.bin (read, weights only); an `embed_tokens.weight` there is
ignored (the target's embeddings are used). On the native runtimes the draft's step runs on the native kernels
(native_draft.py), like an EAGLE-3 head's. Partial (issue 18): Qwen-style attention biases (`qkv_bias`) are
refused.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagle3.runtimes import native
from eagle3.methods.draft import MLP, Attention, DraftConfig, OneLayerDraft, dense, draft_config_from_hf
from eagle3.methods.drafter import Eagle3Drafter
from eagle3.files import atomic_path, read_json_object, write_text
from eagle3.methods.heads import distillation_targets, normed_feature, target_lm_head
from eagle3.runtimes.model import ModelConfig, Transformer, read_state_dict
from eagle3.runtimes.native_weights import NativeWeight
from eagle3.training.ttt import ttt_hidden

WEIGHTS = "model.safetensors"
NOISE = 0.1  # input features get uniform noise in [-NOISE, NOISE] while training (the EAGLE paper's)
CLASSIFICATION_WEIGHT = 0.1  # of the cross-entropy beside the feature regression (the EAGLE paper's)
HASS_TOP_K = 10  # HASS's harmonized objective distillation: the target's top tokens it weighs again


def eagle1_config_for(target: ModelConfig, bias: bool = True) -> DraftConfig:
    """An EAGLE draft shaped like one layer of the target (EAGLE's config is the target's, one layer)."""
    return DraftConfig(
        hidden_size=target.hidden_size, intermediate_size=target.intermediate_size, num_heads=target.num_heads,
        num_kv_heads=target.num_kv_heads, head_dim=target.head_dim, vocab_size=target.vocab_size,
        draft_vocab_size=target.vocab_size, target_hidden_size=target.hidden_size,
        max_position_embeddings=target.context_length, rms_norm_eps=target.rms_norm_eps, rope=target.rope,
        fc_bias=bias, tap_layers=(target.num_layers,),
    )  # fmt: skip


class Eagle1Layer(nn.Module):
    """A Llama decoder layer without its input norm (EAGLE's first layer reads fc's output as it is)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = Attention(cfg, width=cfg.hidden_size)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Eagle1Draft(OneLayerDraft):
    """Parameter names as EAGLE's checkpoints name them (fc.*, layers.0.*). The token embeddings and the
    lm_head are the target's, frozen and never saved (attach)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__(cfg)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=cfg.fc_bias)
        self.layers = nn.ModuleList([Eagle1Layer(cfg)])
        self.head: Tensor | None = None  # the target's lm_head on normed features, [H, vocab]
        self.head_int8: NativeWeight | None = None  # the same in int8 on the native kernels (proposals only)

    @property
    def feature_width(self) -> int:
        """Width of the target features it reads: the normed top feature."""
        return self.config.hidden_size

    @property
    def head_in_int8(self) -> bool:
        return self.head_int8 is not None

    def attach(self, target_embeddings: Tensor, target_head: Tensor, int8: bool = False) -> "Eagle1Draft":
        """Shares the target's token embeddings [vocab, H] and its lm_head [vocab, H] as it acts on normed
        features (heads.target_lm_head); int8: proposals use an int8 copy of the head on the native kernels."""
        cfg = self.config
        for name, t in (("token embeddings", target_embeddings), ("lm_head", target_head)):
            if tuple(t.shape) != (cfg.vocab_size, cfg.hidden_size):
                raise ValueError(f"draft and target do not match: the draft expects the target's {name} of shape "
                                 f"({cfg.vocab_size}, {cfg.hidden_size}), the target's are {tuple(t.shape)}")  # fmt: skip
        self.embed_weight = target_embeddings.detach()
        self.head = target_head.detach().to(self.fc.weight.dtype).t().contiguous()
        self.head_int8 = NativeWeight.of(target_head.detach().float(), "int8") if int8 else None
        return self

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids  # (the target's vocabulary)

    def project(self, tokens: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """fc over [embedding ; feature] (target features and the draft's own alike), then q, k, v."""
        cfg = self.config
        if self.embed_weight is None:
            raise RuntimeError("call attach(target embeddings, target lm_head) first")
        B, n = tokens.shape
        x = dense(self.fc, torch.cat([F.embedding(tokens, self.embed_weight), hidden.to(self.fc.weight.dtype)], dim=-1))
        attn = self.layers[0].self_attn
        q = dense(attn.q_proj, x).view(B, n, cfg.num_heads, cfg.head_dim)
        k = dense(attn.k_proj, x).view(B, n, cfg.num_kv_heads, cfg.head_dim)
        v = dense(attn.v_proj, x).view(B, n, cfg.num_kv_heads, cfg.head_dim)
        return (x, *self.rotate(positions, q, k), v)

    def finish(self, hidden: Tensor, attn_out: Tensor) -> Tensor:
        """Residual + o_proj, then + MLP: the predicted feature."""
        layer = self.layers[0]
        h = hidden + dense(layer.self_attn.o_proj, attn_out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: Tensor) -> Tensor:
        """The target's logits of predicted features h [..., H]."""
        if self.head_int8 is not None and not torch.is_grad_enabled():
            return self.head_int8.matmul(h)
        return h @ self.head


def new_eagle1_draft(target: ModelConfig, seed: int = 0) -> Eagle1Draft:
    """A fresh, untrained draft for a target (small random init, biases zero, norms one)."""
    generator = torch.Generator().manual_seed(seed)
    draft = Eagle1Draft(eagle1_config_for(target))
    for name, p in draft.named_parameters():
        if p.dim() == 2:
            p.data.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            p.data.zero_()
    return draft


# ---------------------------------------------------------------------------------------------- layout


def _config_json(cfg: DraftConfig, dtype: torch.dtype, base_model: str) -> dict:
    from eagle3.formats.checkpoint import llama_layer_config

    return {"architectures": ["LlamaForCausalLM"], **llama_layer_config(cfg, dtype), "bias": cfg.fc_bias,
            "base_model_name_or_path": base_model}  # fmt: skip


def save_eagle1(draft: Eagle1Draft, folder: str | Path, base_model: str) -> Path:
    """EAGLE's layout in folder: config.json and model.safetensors (each replaced atomically, weights first)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as temp:
        save_file(state, str(temp), metadata={"format": "pt"})
    config = _config_json(draft.config, draft.fc.weight.dtype, base_model)
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def _weight_names(folder: Path) -> set[str]:
    """The tensor names of a folder's weights, without reading the tensors (empty when unreadable)."""
    try:
        if (folder / WEIGHTS).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / WEIGHTS), framework="pt") as f:
                return set(f.keys())
        if (folder / "pytorch_model.bin").is_file():
            state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True)
            return set(state) if isinstance(state, dict) else set()
    except Exception:  # (a corrupt file is the loader's to report)
        return set()
    return set()


def is_eagle1_checkpoint(path: str | Path) -> bool:
    """Whether a folder holds an EAGLE / EAGLE-2 / HASS draft (EAGLE's layout) rather than an EAGLE-3 head or a
    language model: a config with no EAGLE-3 keys, and fc plus `layers.0.` weights."""
    folder = Path(path)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    eagle3_keys = ("speculators_model_type", "draft_vocab_size", "eagle_config")
    if not isinstance(cfg, dict) or any(k in cfg for k in eagle3_keys):
        return False
    names = _weight_names(folder)
    return "fc.weight" in names and "layers.0.self_attn.q_proj.weight" in names


def load_eagle1(path: str | Path, target: ModelConfig, device=None, dtype: torch.dtype = torch.float32) -> Eagle1Draft:
    """A draft in EAGLE's layout, checked against the target (width, vocabulary, every tensor's shape)."""
    folder = Path(path)
    where = folder / "config.json"
    cfg_json = read_json_object(where)
    if cfg_json.get("qkv_bias"):
        raise ValueError(f"{where}: attention biases (qkv_bias) are not supported")
    try:
        cfg = draft_config_from_hf({"rope_theta": target.rope.theta, **cfg_json})
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where} is not an EAGLE draft config ({type(err).__name__}: {err})") from None
    cfg = replace(cfg, fc_bias=bool(cfg_json.get("bias", True)), draft_vocab_size=cfg.vocab_size,
                  target_hidden_size=cfg.hidden_size, tap_layers=(target.num_layers,))  # fmt: skip
    if (cfg.vocab_size, cfg.hidden_size) != (target.vocab_size, target.hidden_size):
        raise ValueError(f"draft and target do not match: the EAGLE draft is for a vocabulary of {cfg.vocab_size} and "
                         f"width {cfg.hidden_size}, the target has {target.vocab_size} and {target.hidden_size}")  # fmt: skip
    state = {k: v for k, v in read_state_dict(folder).items() if k != "embed_tokens.weight"}
    draft = Eagle1Draft(cfg)
    expected = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        wrong = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise ValueError(f"{folder}: the EAGLE draft's weights do not fit its config: {', '.join(wrong[:4])}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    draft.load_state_dict(state)
    return draft.to(device, dtype).eval()


# ---------------------------------------------------------------------------------------------- drafting


class Eagle1Drafter(Eagle3Drafter):
    """The EAGLE-3 drafter's machinery (catch-up, tree levels, batching) on an EAGLE draft: it reads the target's
    last layer output (tap N), normed by the target's final norm, and feeds its own predicted features back."""

    def __init__(self, draft: Eagle1Draft, model: Transformer, window: int | None = None):
        super().__init__(draft, window)
        self.model = model

    def commit(self, row: int, tokens: Tensor, features: Tensor | None) -> None:
        if features is None:
            raise ValueError("the EAGLE drafter needs the target's features with every commit")
        super().commit(row, tokens, normed_feature(self.model, features.float()))


def load_eagle1_drafter(path: str | Path, target, int8: bool | None = None,
                        window: int | None = None) -> Eagle1Drafter:  # fmt: skip
    """The drafter for an EAGLE-layout folder. int8 (None or True: wherever supported, a float32 target on a CPU
    with the native kernels; False: never): proposals use an int8 copy of the target's lm_head, and on the
    native runtimes the draft's step runs there, its matrices int8 too."""
    model = target.model
    draft = load_eagle1(path, model.config, device=model.device, dtype=model.dtype)
    supported = model.device.type == "cpu" and model.dtype == torch.float32 and native.library() is not None
    int8 = int8 is not False and supported
    draft.attach(model.embed.weight, target_lm_head(model).to(model.device), int8=int8)
    if target.runtime.startswith("native"):  # (the step on the native kernels too, its matrices int8 with int8)
        from eagle3.runtimes.native_draft import NativeDraft, draft_precision

        draft.native = NativeDraft(draft, draft_precision(target.runtime, int8))
    return Eagle1Drafter(draft, model, window)


# ---------------------------------------------------------------------------------------------- training


class Eagle1Objective:
    """The EAGLE draft and its loss, for train.train (`--method eagle`, or `hass`): per unrolled step k (one
    for EAGLE), at each position t whose token t + 2 + k is trained on, smooth L1 of the predicted feature
    against the target's at t + 1 + k plus 0.1 x cross-entropy of its logits against the target's softmax
    there (HASS: plus the same cross-entropy over the target's top 10 tokens alone), weighted decay^k."""

    def __init__(self, target, cfg, saved: dict | None = None, init: str | Path | None = None, hass: bool = False):
        model = target.model
        device = model.device
        if saved is not None:
            draft = Eagle1Draft(DraftConfig.from_dict(saved["draft_config"]))
            draft.load_state_dict(saved["draft"])
        elif init is not None:
            draft = load_eagle1(init, model.config, device=device)
        else:
            draft = new_eagle1_draft(model.config, cfg.seed)
        self.model = draft.to(device).attach(model.embed.weight, target_lm_head(model).to(device))
        self.target, self.cfg, self.hass = target, cfg, hass
        self.method = "hass" if hass else "eagle"
        self.steps = cfg.ttt_steps if hass else 1

    def config_dict(self) -> dict:
        return asdict(self.model.config)

    def loss(self, ids: Tensor, loss_mask: Tensor, items: list | None, reduce, autocast):
        if items is not None:
            raise ValueError(f"--features caches an EAGLE-3 draft's taps; --method {self.method} trains from the "
                             "target online")  # fmt: skip
        draft, device = self.model, self.target.model.device
        ids, loss_mask = ids.to(device), loss_mask.to(device)
        out, feature, masks, norms = distillation_targets(self.target, ids, loss_mask, self.steps, reduce)
        noisy = feature + (torch.rand_like(feature) * 2 - 1) * NOISE
        with autocast:
            predicted = ttt_hidden(draft, ids, noisy, len(masks))
        total = feature.new_zeros((), dtype=torch.float32)
        per_step, hits = [], []
        for k, mask in enumerate(masks):
            n = mask.shape[1]
            pred = predicted[k][:, :n].float()
            regression = F.smooth_l1_loss(pred, feature[:, 1 + k : 1 + k + n].float(), reduction="none").mean(-1)
            logq = torch.log_softmax(pred @ draft.head.float(), dim=-1)
            teacher = torch.softmax(out.logits[:, 1 + k : 1 + k + n].float(), dim=-1)
            per_position = regression + CLASSIFICATION_WEIGHT * -(teacher * logq).sum(-1)
            if self.hass:
                top = teacher.topk(HASS_TOP_K, dim=-1)
                per_position = per_position - (top.values * logq.gather(-1, top.indices)).sum(-1)
            loss_k = (per_position * mask).sum() / norms[k].clamp(min=1)
            total = total + self.cfg.decay**k * loss_k
            per_step.append(loss_k.detach())
            hits.append(((logq.argmax(-1) == teacher.argmax(-1)) & mask).float().sum())
        return total, torch.stack(per_step), torch.stack(hits), norms

    def save(self, folder: Path, target) -> None:
        save_eagle1(self.model, folder, str(target.name))

