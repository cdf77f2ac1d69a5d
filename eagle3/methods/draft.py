"""The EAGLE-3 draft head: one decoder layer over [token embedding ; fused target features].

Parameter names are exactly those of the official EAGLE / SGLang checkpoints (fc, midlayer.*, norm, lm_head,
d2t, t2d), so `state_dict()` is the checkpoint (see checkpoint.py for files and formats). Semantics:

- fc fuses the three target taps (low, mid, high; 3 * H_target wide) into H; it applies only to target
  features. The draft's own output h (before the final norm) is fed back as the next step's hidden as is.
- The layer's attention input is cat(input_layernorm(embedding), hidden_norm(hidden)), embedding first; the
  residual is the un-normed hidden.
- Position t pairs the target feature of position t with token t+1 and predicts token t+2.
- The token embedding is the target's, frozen and not saved.
- Logits cover the draft vocabulary; draft id i is target id i + d2t[i]; t2d marks target ids in the draft
  vocabulary.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagle3.runtimes.config import ModelConfig, RopeConfig, _rope_from_hf
from eagle3.runtimes.cpu_layout import FEW_ROWS, few_rows_matmul
from eagle3.runtimes.model import CacheWrite, KVCache, expand_mask_for_groups, grouped_attention, region_mask, rope_inv_freq


@dataclass(frozen=True)
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (token embeddings)
    draft_vocab_size: int
    target_hidden_size: int  # width of one target tap
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)  # theta defaults to 10000, never the target's
    fc_bias: bool = False  # the config's "bias"
    tap_layers: tuple[int, ...] | None = None  # target layers whose inputs feed fc (None: target default)

    @property
    def full_vocab(self) -> bool:
        return self.draft_vocab_size == self.vocab_size

    @classmethod
    def from_dict(cls, d: dict) -> "DraftConfig":
        """Inverse of dataclasses.asdict (as stored in training checkpoints)."""
        taps = d.get("tap_layers")
        return cls(**{**d, "rope": RopeConfig(**d["rope"]), "tap_layers": tuple(taps) if taps else None})


def draft_config_for(target: ModelConfig, draft_vocab_size: int | None = None, **overrides) -> DraftConfig:
    """A draft shaped like one layer of the target (the EAGLE-3 recipe), for a fresh draft."""
    cfg = DraftConfig(
        hidden_size=target.hidden_size,
        intermediate_size=target.intermediate_size,
        num_heads=target.num_heads,
        num_kv_heads=target.num_kv_heads,
        head_dim=target.head_dim,
        vocab_size=target.vocab_size,
        draft_vocab_size=min(draft_vocab_size or target.vocab_size, target.vocab_size),
        target_hidden_size=target.hidden_size,
        max_position_embeddings=target.context_length,
        rms_norm_eps=target.rms_norm_eps,
        tap_layers=tuple(target.default_tap_layers),
    )
    return replace(cfg, **overrides)


def draft_config_from_hf(cfg: dict) -> DraftConfig:
    """DraftConfig from the Llama fields of a draft config.json (num_hidden_layers 1). The tapped layers are
    checkpoint.py's business: SGLang and vLLM number them differently."""
    if int(cfg.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"an EAGLE-3 draft has one decoder layer; this config has {cfg['num_hidden_layers']}")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    vocab = int(cfg["vocab_size"])
    return DraftConfig(
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        draft_vocab_size=int(cfg.get("draft_vocab_size") or vocab),
        target_hidden_size=int(cfg.get("target_hidden_size") or hidden),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf({"rope_theta": 10000.0, **cfg}),
        fc_bias=bool(cfg.get("bias", False)),
    )


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig, width: int | None = None):
        super().__init__()
        width = width or 2 * cfg.hidden_size  # (EAGLE-3's layer reads [embedding ; hidden])
        self.q_proj = nn.Linear(width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)


