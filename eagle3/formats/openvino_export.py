"""A target and its EAGLE-3 draft as OpenVINO IR for OpenVINO GenAI's EAGLE-3 pipeline,
`LLMPipeline(OUT/target, "CPU", draft_model=draft_model(OUT/draft, "CPU"))`:

    OUT/target  openvino_model.xml/.bin (stateful), config.json, generation_config.json, and the tokenizer as
                openvino_tokenizer.xml / openvino_detokenizer.xml (openvino-tokenizers)
    OUT/draft   openvino_model.xml/.bin (stateful; rt_info eagle3_mode, hidden_layers_list), config.json

Each network is traced here from eagle3's loaded weights (fp32) with `openvino.convert_model`, in the shape
GenAI's EAGLE-3 transformations look for (read from its source, 2026.4; docs/interop.md):
- target: per decoder layer, a module path ending in `layers.<i>` whose MLP residual is Add(x, MatMul(Multiply,
  W)); GenAI adds an output there for each layer in the draft's `hidden_layers_list`, which counts layer
  OUTPUTS, so it holds our taps (layer inputs) minus one (tap 0, the embeddings, cannot be written);
- draft: inputs input_ids, attention_mask, position_ids, hidden_states (3 H wide; GenAI moves the first MatMul
  on it, fc, into the target, so fc must have no bias), outputs logits then d2t (i64 offsets, draft id i is
  target id i + d2t[i]); the decoder layer's module path holds `midlayer`, its MLP residual becomes the draft's
  own hidden output; an `embed_tokens` gather that GenAI overwrites with the target's;
- both: scaled-dot-product attention over a KV cache kept as state (ReadValue with a zero initializer ->
  Gather by beam_idx -> Concat), which GenAI turns into paged attention.
With precision int8 the target's matrices are then stored as int8 with a scale per output row (compress_int8),
and its rt_info turns OpenVINO's dynamic quantization of activations off (it is not lossless for trees); the
draft stays fp32. Both folders are written beside OUT, then each is moved into place whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eagle3.methods.draft import Eagle3Draft, rotate_half
from eagle3.runtimes.model import Transformer, rope_inv_freq
from eagle3.runtimes.native_weights import int8_rows
from eagle3.runtimes.openvino_runtime import PRECISIONS

TOKENIZER_PACKAGE = "openvino-tokenizers"


def check_exportable(model: Transformer, draft: Eagle3Draft) -> None:
    """The configurations the traced graphs and GenAI's patterns cover; anything else fails in one line."""
    cfg = model.config
    unsupported = {"qk_norm": cfg.qk_norm, "mlp_bias": cfg.mlp_bias, "sliding windows": any(cfg.sliding_windows),
                   "dynamic RoPE": cfg.rope.type == "dynamic"}  # fmt: skip
    for what, present in unsupported.items():
        if present:
            raise ValueError(f"--to openvino does not support targets with {what} (GenAI's EAGLE-3 patterns)")
    if draft.config.fc_bias:
        raise ValueError("--to openvino needs a draft without an fc bias: GenAI moves fc into the target without it")
    taps = draft.config.tap_layers or cfg.default_tap_layers
    if 0 in taps:
        raise ValueError("--to openvino cannot express tap 0 (the token embeddings): GenAI taps layer outputs")


def genai_hidden_layers(taps: tuple[int, ...]) -> list[int]:
    """GenAI's hidden_layers_list for our taps: it counts decoder layer outputs, we count layer inputs."""
    return [t - 1 for t in taps]


