"""The native target runtime: one Llama-family transformer (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3),
configured by the HF config, with what speculative decoding needs from a target:

- a preallocated KV cache of rows, each a sequence with a length of its own (`KVCache`);
- a forward of n new tokens per row at arbitrary position ids on top of each row's cache, under an arbitrary
  mask among those n tokens (a draft tree: each token sees the cache and its ancestors only), every row with
  its own tree; or of one row alone (a sequence joining the batch);
- logits (all positions, the last one, or none) and hidden-state taps (inputs of chosen decoder layers);
- cache compaction: each row keeps an ordered subset of the positions just written (its accepted tree path).

Weights load from HF safetensors (or a weights-only torch checkpoint); q/k/v and gate/up are fused into one
matrix each, so a decode step runs two big matmuls per block fewer than the HF layout.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagle3.runtimes.config import ModelConfig, RopeConfig, load_config
from eagle3.runtimes.cpu_layout import matmul
from eagle3.runtimes.native_weights import NativeWeight


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int, seq_len: int = 0) -> Tensor:
    """Inverse frequencies (fp32, CPU) as transformers computes them for each supported rope type.

    `seq_len` matters only for "dynamic" (NTK) scaling, which stretches the base once the sequence outgrows
    max_position_embeddings.
    """
    dim = head_dim
    base = rope.theta
    if rope.type == "dynamic" and seq_len > max_position_embeddings:
        base = base * ((rope.factor * seq_len / max_position_embeddings) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope.type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.type == "llama3":
        old_context = rope.original_max_position_embeddings
        low_freq_wavelen = old_context / rope.low_freq_factor
        high_freq_wavelen = old_context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_rotation(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Unit complex numbers exp(i * position * freq), [..., head_dim / 2], in fp32."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_(x: Tensor, rotation: Tensor) -> None:
    """Rotates x [B, n, heads, head_dim] in place by rotation [B or 1, n, 1, head_dim / 2].

    Dimensions (2i, 2i+1) form rotation pair i: the q/k weights are permuted at load time from HF's
    half-split layout (pairs i, i + head_dim/2), so that RoPE is a single complex multiply. Attention only
    sees q.k dot products, so permuting q and k alike changes nothing else.
    """
    if x.dtype == torch.float32:
        torch.view_as_complex(x.view(*x.shape[:-1], -1, 2)).mul_(rotation)
    else:
        pairs = x.float().view(*x.shape[:-1], -1, 2)
        x.copy_(torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2))


def interleave_rope_rows(w: Tensor, heads: int) -> Tensor:
    """Reorders a q or k projection (rows [heads * head_dim, ...]) from HF's half-split RoPE layout to
    interleaved pairs: new row 2i <- old row i, new row 2i+1 <- old row i + head_dim/2, per head."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer in one preallocated tensor [layers, 2, rows, kv_heads, slots, head_dim],
    with a length per row (host ints: reading them never waits for the device).

    Each row is a sequence of its own. Its slots are written left to right: a forward of n tokens fills slots
    [length, length + n) of each row it runs. Slots are not positions: tree tokens share positions (depths),
    and compaction makes a row's kept slots contiguous again; rows that accept paths of different lengths
    end up with different lengths.
    """

    def __init__(
        self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ):  # fmt: skip
        self.max_len = max_len
        self.kv = torch.zeros(num_layers, 2, batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = [0] * batch_size

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def length(self) -> int:
        """The length of every row (for caches whose rows are in step: one sequence, or a prefill batch)."""
        first = self.lengths[0]
        if any(n != first for n in self.lengths):
            raise ValueError(f"the cache's rows hold different lengths {self.lengths}: ask per row (lengths)")
        return first

    @length.setter
    def length(self, value: int) -> None:
        self.lengths = [value] * self.rows

    def check_room(self, n: int, rows: range | None = None) -> None:
        """Checks that n more tokens fit in every row (or the given rows)."""
        longest = max(self.lengths[r] for r in (rows or range(self.rows)))
        if longest + n > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {longest} are used and {n} more do not fit")

    def compact(self, starts: Sequence[int], keeps: Sequence[Sequence[int]]) -> None:
        """Per row r: keeps slots starts[r] + keeps[r][i] (relative, increasing), moved to starts[r] + i, and
        drops the row's other slots from starts[r] on.

        One indexed copy of just the slots that move: an accepted path is mostly a prefix of the tree (a plain
        step's is [0], which moves nothing), and copying every slot of every layer costs milliseconds on a CPU.
        """
        rows, src, dst = [], [], []
        for r, (start, keep) in enumerate(zip(starts, keeps)):
            moved = [(start + slot, start + i) for i, slot in enumerate(keep) if slot != i]
            rows += [r] * len(moved)
            src += [a for a, _ in moved]
            dst += [b for _, b in moved]
            self.lengths[r] = start + len(keep)
        if rows:  # (a slot is read before any write reaches it: the index copy reads first)
            index = torch.tensor([rows, src, dst], device=self.kv.device)
            self.kv[:, :, index[0], :, index[2]] = self.kv[:, :, index[0], :, index[1]]

    def truncate(self, length: int | Sequence[int]) -> None:
        """Forgets every slot from `length` on (one length for every row, or one per row)."""
        lengths = [length] * self.rows if isinstance(length, int) else list(length)
        if len(lengths) != self.rows or any(not 0 <= n <= have for n, have in zip(lengths, self.lengths)):
            raise ValueError(f"cannot truncate a cache of lengths {self.lengths} to {lengths}")
        self.lengths = lengths

    def free_row(self, row: int, last: int) -> None:
        """Frees a row by moving row `last` (the last live one) into it, so that live rows stay 0 .. last - 1."""
        if row != last:
            length = self.lengths[last]
            self.kv[:, :, row, :, :length] = self.kv[:, :, last, :, :length]
            self.lengths[row] = length
        self.lengths[last] = 0


@dataclass
class CacheWrite:
    """Where a forward's n new tokens go: one first slot for rows in step (a plain copy), or a slot per row and
    token (a scatter); and how many slots attention reads."""

    start: int | None  # the first new slot of every row, when the rows are in step
    slots: Tensor | None  # [B, n] the new slots of each row, when they are not
    end: int  # attention reads slots [0, end)

    @classmethod
    def after(cls, starts: Sequence[int], n: int, device: torch.device) -> "CacheWrite":
        """n new tokens per row after each row's own `starts` slot."""
        first = starts[0]
        if len(starts) == 1 or all(s == first for s in starts):
            return cls(first, None, first + n)
        end = max(starts) + n
        return cls(None, torch.tensor(list(starts), device=device)[:, None] + torch.arange(n, device=device), end)

    def put(self, cache: Tensor, new: Tensor) -> None:
        """Writes new [2, B, KV, n, hd] keys and values into one layer's cache [2, B, KV, slots, hd]."""
        if self.start is not None:
            cache.narrow(3, self.start, new.shape[3]).copy_(new)
        else:
            cache.scatter_(3, self.slots[None, :, None, :, None].expand_as(new), new)


def region_mask(region_starts: Sequence[int], region: Tensor, end: int) -> Tensor:
    """[B, q, end] bool attention mask of q queries per row over cache slots [0, end): row b sees its slots
    before region_starts[b] (its committed sequence) and, in the region of T slots from there, those that
    region [B or 1, q, T] allows (its tree); nothing past the region."""
    device, B, (q, T) = region.device, len(region_starts), region.shape[-2:]
    relative = torch.arange(end, device=device)[None, :] - torch.tensor(list(region_starts), device=device)[:, None]
    inside = (relative >= 0) & (relative < T)
    allowed = region.expand(B, q, T).gather(2, relative.clamp(0, T - 1)[:, None, :].expand(B, q, end))
    return (relative < 0)[:, None, :] | (allowed & inside[:, None, :])


# ---------------------------------------------------------------------------------------------- network


def rms_norm(x: Tensor, eps: float, weight: Tensor | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) (* weight), the statistic in fp32 as the HF Llama family computes it."""
    unit = unit_rms_norm(x, eps) * math.sqrt(x.shape[-1])
    return unit if weight is None else unit * weight


def block_norm(x: Tensor, eps: float, weight: Tensor | None) -> Tensor:
    """A decoder's RMSNorm: with its weight, or, once folded (weight None), the unit norm alone."""
    return unit_rms_norm(x, eps) if weight is None else rms_norm(x, eps, weight)


def unit_rms_norm(x: Tensor, eps: float) -> Tensor:
    """rms_norm(x) / sqrt(d) = x / sqrt(|x|^2 + d * eps), in three ops (norm, hypot, divide).

    Decoding on a CPU pays a fixed toll per op, several times larger right after a weight-streaming matmul has
    flushed the caches, so the norm is cut to three ops and, once the norms are folded (norm_folding.py), the
    constant sqrt(d) and the norm weight ride in the matmul that follows.
    """
    xf = x if x.dtype == torch.float32 else x.float()
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    y = xf / torch.hypot(norm, _constant(math.sqrt(x.shape[-1] * eps), norm.device))
    return y if x.dtype == torch.float32 else y.to(x.dtype)


_CONSTANTS: dict[tuple[float, torch.device], Tensor] = {}


def _constant(value: float, device: torch.device) -> Tensor:
    """A cached fp32 scalar tensor (making one per call costs as much as the op that uses it)."""
    key = (value, device)
    if key not in _CONSTANTS:
        with torch.inference_mode(False):  # usable in and out of inference mode
            _CONSTANTS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, weight_t: Tensor | NativeWeight | None = None,
           paths: tuple[str, ...] = ()) -> Tensor:
    """x @ weight (+ bias) with weight stored [in, out], transposed from nn.Linear and HF: for one-row
    inputs (decoding, bound by reading the weights) MKL streams this layout fast on CPU.

    weight_t, the same weight stored [out, in] (given on CPU by cpu_layout.add_few_row_copies), serves a few
    rows by the path `paths` names for that row count (cpu_layout.PATHS, measured per machine): for a few
    rows, x @ weight can cost several times one row, and another layout or call does not.
    """
    if isinstance(weight_t, NativeWeight):  # (native_weights.to_native: the matrix lives there alone)
        y = weight_t.matmul(x)
        return y if bias is None else y + bias
    rows = x.numel() // x.shape[-1]
    if weight_t is not None and rows < len(paths):
        y = matmul(paths[rows], x, weight, weight_t)
    else:
        y = x @ weight
    return y if bias is None else y + bias


