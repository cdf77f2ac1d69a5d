"""TargetRuntime on OpenVINO: the target's forward as one compiled OpenVINO graph on the CPU, with the KV cache
kept by this runtime (numpy) and passed in place.

Why: eagle3's PyTorch forward pays a fixed toll on each of its many small ops a token; OpenVINO's CPU plugin
compiles the whole graph and has int8 weight kernels. How it compares is measured, not assumed
(docs/design/fast-cpu-path.md). The PyTorch model stays the reference and the training path; this graph is
built from its loaded weights (norms folded) and follows the same math:

    tokens [B, n] -> embed -> blocks (unit RMSNorm, qkv, RoPE on interleaved pairs, GQA attention over
    [cache ; new] under a host-made mask, o, SwiGLU) -> taps (chosen layers' inputs) -> the rows asked for
    -> unit RMSNorm -> lm_head

The graph is stateless. Each layer's cached keys and values go in where they lie, one block [B, KV, slots, hd] of
the runtime's cache [layers, 2, rows, KV, slots, hd] per layer (a row's slots past its length are masked out);
attention reads them and the n new tokens' keys under one softmax, so the cache is never copied or
concatenated inside the graph. The new keys and values come out, and a tree's nodes never enter the cache:
commit copies just the accepted path's after each row's committed slots. So compaction, row release and rows
of different lengths are plain numpy copies.

int8 (weight-only, symmetric, one scale per output channel) keeps the same graph with each matrix stored
as int8 and a scale; losslessness is then relative to this int8 target (speculative output equals plain output
of the same runtime and precision).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import sys
import weakref
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from eagle3.runtimes.native_weights import int8_rows
from eagle3.runtimes.model import KVCache, Transformer, rope_inv_freq
from eagle3.decoding.tree import DraftTree

PRECISIONS = ("fp32", "int8")


def require_openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ValueError("the OpenVINO runtime needs the openvino package: pip install openvino") from None
    return ov


def check_supported(model: Transformer) -> None:
    """The configurations this graph covers; anything else fails with a one-line reason."""
    cfg = model.config
    if cfg.rope.type == "dynamic":
        raise ValueError("the OpenVINO runtime does not support dynamic (NTK) RoPE scaling; use --runtime torch")
    if model.dtype != torch.float32:
        raise ValueError(f"the OpenVINO runtime builds from an fp32 model, not {model.dtype}; load with --dtype fp32")


def build_graph(model: Transformer, taps: Sequence[int], precision: str = "fp32"):
    """The target's forward as an openvino.Model (see the module docstring for its inputs and outputs)."""
    ov = require_openvino()
    from openvino import opset15 as ops

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    check_supported(model)
    cfg = model.config
    H, KV, hd, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    g, L = H // KV, cfg.num_layers
    f32 = np.float32

    def const(t: Tensor | np.ndarray):
        a = t.detach().cpu().numpy() if isinstance(t, Tensor) else t
        return ops.constant(np.ascontiguousarray(a))

    def scalar(v: float):
        return ops.constant(np.array(v, dtype=f32))

    def ints(*v: int):
        return ops.constant(np.array(v, dtype=np.int64))

    def axis(v: int):
        return ops.constant(np.array(v, dtype=np.int64))

    def matmul(x, weight_in_out: Tensor, bias: Tensor | None):
        # [out, in]: the layout OpenVINO's FC kernels take; int8 as the native runtime quantizes (OpenVINO fuses the
        # dequantizing multiply into its int8 kernel).
        if precision == "int8":
            q, scale = int8_rows(weight_in_out.t())
            w_node = ops.multiply(ops.convert(const(q), "f32"), const(scale[:, None]))
        else:
            w_node = const(weight_in_out.detach().t())
        y = ops.matmul(x, w_node, transpose_a=False, transpose_b=True)
        return y if bias is None else ops.add(y, const(bias))

    def norm(x, weight: Tensor | None, d: int = D):
        # unit_rms_norm (x / sqrt(|x|^2 + d * eps)), or the full RMSNorm with its weight when not folded.
        sq = ops.reduce_sum(ops.multiply(x, x), ints(-1), keep_dims=True)
        y = ops.divide(x, ops.sqrt(ops.add(sq, scalar(d * cfg.rms_norm_eps))))
        return y if weight is None else ops.multiply(y, const(weight.float() * math.sqrt(d)))

    # RoPE on interleaved pairs (2i, 2i + 1) in four ops: x * cos + swap(x) * sin, where swap exchanges each
    # pair and the host folds the pair's sign into sin (x0 cos - x1 sin, x1 cos + x0 sin).
    swap = ints(*[i ^ 1 for i in range(hd)])

    def rope(x, cos, sin):
        return ops.add(ops.multiply(x, cos), ops.multiply(ops.gather(x, swap, axis(3)), sin))

    tokens = ops.parameter([-1, -1], np.int64, name="tokens")  # [B, n]
    cos_in = ops.parameter([-1, -1, hd], f32, name="cos")  # [B, n, hd]: cos of each pair's angle, twice
    sin_in = ops.parameter([-1, -1, hd], f32, name="sin")  # [B, n, hd]: -sin, +sin per pair
    windows = sorted({w for w in (cfg.sliding_windows or (None,) * L) if w is not None})
    layer_window = cfg.sliding_windows or (None,) * L
    masks = {w: ops.parameter([-1, 1, -1, -1], f32, name=f"mask_{w or 'full'}") for w in [None, *windows]}
    # Each layer's cached keys and values [B, KV, slots, hd]: every slot of the cache (a row's slots past its
    # length are masked out), so each is a contiguous block of the runtime's cache, passed in place.
    past = [[ops.parameter([-1, KV, -1, hd], f32, name=f"{kind}_{i}") for kind in "kv"] for i in range(L)]
    logit_rows = ops.parameter([-1], np.int64, name="logit_rows")  # which of the n positions get logits
    split_sizes = ops.parameter([2], np.int64, name="split_sizes")  # [slots, n]: a score row's two parts

    cos = ops.unsqueeze(cos_in, ints(2))
    sin = ops.unsqueeze(sin_in, ints(2))
    x = ops.gather(const(model.embed.weight), tokens, axis(0))
    tapped, new_kv = [], []
    for i, block in enumerate(model.layers):
        if i in taps:
            tapped.append(x)
        h = norm(x, block.attn_norm)
        qkv = ops.reshape(matmul(h, block.qkv_weight, block.qkv_bias), ints(0, 0, H + 2 * KV, hd), special_zero=True)
        qk, v = ops.variadic_split(qkv, axis(2), ints(H + KV, KV)).outputs()
        if block.qk_norm is not None:
            qk = norm(qk, block.qk_norm, hd)
        q, k = ops.variadic_split(rope(qk, cos, sin), axis(2), ints(H, KV)).outputs()
        # The new keys and values [B, KV, n, hd], and out as [1, 2, B, KV, n, hd], the cache's layout.
        k_new = ops.transpose(k, ints(0, 2, 1, 3))
        v_new = ops.transpose(v, ints(0, 2, 1, 3))
        new_kv.append(ops.unsqueeze(ops.concat([ops.unsqueeze(k_new, ints(0)), ops.unsqueeze(v_new, ints(0))], 0), ints(0)))
        # GQA without repeating K/V: the g query heads of a kv head become g * n query rows [B, KV, g * n, hd].
        qg = ops.reshape(ops.multiply(q, scalar(1.0 / math.sqrt(hd))), ints(0, 0, KV, g, hd), special_zero=True)
        qg = ops.reshape(ops.transpose(qg, ints(0, 2, 3, 1, 4)), ints(0, KV, -1, hd), special_zero=True)
        # Attention over the cache and over the new tokens, one softmax across both: the cache is read where
        # it lies, never copied or concatenated.
        scores = ops.concat([ops.matmul(qg, past[i][0], False, True), ops.matmul(qg, k_new, False, True)], 3)
        probs = ops.softmax(ops.add(scores, masks[layer_window[i]]), 3)
        p_past, p_new = ops.variadic_split(probs, axis(3), split_sizes).outputs()
        att = ops.add(ops.matmul(p_past, past[i][1], False, False), ops.matmul(p_new, v_new, False, False))
        att = ops.reshape(att, ints(0, KV, g, -1, hd), special_zero=True)
        att = ops.reshape(ops.transpose(att, ints(0, 3, 1, 2, 4)), ints(0, 0, H * hd), special_zero=True)
        x = ops.add(x, matmul(att, block.o_weight, block.o_bias))
        h = norm(x, block.mlp_norm)
        gate, up = ops.split(matmul(h, block.gate_up_weight, block.gate_up_bias), axis(-1), 2).outputs()
        x = ops.add(x, matmul(ops.multiply(ops.swish(gate), up), block.down_weight, block.down_bias))
    if len(model.layers) in taps:  # the last layer's output, before the final norm
        tapped.append(x)
    head_in = ops.gather(x, logit_rows, axis(1))
    logits = matmul(norm(head_in, model.norm), model.lm_head_weight, None)
    outputs = [ops.result(logits, name="logits"), ops.result(ops.concat(new_kv, 0), name="new_kv")]
    if tapped:
        outputs.append(ops.result(ops.concat(tapped, 2) if len(tapped) > 1 else tapped[0], name="taps"))
    params = [tokens, cos_in, sin_in, *masks.values(), *(p for layer in past for p in layer), logit_rows, split_sizes]
    return ov.Model(outputs, params, "eagle3_target")


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@contextlib.contextmanager
def own_signal_stack() -> Iterator[None]:
    """Restores the calling thread's alternate signal stack after OpenVINO ran. OpenVINO's CPU plugin installs
    one of its own on the thread that compiles or infers, and that memory can be freed with the plugin's
    objects; CPython runs its signal handlers on the alternate stack (SA_ONSTACK), so a later SIGINT or
    SIGTERM then crashed the process (SIGSEGV at delivery)."""
    if _LIBC is None:
        yield
        return
    before = _SignalStack()
    _LIBC.sigaltstack(None, ctypes.byref(before))
    try:
        yield
    finally:
        after = _SignalStack()
        _LIBC.sigaltstack(None, ctypes.byref(after))
        if (after.ss_sp, after.ss_size, after.ss_flags) != (before.ss_sp, before.ss_size, before.ss_flags):
            before.ss_flags &= ~1  # (SS_ONSTACK is a state sigaltstack reports, not a flag it takes)
            _LIBC.sigaltstack(ctypes.byref(before), None)