# ---------------------------------------------------------------------------------------------- graphs


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(position_ids: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos and sin [B, 1, S, hd] for HF's half-split layout, computed from the positions (no table: GenAI takes
    the first large gather for the token embedding)."""
    angles = position_ids[:, :, None].float() * inv_freq[None, None, :]
    both = torch.cat([angles, angles], dim=-1)
    return both.cos()[:, None], both.sin()[:, None]


def _mask(attention_mask: Tensor, new: int) -> Tensor:
    """Additive mask [B, 1, new, T]: causal among the new tokens, after T - new cached ones."""
    total = attention_mask.shape[1]
    query = torch.arange(new)[:, None] + (total - new)
    allowed = (torch.arange(total)[None, :] <= query)[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)


class _Attention(nn.Module):
    """q, k, v [out, in] in HF's layout; returns the output and the keys and values with the cached ones."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, o: Tensor, heads: int, kv_heads: int, biases=(None,) * 4):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Parameter(w.detach().clone(), requires_grad=False) for w in (q, k, v, o))
        self.biases = nn.ParameterList(
            [nn.Parameter(b.detach().clone(), requires_grad=False) if b is not None else None for b in biases])
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, q.shape[0] // heads

    def forward(self, x, cos, sin, mask, past_k, past_v):
        B, S, _ = x.shape
        hd, bq, bk, bv, bo = self.head_dim, *self.biases
        q = F.linear(x, self.q, bq).view(B, S, self.heads, hd).transpose(1, 2)
        k = F.linear(x, self.k, bk).view(B, S, self.kv_heads, hd).transpose(1, 2)
        v = F.linear(x, self.v, bv).view(B, S, self.kv_heads, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(q, _repeat_kv(k, groups), _repeat_kv(v, groups), attn_mask=mask)
        return F.linear(out.transpose(1, 2).reshape(B, S, self.heads * hd), self.o, bo), k, v


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, KV, T, hd] -> [B, KV * groups, T, hd], as HF writes it (GenAI's cache pattern allows this form)."""
    if groups == 1:
        return x
    B, KV, T, hd = x.shape
    return x[:, :, None].expand(B, KV, groups, T, hd).reshape(B, KV * groups, T, hd)


class _MLP(nn.Module):
    def __init__(self, gate: Tensor, up: Tensor, down_in_out: Tensor):
        super().__init__()
        self.gate, self.up = (nn.Parameter(w.detach().clone(), requires_grad=False) for w in (gate, up))
        self.down = nn.Parameter(down_in_out.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(F.silu(F.linear(x, self.gate)) * F.linear(x, self.up), self.down)


def _param(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=False)


def _split_qkv(model: Transformer, layer) -> list[Tensor]:
    """A layer's fused qkv [in, out] (q and k rows interleaved for eagle3's RoPE) as HF's q, k, v [out, in]."""
    cfg = model.config
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = layer.qkv_weight.t().split([H * hd, KV * hd, KV * hd])
    half_split = lambda w, heads: w.reshape(heads, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)  # noqa: E731
    return [half_split(q, H), half_split(k, KV), v]


def _split_qkv_bias(model: Transformer, layer) -> list[Tensor | None]:
    if layer.qkv_bias is None:
        return [None, None, None]
    cfg = model.config
    H, KV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = layer.qkv_bias.split([H * hd, KV * hd, KV * hd])
    half_split = lambda b, heads: b.reshape(heads, 2, -1).transpose(1, 2).reshape(b.shape)  # noqa: E731
    return [half_split(q, H), half_split(k, KV), v]


class _TargetLayer(nn.Module):
    def __init__(self, model: Transformer, layer):
        super().__init__()
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.input_layernorm, self.post_attention_layernorm = _param(layer.attn_norm), _param(layer.mlp_norm)
        q, k, v = _split_qkv(model, layer)
        self.self_attn = _Attention(q, k, v, layer.o_weight.t(), cfg.num_heads, cfg.num_kv_heads,
                                    (*_split_qkv_bias(model, layer), layer.o_bias))  # fmt: skip
        gate, up = layer.gate_up_weight.t().chunk(2)
        self.mlp = _MLP(gate, up, layer.down_weight)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        attn, k, v = self.self_attn(_rms(x, self.input_layernorm, self.eps), cos, sin, mask, past_k, past_v)
        x = x + attn
        # Add(residual, MatMul(Multiply, W)) named "...layers.<i>/...": the node GenAI taps.
        return x + self.mlp(_rms(x, self.post_attention_layernorm, self.eps)), k, v


class TargetGraph(nn.Module):
    """The target as HF lays it out (model.embed_tokens, model.layers.<i>, model.norm, lm_head), traced with the
    KV cache as inputs and outputs; make_stateful turns those into state."""

    def __init__(self, model: Transformer):
        super().__init__()
        if any(layer.attn_norm is None for layer in model.layers):
            raise ValueError("export needs a target loaded without folded norms (eagle3.runtimes.model.load_model)")
        cfg = model.config
        self.eps = cfg.rms_norm_eps
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding.from_pretrained(model.embed.weight.detach().clone())
        self.model.layers = nn.ModuleList(_TargetLayer(model, layer) for layer in model.layers)
        self.model.norm = _param(model.norm)
        self.lm_head = _param(model.lm_head_weight.t())
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings))

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        x = self.model.embed_tokens(input_ids)
        cos, sin = _rope(position_ids, self.inv_freq)
        mask = _mask(attention_mask, input_ids.shape[1])
        present = []
        for layer, (past_k, past_v) in zip(self.model.layers, past_key_values):
            x, k, v = layer(x, cos, sin, mask, past_k, past_v)
            present.append((k, v))
        return F.linear(_rms(x, self.model.norm, self.eps), self.lm_head), tuple(present)