def grouped_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None) -> Tensor:
    """Attention of q [B, n, H, hd] over keys/values [B, KV, L, hd] -> [B, n, H * hd].

    Grouped-query attention without repeating K/V: the g = H / KV query heads of a kv head become g*n query
    rows, so `mask` is [g*n, L] (see expand_mask_for_groups), True where attention is allowed.
    """
    B, n, H, hd = q.shape
    KV = keys.shape[1]
    g = H // KV
    q = q.reshape(B, n, KV, g, hd).permute(0, 2, 3, 1, 4).reshape(B, KV, g * n, hd)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    return out.view(B, KV, g, n, hd).permute(0, 3, 1, 2, 4).reshape(B, n, H * hd)


def expand_mask_for_groups(mask: Tensor, groups: int) -> Tensor:
    """[n, L] -> [groups * n, L], the row layout grouped_attention uses."""
    return mask.repeat(groups, 1) if groups > 1 else mask


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


class Block(nn.Module):
    """One decoder layer: x + attention(norm(x)), then + SwiGLU(norm(x)).

    Weights: q/k/v fused (rows of q and k interleaved for RoPE, see apply_rope_) and gate/up fused, all
    stored [in, out]. attn_norm and mlp_norm are the RMSNorm weights before attention and the MLP; once
    norm_folding.fold_norms has moved them into qkv and gate_up they are None.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.attn_norm: nn.Parameter | None = _param(cfg.hidden_size)
        self.mlp_norm: nn.Parameter | None = _param(cfg.hidden_size)
        qkv_dim = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv_weight = _param(cfg.hidden_size, qkv_dim)
        self.qkv_bias = _param(qkv_dim) if cfg.qkv_bias else None
        self.o_weight = _param(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.o_bias = _param(cfg.hidden_size) if cfg.o_bias else None
        # Qwen3's q_norm and k_norm weights, one row per q head then per kv head, so one op normalizes both.
        self.qk_norm = _param(cfg.num_heads + cfg.num_kv_heads, cfg.head_dim) if cfg.qk_norm else None
        self.gate_up_weight = _param(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.gate_up_bias = _param(2 * cfg.intermediate_size) if cfg.mlp_bias else None
        self.down_weight = _param(cfg.intermediate_size, cfg.hidden_size)
        self.down_bias = _param(cfg.hidden_size) if cfg.mlp_bias else None
        self.few_row_weights: dict[str, Tensor] = {}  # [out, in] copies for 2..64 rows (cpu_layout.py) ...
        self.matmul_paths: tuple[str, ...] = ()  # ... and the matmul each row count takes

    def forward(self, x: Tensor, rotation: Tensor, cache: Tensor, write: CacheWrite, mask: Tensor | None) -> Tensor:
        x = x + self._attention(block_norm(x, self.eps, self.attn_norm), rotation, cache, write, mask)
        t = self.few_row_weights
        gate, up = linear(block_norm(x, self.eps, self.mlp_norm), self.gate_up_weight, self.gate_up_bias, t.get("gate_up"), self.matmul_paths).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, self.down_weight, self.down_bias, t.get("down"), self.matmul_paths)

    def _attention(self, x: Tensor, rotation: Tensor, cache: Tensor, write: CacheWrite, mask: Tensor | None) -> Tensor:
        B, n, _ = x.shape
        H, KV, hd = self.num_heads, self.num_kv_heads, self.head_dim
        t = self.few_row_weights
        qkv = linear(x, self.qkv_weight, self.qkv_bias, t.get("qkv"), self.matmul_paths).view(B, n, H + 2 * KV, hd)
        qk = qkv[:, :, : H + KV]
        if self.qk_norm is not None:
            qk.copy_(rms_norm(qk, self.eps, self.qk_norm))
        apply_rope_(qk, rotation)
        # k and v land in the cache [2, B, KV, slots, hd] in one op.
        write.put(cache, qkv[:, :, H:].view(B, n, 2, KV, hd).permute(2, 0, 3, 1, 4))
        keys, values = cache.narrow(3, 0, write.end).unbind(0)
        out = grouped_attention(qkv[:, :, :H], keys, values, mask)
        return linear(out, self.o_weight, self.o_bias, t.get("o"), self.matmul_paths)


class ForwardOutput(NamedTuple):
    logits: Tensor | None  # [B, n, vocab] ("all"), [B, 1, vocab] ("last") or None ("none", "hidden")
    taps: Tensor | None  # [B, n, len(taps) * hidden]: the tapped layers' inputs, concatenated in layer order
    hidden: Tensor | None = None  # [B, n, hidden]: the last layer's output before the final norm ("hidden")


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm: nn.Parameter | None = _param(cfg.hidden_size)  # the final norm's weight (None once folded)
        self.final_norm_weight: Tensor | None = None  # ... a copy kept by norm_folding when it folds it
        self.lm_head_weight = _param(cfg.hidden_size, cfg.vocab_size)  # [in, out]
        self.lm_head_weight_t: Tensor | None = None  # [out, in] copy for 2..64 rows (cpu_layout.py) ...
        self.matmul_paths: tuple[str, ...] = ()  # ... and the matmul each row count takes
        self.cache: KVCache | None = None
        self._inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self._windows = cfg.sliding_windows or (None,) * cfg.num_layers

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    def setup_cache(self, max_len: int, batch_size: int = 1, padded: bool = False) -> KVCache:
        """(Re)allocates the KV cache; max_len is capped by the model's context, unless `padded` (padding nodes of
        batched trees take slots but no positions, so slots may outnumber the context)."""
        if not padded:
            max_len = min(max_len, self.config.context_length)
        cfg = self.config
        self.cache = KVCache(cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim, self.dtype, self.device)
        return self.cache

    def empty_cache(self, max_len: int, batch_size: int = 1, padded: bool = False) -> KVCache:
        """An empty KV cache of at least max_len slots: the current one when it is big enough (allocating
        and zeroing a cache per call is not free), else a new one."""
        cache = self.cache
        wanted = max_len if padded else min(max_len, self.config.context_length)
        if cache is None or cache.max_len < wanted or cache.kv.shape[2] != batch_size:
            return self.setup_cache(max_len, batch_size, padded)
        cache.truncate(0)
        return cache

    def rope_frequencies(self, max_position: int) -> Tensor:
        """RoPE's inverse frequencies for a forward reaching max_position (dynamic scaling stretches them)."""
        cfg = self.config
        if cfg.rope.type == "dynamic" and max_position + 1 > cfg.max_position_embeddings:
            return rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, max_position + 1)
        return self._inv_freq

    def _rope(self, positions: Tensor, max_position: int) -> Tensor:
        # [B or 1, n, 1, head_dim / 2]: broadcast over the head axis.
        rotation = rope_rotation(positions, self.rope_frequencies(max_position))
        return rotation.view(-1, positions.shape[-1], 1, self.config.head_dim // 2)

    def _masks(self, start: int, n: int, tree_mask: Tensor | None, positions: Tensor, max_position: int
               ) -> dict[int | None, Tensor | None]:  # fmt: skip
        """Boolean attention masks [g*n, start+n] (True = attend) for rows in step sharing one tree mask, one
        per distinct sliding window (None: no mask needed)."""
        cfg = self.config
        windows = set(self._windows)
        needs_window = any(w is not None and max_position + 1 > w for w in windows)
        if n == 1 and not needs_window:
            return {w: None for w in windows}  # a single new token sees the whole cache
        dev = self.device
        new = torch.ones(n, n, dtype=torch.bool, device=dev).tril_() if tree_mask is None else tree_mask.to(dev)
        base = torch.cat([torch.ones(n, start, dtype=torch.bool, device=dev), new], dim=1)
        g = cfg.num_heads // cfg.num_kv_heads
        masks: dict[int | None, Tensor | None] = {}
        for w in windows:
            mask = base
            if w is not None:  # key positions: committed slots hold positions 0..start-1, new slots `positions`
                q_pos = positions.reshape(-1)[-n:].to(dev)
                k_pos = torch.cat([torch.arange(start, device=dev), q_pos])
                mask = mask & (q_pos[:, None] - k_pos[None, :] < w)
            masks[w] = expand_mask_for_groups(mask, g)
        return masks

    def _row_masks(self, starts: Sequence[int], n: int, tree_mask: Tensor | None, positions: Tensor, end: int
                   ) -> dict[int | None, Tensor]:  # fmt: skip
        """Per-row boolean attention masks [B, 1, g*n, end] (True = attend), one per distinct sliding window, for
        rows whose new tokens start at different slots (starts) or carry trees of their own (tree_mask [B, n, n]):
        row b's token i sees the row's committed slots [0, starts[b]) and the new slots its tree mask allows."""
        dev, B = self.device, len(starts)
        tree = torch.ones(n, n, dtype=torch.bool, device=dev).tril_() if tree_mask is None else tree_mask.to(dev)
        base = region_mask(starts, tree, end)
        g = self.config.num_heads // self.config.num_kv_heads
        masks: dict[int | None, Tensor] = {}
        for w in set(self._windows):
            mask = base
            if w is not None:  # committed slot s holds position s; new slot s holds its token's position
                slots = torch.arange(end, device=dev)
                relative = slots[None, :] - torch.tensor(list(starts), device=dev)[:, None]
                q_pos = positions.to(dev).expand(B, n)
                k_pos = torch.where(relative < 0, slots[None, :], q_pos.gather(1, relative.clamp(0, n - 1)))
                mask = mask & (q_pos[:, :, None] - k_pos[:, None, :] < w)
            masks[w] = (mask.repeat(1, g, 1) if g > 1 else mask)[:, None]
        return masks

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        tree_mask: Tensor | None = None,
        logits: str = "all",
        taps: Sequence[int] = (),
        rows: range | None = None,
    ) -> ForwardOutput:
        """Runs n new tokens [B, n] on top of the cache and appends their keys and values to each row.

        positions: [n] or [B, n] position ids (default: each row's length + arange(n)).
        tree_mask: [n, n] or [B, n, n] bool, True where new token i may see new token j (default: causal).
        logits: "all", "last", "none", or "hidden" (the last layer's outputs instead: `head` turns them into
        logits later, as offline features do). taps: decoder layers whose inputs to return as well (a draft's
        tap layers; 0 is the token embeddings, num_layers the last layer's output before the final norm, which
        drafters of the top feature read), concatenated in layer order as SGLang and vLLM do; () for none.
        rows: the cache rows the B rows of tokens run on (default: all; range(r, r + 1) prefills a sequence
        joining the batch). Rows may hold different lengths: each writes its new tokens after its own last slot.
        """
        cache = self.cache
        if cache is None:
            raise RuntimeError("call setup_cache() before forward()")
        B, n = tokens.shape
        rows = range(cache.rows) if rows is None else rows
        if len(rows) != B or rows.step != 1 or not 0 <= rows.start <= rows.stop <= cache.rows:
            raise ValueError(f"{B} rows of tokens for cache rows {rows} of {cache.rows}")
        cache.check_room(n, rows)
        starts = [cache.lengths[r] for r in rows]
        in_step = all(s == starts[0] for s in starts)
        if positions is None:
            positions = torch.arange(n)[None, :] + torch.tensor(starts)[:, None] if not in_step else torch.arange(starts[0], starts[0] + n)
        max_position = int(positions.max())  # host positions (the decoding loop's) cost no device sync
        positions = positions.to(tokens.device, non_blocking=True)
        if max_position >= self.config.context_length:
            raise ValueError(f"position {max_position} is beyond the model's context of {self.config.context_length}")
        if any(not 0 <= i <= self.config.num_layers for i in taps):
            raise ValueError(f"tap layers {tuple(taps)} must be decoder layer indices in [0, {self.config.num_layers}] "
                             f"({self.config.num_layers}: the last layer's output)")  # fmt: skip
        rotation = self._rope(positions, max_position)
        write = CacheWrite.after(starts, n, tokens.device)
        if in_step and (tree_mask is None or tree_mask.dim() == 2):
            masks = self._masks(starts[0], n, tree_mask, positions, max_position)
        else:
            masks = self._row_masks(starts, n, tree_mask, positions, write.end)
        kv = cache.kv if B == cache.rows else cache.kv.narrow(2, rows.start, B)
        x = self.embed(tokens)
        tapped = []
        for i, layer in enumerate(self.layers):
            if i in taps:
                tapped.append(x)
            x = layer(x, rotation, kv[i], write, masks[self._windows[i]])
        if self.config.num_layers in taps:
            tapped.append(x)
        for r in rows:
            cache.lengths[r] += n
        out_taps = torch.cat(tapped, dim=-1) if tapped else None
        if logits == "hidden":
            return ForwardOutput(None, out_taps, x)
        out_logits = None
        if logits != "none":
            out_logits = self.head(x[:, -1:] if logits == "last" else x)
        return ForwardOutput(out_logits, out_taps)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits from last-layer outputs (the final norm, then lm_head)."""
        return linear(block_norm(hidden, self.config.rms_norm_eps, self.norm), self.lm_head_weight, None,
                      self.lm_head_weight_t, self.matmul_paths)  # fmt: skip


# ---------------------------------------------------------------------------------------------- loading


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's configuration and weights (a strided sample of every tensor: cheap, and any
    two checkpoints worth telling apart differ there), for caches that must not outlive their target."""
    import hashlib

    digest = hashlib.sha256(repr(getattr(model, "config", None)).encode())
    digest.update(str(next(model.parameters()).dtype).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class CorruptWeights(ValueError):
    """A weights file that cannot be read: truncated, not what its name says, or pointing outside its folder."""


def read_weights_file(path: Path) -> dict[str, Tensor]:
    """One safetensors file or a weights-only torch checkpoint, with a one-line error naming a bad file."""
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path} is missing") from None
    except Exception as err:  # safetensors and torch.load raise their own types for truncated or foreign bytes
        raise CorruptWeights(f"weights file {path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CorruptWeights(f"weights file {path} does not hold a dictionary of named tensors")
    return state


def read_state_dict(folder: str | Path) -> dict[str, Tensor]:
    """HF weights of a folder: model.safetensors, sharded safetensors, or pytorch_model.bin (weights only).
    A shard index may only name files inside the folder."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return read_weights_file(folder / "model.safetensors")
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CorruptWeights(f"{index} is not a safetensors shard index ({type(err).__name__}: {err})") from None
        state: dict[str, Tensor] = {}
        for shard in shards:
            if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CorruptWeights(f"{index} names the shard {shard!r}, outside {folder}")
            state.update(read_weights_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return read_weights_file(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"no weights in {folder} (looked for model.safetensors, its index, pytorch_model.bin)")


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every HF weight a Llama-family checkpoint of this config holds (names without "model.";
    lm_head.weight may be absent when tied)."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (V, H), "norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(cfg.num_layers):
        a, m = f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        shapes.update({f"layers.{i}.input_layernorm.weight": (H,), f"layers.{i}.post_attention_layernorm.weight": (H,),
                       a + "q_proj.weight": (q, H), a + "k_proj.weight": (kv, H), a + "v_proj.weight": (kv, H),
                       a + "o_proj.weight": (H, q), m + "gate_proj.weight": (I, H), m + "up_proj.weight": (I, H),
                       m + "down_proj.weight": (H, I)})  # fmt: skip
        if cfg.qkv_bias:
            shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
        if cfg.o_bias:
            shapes[a + "o_proj.bias"] = (H,)
        if cfg.mlp_bias:
            shapes.update({m + "gate_proj.bias": (I,), m + "up_proj.bias": (I,), m + "down_proj.bias": (H,)})
        if cfg.qk_norm:
            shapes.update({a + "q_norm.weight": (hd,), a + "k_norm.weight": (hd,)})
    return shapes


def check_hf_weights(hf: dict[str, Tensor], cfg: ModelConfig, where: str) -> None:
    """Every weight the config implies is present, floating point, and of the implied shape."""
    found = {k.removeprefix("model."): v for k, v in hf.items()}
    for name, shape in hf_shapes(cfg).items():
        if name not in found:
            if name == "lm_head.weight":
                continue  # a tied head
            raise CorruptWeights(f"{where} lacks the weight {name!r} (expected shape {shape} from config.json)")
        tensor = found[name]
        if tuple(tensor.shape) != shape:
            raise CorruptWeights(f"weight {name!r} in {where} has shape {tuple(tensor.shape)}, config.json implies {shape}")
        if not tensor.dtype.is_floating_point:
            raise CorruptWeights(f"weight {name!r} in {where} has dtype {tensor.dtype}, expected a floating point type")


def convert_hf_state_dict(hf: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF Llama-family weights in this runtime's layout (see Block): q/k/v and gate/up fused, q/k rows
    interleaved for RoPE, matrices stored [in, out]. The norms keep their weights (norm_folding.py folds them
    into the matmuls after loading)."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}

    def take(name: str) -> Tensor:
        if name not in hf:
            raise ValueError(f"weight {name!r} is missing from the checkpoint")
        return hf[name].float()

    def qkv(prefix: str, suffix: str) -> Tensor:  # q, k, v weights or biases fused, q/k rows interleaved
        parts = [take(f"{prefix}{x}_proj.{suffix}") for x in "qkv"]
        return torch.cat([interleave_rope_rows(parts[0], cfg.num_heads), interleave_rope_rows(parts[1], cfg.num_kv_heads), parts[2]])

    state = {"embed.weight": take("embed_tokens.weight")}
    for i in range(cfg.num_layers):
        p, a, m = f"layers.{i}.", f"layers.{i}.self_attn.", f"layers.{i}.mlp."
        state[p + "attn_norm"] = take(p + "input_layernorm.weight")
        state[p + "mlp_norm"] = take(p + "post_attention_layernorm.weight")
        state[p + "qkv_weight"] = qkv(a, "weight").t()
        state[p + "o_weight"] = take(a + "o_proj.weight").t()
        state[p + "gate_up_weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")]).t()
        state[p + "down_weight"] = take(m + "down_proj.weight").t()
        if cfg.qkv_bias:
            state[p + "qkv_bias"] = qkv(a, "bias")
        if cfg.o_bias:
            state[p + "o_bias"] = take(a + "o_proj.bias")
        if cfg.mlp_bias:
            state[p + "gate_up_bias"] = torch.cat([take(m + "gate_proj.bias"), take(m + "up_proj.bias")])
            state[p + "down_bias"] = take(m + "down_proj.bias")
        if cfg.qk_norm:
            state[p + "qk_norm"] = torch.cat(
                [interleave_rope_rows(take(a + f"{x}_norm.weight"), 1).expand(n, -1)
                 for x, n in (("q", cfg.num_heads), ("k", cfg.num_kv_heads))]
            )
    tied = cfg.tie_word_embeddings or "lm_head.weight" not in hf
    # A tied head gets its own copy: the embedding lookup wants rows, the head wants [in, out].
    head = state["embed.weight"] if tied else take("lm_head.weight")
    state["norm"] = take("norm.weight")
    state["lm_head_weight"] = head.t()
    return state


def load_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> Transformer:
    """Loads a Llama-family HF checkpoint folder into the native runtime (weights only, safely)."""
    cfg = load_config(folder)
    device = torch.device(device) if device is not None else default_device()
    hf = read_state_dict(folder)
    check_hf_weights(hf, cfg, str(folder))
    state = convert_hf_state_dict(hf, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    state = {k: v.to(device=device, dtype=dtype).contiguous() for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