def dense(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x); on CPU, 2..64 rows without autograd go as weight @ x.T, which MKL runs several times faster
    than F.linear for a few rows (see model.linear), or in int8 once quantize_int8 has packed the layer."""
    packed = getattr(layer, "int8", None)
    if packed is not None and not torch.is_grad_enabled():
        return torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]), packed, True).view(*x.shape[:-1], -1)
    if x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() // x.shape[-1] in FEW_ROWS:
        y = few_rows_matmul(x, layer.weight)
        return y if layer.bias is None else y + layer.bias
    return layer(x)


class MLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return dense(self.down_proj, F.silu(dense(self.gate_proj, x)) * dense(self.up_proj, x))


class MidLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hidden_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class OneLayerDraft(nn.Module):
    """A draft of one decoder layer on its own KV cache: the step that writes the cache, builds the masks and
    attends, shared by EAGLE-3's head (below) and EAGLE's (eagle1.py). A subclass says what goes into attention
    (project: the residual stream, q, k, v), what comes after it (finish), and how h becomes logits."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        # The target's token embeddings: frozen, shared, never saved (a plain attribute, not a parameter).
        self.embed_weight: Tensor | None = None
        self.cache: KVCache | None = None
        self._inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.native = None  # native_draft.NativeDraft, when the step runs on the native kernels instead

    def setup_cache(self, max_len: int, batch_size: int = 1) -> KVCache:
        cfg = self.config
        dtype, device = self.fc.weight.dtype, self.fc.weight.device
        self.cache = KVCache(1, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, dtype, device)
        return self.cache

    def forward(
        self,
        tokens: Tensor,
        hidden: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        mask_start: Sequence[int] | int | None = None,
    ) -> Tensor:
        """One draft step over n inputs per row on top of the draft's KV cache (the first B rows, each after its
        own last slot); returns h [B, n, H] (pre-norm).

        tokens [B, n] target ids; hidden [B, n, feature_width] target features or [B, n, H] draft outputs
        (EAGLE-3: the three taps, 3 * H_target wide; EAGLE: the normed top feature, H wide); positions [n] or
        [B, n]. mask [n, T] or [B, n, T] covers each row's last T cache slots, from mask_start
        (per row, or one for all rows; default: the first new slot) through the new ones, True where attention
        is allowed; a row's earlier slots are always visible. Default mask: causal among the new tokens.
        """
        if self.native is not None:
            return self.native.forward(tokens, hidden, positions, mask, mask_start)
        cfg, cache = self.config, self.cache
        if cache is None:
            raise RuntimeError("call setup_cache() before forward()")
        B, n = tokens.shape
        rows = range(B)
        cache.check_room(n, rows)
        starts = cache.lengths[:B]
        hidden, q, k, v = self.project(tokens, hidden, positions)
        write = CacheWrite.after(starts, n, tokens.device)
        kv = cache.kv[0] if B == cache.rows else cache.kv[0].narrow(1, 0, B)
        if write.start is not None:  # (two copies: cheaper than stacking k and v first)
            kv[0].narrow(2, write.start, n).copy_(k.transpose(1, 2))
            kv[1].narrow(2, write.start, n).copy_(v.transpose(1, 2))
        else:
            write.put(kv, torch.stack([k, v]).transpose(2, 3))
        for r in rows:
            cache.lengths[r] += n

        full_mask = None
        if mask is not None or n > 1 or write.start is None:
            first = starts if mask_start is None else ([mask_start] * B if isinstance(mask_start, int) else mask_start)
            region = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril_() if mask is None else mask
            g = cfg.num_heads // cfg.num_kv_heads
            if all(f == first[0] for f in first) and region.dim() == 2 and write.start is not None:
                # Rows in step sharing one mask (one sequence, above all): [g*n, end], broadcast over rows.
                visible = torch.ones(n, first[0], dtype=torch.bool, device=tokens.device)
                full_mask = expand_mask_for_groups(torch.cat([visible, region.to(tokens.device)], 1), g)
            else:
                full_mask = region_mask(first, region.to(tokens.device), write.end)
                full_mask = (full_mask.repeat(1, g, 1) if g > 1 else full_mask)[:, None]
        keys, values = kv.narrow(3, 0, write.end).unbind(0)
        out = grouped_attention(q, keys, values, full_mask)
        return self.finish(hidden, out)

    def rotate(self, positions: Tensor, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, n, heads, hd] and k rotated to positions [n] or [B, n] (RoPE, half-split pairs)."""
        n, hd = q.shape[1], self.config.head_dim
        angles = positions.float()[..., None] * self._inv_freq.to(positions.device)
        emb_angles = torch.cat([angles, angles], dim=-1).view(-1, n, 1, hd)
        cos, sin = emb_angles.cos().to(q.dtype), emb_angles.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class Eagle3Draft(OneLayerDraft):
    def __init__(self, cfg: DraftConfig):
        super().__init__(cfg)
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=cfg.fc_bias)
        self.midlayer = MidLayer(cfg)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool) if cfg.full_vocab
                             else torch.zeros(cfg.vocab_size, dtype=torch.bool))  # fmt: skip

    @property
    def feature_width(self) -> int:
        """Width of the target features it reads: three taps."""
        return 3 * self.config.target_hidden_size

    # ------------------------------------------------------------------------------------------ setup

    def attach(self, target_embeddings: Tensor) -> "Eagle3Draft":
        """Shares the target's token embeddings [vocab, H] (checking that draft and target fit)."""
        cfg = self.config
        if tuple(target_embeddings.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(
                f"draft and target do not match: the draft expects token embeddings of shape "
                f"({cfg.vocab_size}, {cfg.hidden_size}) but the target's are {tuple(target_embeddings.shape)}"
            )
        self.embed_weight = target_embeddings.detach()
        return self

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    @property
    def head_in_int8(self) -> bool:
        """Whether its logits come from an int8 lm_head (quantize_int8; the native step says so itself)."""
        return getattr(self.lm_head, "int8", None) is not None

    # ------------------------------------------------------------------------------------------ forward

    def project(self, tokens: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The layer up to attention: (residual hidden [B, n, H], q [B, n, heads, hd], k and v [B, n, kv, hd]),
        q and k rotated to `positions`. Target taps (3 * H_target wide) go through fc first."""
        cfg, layer = self.config, self.midlayer
        if self.embed_weight is None:
            raise RuntimeError("call attach(target embeddings) first")
        B, n = tokens.shape
        if hidden.shape[-1] != cfg.hidden_size:
            hidden = dense(self.fc, hidden)
        emb = F.embedding(tokens, self.embed_weight)
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], dim=-1)
        attn = layer.self_attn
        q = dense(attn.q_proj, x).view(B, n, cfg.num_heads, cfg.head_dim)
        k = dense(attn.k_proj, x).view(B, n, cfg.num_kv_heads, cfg.head_dim)
        v = dense(attn.v_proj, x).view(B, n, cfg.num_kv_heads, cfg.head_dim)
        return (hidden, *self.rotate(positions, q, k), v)

    def finish(self, hidden: Tensor, attn_out: Tensor) -> Tensor:
        """The layer after attention: residual + o_proj, then + MLP; returns h (pre-norm)."""
        layer = self.midlayer
        h = hidden + dense(layer.self_attn.o_proj, attn_out)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h: Tensor) -> Tensor:
        """Logits over the draft vocabulary."""
        if self.native is not None:
            return self.native.logits(h)
        return dense(self.lm_head, self.norm(h))


def new_draft(target_config: ModelConfig, draft_vocab_size: int | None = None, seed: int = 0, **overrides) -> Eagle3Draft:
    """A fresh, untrained draft for a target (small random init, as transformers initializes Llama)."""
    cfg = draft_config_for(target_config, draft_vocab_size, **overrides)
    generator = torch.Generator().manual_seed(seed)
    draft = Eagle3Draft(cfg)
    for name, p in draft.named_parameters():
        if p.dim() == 2:
            p.data.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("bias"):
            p.data.zero_()
    # Without data, the draft vocabulary is the first draft_vocab_size target ids.
    used = torch.arange(cfg.draft_vocab_size)
    draft.d2t.zero_()
    draft.t2d.zero_()
    draft.t2d[used] = True
    return draft


def int8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether quantize_int8 applies: a float32 draft on a CPU whose quantized engine has the fbgemm kernels."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.quantized.engine in ("x86", "fbgemm")


def quantize_int8(draft: Eagle3Draft, names: tuple[str, ...] = ("lm_head",)) -> Eagle3Draft:
    """Packs the named matrices (default: the lm_head) for int8 inference on CPU: weights int8 per output
    row, activations quantized per call (dynamic quantization, fbgemm kernels). The lm_head is often the
    draft's largest matrix, and its logits a large share of a draft step. Only the draft's proposals can
    change; verification accepts exactly what the target would produce either way. Only the lm_head by
    default: quantizing every matrix cost acceptance where the lm_head alone did not (measurements:
    docs/design/int8-draft-head.md). The float weights stay, for training and saving. Packs in place; returns
    the draft."""
    if not int8_supported(draft.lm_head.weight.device, draft.lm_head.weight.dtype):
        raise ValueError("int8 drafts need a float32 draft on CPU with the x86/fbgemm quantized engine")
    for name, layer in draft.named_modules():
        if isinstance(layer, nn.Linear) and name in names:
            w = layer.weight.detach()
            scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).double()
            with warnings.catch_warnings():  # (quantized tensors are deprecated in favour of torchao)
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(w, scale, torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
                bias = None if layer.bias is None else layer.bias.detach()
                layer.int8 = torch.ops.quantized.linear_prepack(qw, bias)
    return draft