# model -> {(taps, precision, threads): compiled model}: compiling takes seconds, and engines come and go.
_COMPILED: "weakref.WeakKeyDictionary[Transformer, dict[tuple, object]]" = weakref.WeakKeyDictionary()


def compile_target(model: Transformer, taps: Sequence[int], precision: str = "fp32"):
    """The target's graph compiled for this CPU (once per model, taps, precision and thread count)."""
    ov = require_openvino()
    compiled = _COMPILED.setdefault(model, {})
    key = (tuple(taps), precision, torch.get_num_threads())
    if key not in compiled:
        # fp32 activations on every CPU, never bf16; and no dynamic quantization of the activations that feed
        # int8 weights (on CPUs with VNNI OpenVINO quantizes them per group by default, picking kernels by
        # the number of tokens, so a tree's logits would differ from its paths' decoded one token at a time).
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        with own_signal_stack():
            compiled[key] = ov.Core().compile_model(build_graph(model, taps, precision), "CPU", config)
    return compiled[key]


class OpenVINORuntime:
    """TargetRuntime on the compiled graph. Its cache (a model.KVCache, read by OpenVINO through numpy views)
    holds committed keys and values only; its slots grow by doubling (attention reads every slot, masked past a row's length, so the
    slots stay within twice the longest row so far)."""

    FIRST_SLOTS = 256

    def __init__(self, model: Transformer, tap_layers: Sequence[int] = (), precision: str = "fp32"):
        if not model.device.type == "cpu":
            raise ValueError(f"the OpenVINO runtime runs on the CPU; the target is on {model.device}")
        self.model, self.tap_layers, self.precision = model, tuple(tap_layers), precision
        with own_signal_stack():
            self.request = compile_target(model, self.tap_layers, precision).create_infer_request()
        cfg = model.config
        self._groups = cfg.num_heads // cfg.num_kv_heads
        self._windows = sorted({w for w in (cfg.sliding_windows or ()) if w is not None})
        self._inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings).double().numpy()
        self.rows, self.max_len = 0, 0
        self.cache = self._empty_cache(0, 0)
        self._new_kv: np.ndarray | None = None  # the last verify's keys and values [layers, 2, B, KV, n, hd]

    def open(self, max_rows: int, max_len: int, spare: int = 0) -> None:
        """Room for max_rows sequences of up to max_len committed positions (tree nodes take no slots here, so
        `spare` is not needed); no rows yet."""
        self.max_len = min(max_len, self.model.config.context_length)
        self.cache = self._empty_cache(max_rows, min(self.max_len, self.FIRST_SLOTS))
        self.rows = 0

    def length(self, row: int) -> int:
        return self.cache.lengths[row]

    def prefill(self, prompt_ids: Sequence[int]) -> tuple[int, Tensor, Tensor | None]:
        """A new sequence in the next free row: (its row, the logits after its prompt [V], its taps [P, ...])."""
        if self.rows >= self.cache.rows:
            raise ValueError(f"no free row: the batch holds {self.cache.rows} sequences")
        n = len(prompt_ids)
        self._reserve(n)
        row = self.rows
        tokens = np.asarray([list(prompt_ids)], dtype=np.int64)
        causal = np.tril(np.ones((n, n), dtype=bool))[None]
        logits, taps, new_kv = self._run(tokens, np.arange(n)[None], causal, range(row, row + 1), np.array([n - 1]))
        self.cache.kv[:, :, row, :, :n] = torch.from_numpy(new_kv[:, :, 0])
        self.cache.lengths[row] = n
        self.rows += 1
        return row, torch.from_numpy(logits[0, -1].copy()), None if taps is None else torch.from_numpy(taps[0].copy())

    def verify(self, trees: list[DraftTree]) -> tuple[Tensor, Tensor | None]:
        """One forward over every row's tree: logits [B, n, V] and taps [B, n, ...] (smaller trees padded)."""
        from eagle3.runtimes.runtime import pad_trees

        if len(trees) != self.rows:
            raise ValueError(f"{len(trees)} trees for {self.rows} rows")
        tokens, depths, masks = pad_trees(trees)
        positions = np.asarray(self.cache.lengths[: self.rows])[:, None] + depths.numpy()
        if int(positions.max()) >= self.model.config.context_length:
            raise ValueError(f"position {int(positions.max())} is beyond the model's context of {self.model.config.context_length}")
        n = tokens.shape[1]
        logits, taps, self._new_kv = self._run(tokens.numpy(), positions, masks.numpy(), range(self.rows), np.arange(n))
        return torch.from_numpy(logits.copy()), None if taps is None else torch.from_numpy(taps.copy())

    def commit(self, paths: list[list[int]]) -> None:
        """Each row keeps its accepted path of the tree it last verified: those nodes' keys and values go after
        the row's committed slots."""
        lengths = self.cache.lengths
        self._reserve(max(lengths[row] + len(path) for row, path in enumerate(paths)))
        kv, new = self.cache.kv.numpy(), self._new_kv
        for row, path in enumerate(paths):
            if path:
                start = lengths[row]
                kv[:, :, row, :, start : start + len(path)] = new[:, :, row][:, :, :, path]
                lengths[row] = start + len(path)

    def release(self, row: int) -> None:
        """Frees a row: the last row moves into it, so the live rows stay 0 .. rows-1."""
        self.cache.free_row(row, self.rows - 1)
        self.rows -= 1

    def _empty_cache(self, rows: int, slots: int) -> KVCache:
        cfg = self.model.config
        return KVCache(cfg.num_layers, rows, cfg.num_kv_heads, slots, cfg.head_dim, torch.float32, torch.device("cpu"))

    def _reserve(self, slots: int) -> None:
        """Room for `slots` committed slots in every row: the slots double until they fit."""
        if slots > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {slots} do not fit")
        have = self.cache.max_len
        if slots > have:
            size = have
            while size < slots:
                size = min(2 * size, self.max_len)
            grown = self._empty_cache(self.cache.rows, size)
            grown.kv[:, :, :, :, :have] = self.cache.kv
            grown.lengths = self.cache.lengths
            self.cache = grown

    def _run(self, tokens: np.ndarray, positions: np.ndarray, tree: np.ndarray, rows: range,
             logit_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:  # fmt: skip
        """One forward of tokens [B, n] at positions [B, n] on cache rows `rows`: new token i sees new token j
        where tree [B, n, n] allows, and its row's committed slots; returns logits, taps and the new keys and
        values."""
        B, n = tokens.shape
        slots, kv = self.cache.max_len, self.cache.kv.numpy()
        angles = positions[..., None] * self._inv_freq  # [B, n, hd / 2]
        cos, sin = np.cos(angles), np.sin(angles)
        inputs = {"tokens": tokens, "logit_rows": logit_rows.astype(np.int64), "split_sizes": np.array([slots, n]),
                  "cos": np.repeat(cos, 2, axis=-1).astype(np.float32),
                  "sin": np.stack([-sin, sin], axis=-1).reshape(B, n, -1).astype(np.float32)}  # fmt: skip
        for i in range(kv.shape[0]):  # (rows are consecutive: each layer's block is contiguous)
            inputs[f"k_{i}"] = kv[i, 0, rows.start : rows.stop]
            inputs[f"v_{i}"] = kv[i, 1, rows.start : rows.stop]
        # Keys: the cache's slots (row b's valid below its length), then the n new tokens.
        lengths = np.asarray(self.cache.lengths[rows.start : rows.stop])
        committed = np.arange(slots)[None, :] < lengths[:, None]  # [B, slots]
        allowed = np.concatenate([np.broadcast_to(committed[:, None, :], (B, n, slots)), tree], axis=2)
        for window in [None, *self._windows]:
            seen = allowed
            if window is not None:
                k_pos = np.concatenate([np.broadcast_to(np.arange(slots), (B, slots)), positions], axis=1)
                seen = allowed & (positions[:, :, None] - k_pos[:, None, :] < window)
            bias = np.where(seen, np.float32(0), np.float32(-np.inf))
            inputs[f"mask_{window or 'full'}"] = np.tile(bias, (1, self._groups, 1))[:, None]
        with own_signal_stack():
            self.request.infer(inputs, share_inputs=True)
        out = self.request
        taps = out.get_tensor("taps").data if self.tap_layers else None
        return out.get_tensor("logits").data, taps, out.get_tensor("new_kv").data