class _DraftLayer(nn.Module):
    def __init__(self, draft: Eagle3Draft):
        super().__init__()
        layer, cfg = draft.midlayer, draft.config
        self.eps = cfg.rms_norm_eps
        self.input_layernorm, self.hidden_norm = _param(layer.input_layernorm.weight), _param(layer.hidden_norm.weight)
        self.post_attention_layernorm = _param(layer.post_attention_layernorm.weight)
        a = layer.self_attn
        self.self_attn = _Attention(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, cfg.num_heads,
                                    cfg.num_kv_heads)  # fmt: skip
        self.mlp = _MLP(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight.t())

    def forward(self, emb, hidden, cos, sin, mask, past_k, past_v):
        x = torch.cat([_rms(emb, self.input_layernorm, self.eps), _rms(hidden, self.hidden_norm, self.eps)], dim=-1)
        attn, k, v = self.self_attn(x, cos, sin, mask, past_k, past_v)
        h = hidden + attn
        return h + self.mlp(_rms(h, self.post_attention_layernorm, self.eps)), k, v


class DraftGraph(nn.Module):
    """The EAGLE-3 draft as optimum-intel exports one for GenAI (model.embed_tokens, model.fc, model.midlayer,
    model.norm, model.lm_head, model.d2t)."""

    def __init__(self, draft: Eagle3Draft, embeddings: Tensor):
        super().__init__()
        cfg = draft.config
        self.eps = cfg.rms_norm_eps
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding.from_pretrained(embeddings.detach().clone())
        self.model.fc = _param(draft.fc.weight)
        self.model.midlayer = _DraftLayer(draft)
        self.model.norm = _param(draft.norm.weight)
        self.model.lm_head = _param(draft.lm_head.weight)
        self.model.register_buffer("d2t", draft.d2t.detach().clone())
        self.register_buffer("inv_freq", rope_inv_freq(cfg.rope, cfg.head_dim, cfg.max_position_embeddings))

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, hidden_states):
        emb = self.model.embed_tokens(input_ids)
        # Traced with target taps (3 H wide), so fc is the first MatMul on hidden_states; GenAI moves it into
        # the target and feeds this input H wide from then on.
        hidden = torch.matmul(hidden_states, self.model.fc.t())
        cos, sin = _rope(position_ids, self.inv_freq)
        mask = _mask(attention_mask, input_ids.shape[1])
        (past_k, past_v), = past_key_values
        h, k, v = self.model.midlayer(emb, hidden, cos, sin, mask, past_k, past_v)
        return F.linear(_rms(h, self.model.norm, self.eps), self.model.lm_head), ((k, v),), self.model.d2t


# ---------------------------------------------------------------------------------------------- IR


def _kv_names(layers: int) -> tuple[list[str], list[str]]:
    """optimum-intel's names for the cache inputs and outputs."""
    return ([f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")],
            [f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")])  # fmt: skip


def make_stateful(ov_model, layers: int) -> None:
    """The KV cache inputs/outputs become state: a beam_idx input reorders it (Gather on the batch axis), each
    ReadValue starts from zeros [batch, KV, 0, hd] (GenAI's cache pattern needs that initializer)."""
    import openvino as ov
    from openvino import opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    inputs, outputs = _kv_names(layers)
    batch = ov_model.input("input_ids").get_partial_shape()[0]
    beam_idx = ops.parameter(name="beam_idx", dtype=ov.Type.i32, shape=ov.PartialShape([batch]))
    beam_idx.output(0).get_tensor().add_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in inputs:
        port = ov_model.input(name)
        consumers = port.get_target_inputs()
        reordered = ops.gather(port, beam_idx, ops.constant(0))
        for consumer in consumers:
            consumer.replace_source_output(reordered.output(0))
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, dict(zip(inputs, outputs)))
    ids = ov_model.input("input_ids")
    rows = ops.gather(ops.shape_of(ids, output_type="i64"), ops.constant([0]), ops.constant(0))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            shape = op.get_output_partial_shape(0)
            kv_heads, head_dim = shape[1].get_length(), shape[3].get_length()
            dims = [rows] + [ops.constant(np.array([d], dtype=np.int64)) for d in (kv_heads, 0, head_dim)]
            zero = ops.constant(0.0, dtype=op.get_output_element_type(0))
            op.set_arguments([ops.broadcast(zero, ops.concat(dims, axis=0))])
    ov_model.validate_nodes_and_infer_types()


def _convert(module: nn.Module, example: dict, in_names: list[str], out_names: list[str], layers: int):
    import openvino as ov

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.jit")  # (OpenVINO traces)
        ov_model = ov.convert_model(module, example_input=example)
    for port, name in zip(ov_model.inputs, in_names):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, out_names):
        port.get_tensor().set_names({name})
    make_stateful(ov_model, layers)
    return ov_model


def _example(vocab: int, kv_heads: int, head_dim: int, layers: int) -> dict:
    """Inputs to trace with: 5 new tokens after 3 cached ones."""
    new, cached = 5, 3
    past = tuple((torch.zeros(1, kv_heads, cached, head_dim), torch.zeros(1, kv_heads, cached, head_dim))
                 for _ in range(layers))  # fmt: skip
    return {"input_ids": torch.randint(0, vocab, (1, new)), "attention_mask": torch.ones(1, cached + new, dtype=torch.long),
            "position_ids": torch.arange(cached, cached + new)[None], "past_key_values": past}  # fmt: skip


def target_ir(model: Transformer):
    """The target's stateful OpenVINO model (fp32)."""
    cfg = model.config
    kv_in, kv_out = _kv_names(cfg.num_layers)
    example = _example(cfg.vocab_size, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
    return _convert(TargetGraph(model).eval(), example, ["input_ids", "attention_mask", "position_ids", *kv_in],
                    ["logits", *kv_out], cfg.num_layers)  # fmt: skip


def draft_ir(draft: Eagle3Draft, embeddings: Tensor, taps: tuple[int, ...]):
    """The draft's stateful OpenVINO model (fp32), with the rt_info GenAI reads: eagle3_mode and the target
    layers (outputs) to tap."""
    import openvino as ov

    cfg = draft.config
    kv_in, kv_out = _kv_names(1)
    example = _example(cfg.vocab_size, cfg.num_kv_heads, cfg.head_dim, 1)
    example["hidden_states"] = torch.randn(1, 5, 3 * cfg.target_hidden_size)
    ov_model = _convert(DraftGraph(draft, embeddings).eval(), example,
                        ["input_ids", "attention_mask", "position_ids", *kv_in, "hidden_states"],
                        ["logits", *kv_out, "d2t"], 1)  # fmt: skip
    # GenAI feeds hidden_states 3 H wide for the first step and H wide after it has moved fc.
    ov_model.input("hidden_states").get_node().set_partial_shape(ov.PartialShape([-1, -1, -1]))
    ov_model.validate_nodes_and_infer_types()
    ov_model.set_rt_info("True", ["eagle3_mode"])
    ov_model.set_rt_info(genai_hidden_layers(taps), ["hidden_layers_list"])
    return ov_model


def compress_int8(ov_model) -> None:
    """Stores every fp32 matrix a MatMul multiplies by as int8 with a float scale per output row, in the pattern
    OpenVINO's CPU plugin runs as compressed weights (int8 constant, convert, multiply; the same quantization as
    `--runtime openvino-int8`'s). The embedding table stays fp32 where only the token lookup reads it."""
    import openvino as ov
    from openvino import opset15 as ops

    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        weight = op.input(1).get_source_output().get_node()
        if weight.get_type_name() != "Constant" or weight.get_element_type() != ov.Type.f32:
            continue
        rows = torch.from_numpy(np.array(weight.get_data()))
        if rows.dim() != 2:
            continue
        transposed = op.get_attributes()["transpose_b"]
        q, scale = int8_rows(rows if transposed else rows.t())
        scale = scale[:, None] if transposed else scale[None, :]
        q = q if transposed else q.t()
        dequantized = ops.multiply(ops.convert(ops.constant(q.contiguous().numpy()), "f32"),
                                   ops.constant(scale.contiguous().numpy()))
        op.input(1).replace_source_output(dequantized.output(0))


def require_tokenizers():
    try:
        import openvino_tokenizers
    except ImportError:
        raise ValueError(f"--to openvino writes the tokenizer with {TOKENIZER_PACKAGE}, which is not installed: "
                         "pip install openvino-genai (it brings openvino-tokenizers)") from None  # fmt: skip
    return openvino_tokenizers


def _save_tokenizer(target_dir: Path, out: Path) -> None:
    import openvino as ov
    from transformers import AutoTokenizer

    convert_tokenizer = require_tokenizers().convert_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    tokenizer.padding_side = "left"  # (what GenAI's batched prompts expect)
    encoder, decoder = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(encoder, str(out / "openvino_tokenizer.xml"))
    ov.save_model(decoder, str(out / "openvino_detokenizer.xml"))


def write_genai_folders(model: Transformer, draft: Eagle3Draft, out: Path, target_dir: Path | None = None,
                        precision: str = "fp32") -> None:  # fmt: skip
    """Writes out/target and out/draft (out must be new and empty), the target's matrices in `precision` (fp32 or
    int8; the draft stays fp32). With target_dir, its config files and tokenizer go beside the target; without it
    (a model built in memory), a config.json from the model's."""
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r} for an OpenVINO target; choose from {', '.join(PRECISIONS)}")
    check_exportable(model, draft)
    cfg = model.config
    taps = draft.config.tap_layers or cfg.default_tap_layers
    (out / "target").mkdir(parents=True)
    (out / "draft").mkdir()
    target = target_ir(model)
    if precision == "int8":
        compress_int8(target)
        # Read by OpenVINO when it compiles the model: on CPUs with VNNI it would otherwise quantize the activations
        # that feed int8 weights, with kernels chosen by a forward's token count, and a verified tree's logits
        # would not be its paths' (GenAI's EAGLE-3 output then differs from its plain output).
        target.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    ov.save_model(target, str(out / "target" / "openvino_model.xml"), compress_to_fp16=False)
    ov.save_model(draft_ir(draft, model.embed.weight, taps), str(out / "draft" / "openvino_model.xml"),
                  compress_to_fp16=False)  # fmt: skip
    eos = list(cfg.eos_token_ids)
    config = {"num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "eos_token_id": eos[0] if len(eos) == 1 else eos, "bos_token_id": cfg.bos_token_id}  # fmt: skip
    if target_dir is not None:
        for name in ("config.json", "generation_config.json"):
            if (target_dir / name).is_file():
                shutil.copyfile(target_dir / name, out / "target" / name)
        _save_tokenizer(target_dir, out / "target")
    if not (out / "target" / "config.json").is_file():
        (out / "target" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # GenAI's draft needs its stop ids from a config of its own.
    (out / "draft" / "config.json").write_text(json.dumps({**config, "draft_vocab_size": draft.config.draft_vocab_size,
                                                           "eagle3_hidden_layers": genai_hidden_layers(taps)}, indent=2) + "\n")  # fmt: skip


def export_openvino(src: str | Path, out: str | Path, target: str, overwrite: bool = False, precision: str = "fp32"
                    ) -> Path:  # fmt: skip
    """Writes the draft at src and its target (preset, folder or hub id) as OUT/draft and OUT/target for
    OpenVINO GenAI, the target's matrices in precision (fp32, or int8 with a scale per output row). Both are
    written beside OUT first, then each is moved into place whole; an existing folder that holds files needs
    overwrite (and then only its target/ and draft/ are replaced)."""
    from eagle3.formats.checkpoint import load_draft
    from eagle3.fetch import resolve_model
    from eagle3.runtimes.model import load_model
    from eagle3.runtimes.openvino_runtime import own_signal_stack, require_openvino

    require_openvino()
    require_tokenizers()
    out = Path(out).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace its target/ and draft/, or choose another "
                              "folder")  # fmt: skip
    target_dir = resolve_model(target)
    model = load_model(target_dir, device="cpu")
    draft = load_draft(src, model.config, device="cpu", dtype=torch.float32)  # (checks that it fits the target)
    out.parent.mkdir(parents=True, exist_ok=True)
    # (own_signal_stack: the tokenizer's conversion runs OpenVINO, which may leave this thread a dying signal stack)
    with tempfile.TemporaryDirectory(prefix=".eagle3-openvino-", dir=out.parent) as tmp, own_signal_stack():
        staged = Path(tmp) / "out"
        write_genai_folders(model, draft, staged, target_dir, precision)
        out.mkdir(exist_ok=True)
        for part in ("target", "draft"):
            old = out / part
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            (staged / part).replace(old)
    return out
