"""The Llama-family decoder: Llama 2/3 (incl. 3.1 rope scaling), Mistral, Qwen2, SmolLM2.

Plain PyTorch: knows nothing of requests or processes. Tensor parallelism enters only
through the ParallelContext handed to the layers and their weight loaders; quantization only
through the optional LinearMethod handed to every decoder linear (embeddings, norms and the
LM head stay dense). Weights live on
the device the model was built on; activations are flattened over the step's tokens
([num_tokens, hidden]) across all requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from turbollm.distributed.parallel import ParallelContext
from turbollm.layers.activation import SiluAndMul
from turbollm.layers.attention import Attention, AttentionMetadata
from turbollm.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from turbollm.layers.linear import ColumnParallelLinear, LinearMethod, RowParallelLinear
from turbollm.layers.norm import RMSNorm
from turbollm.layers.rotary import RotaryEmbedding
from turbollm.models.arch import ModelArch

# FP8 KV-cache scale tensors (one scalar per layer; vLLM / llm-compressor names, ours first):
# checkpoint name suffix under model.layers.N.self_attn -> which scale.
_KV_SCALE_NAMES = {
    "k_scale": "k", "v_scale": "v", "attn.k_scale": "k", "attn.v_scale": "v",
    "k_proj.output_scale": "k", "v_proj.output_scale": "v",
}
_KV_ROTATION = "k_rotation"
"""Ours: 1.0 = the scales are for Hadamard-rotated q / k (layers/attention.py), 0.0 = not.
Scales without it (vLLM's) are for unrotated k, so the rotation is turned off."""

# HF checkpoint name -> (our merged parameter, shard index within it).
_MERGED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, ctx: ParallelContext, qm: LinearMethod | None) -> None:
        super().__init__()
        d = arch.head_dim
        self.num_heads = ctx.shard(arch.num_attention_heads, "num_attention_heads")
        self.num_kv_heads = ctx.shard(arch.num_key_value_heads, "num_key_value_heads")
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d  # this rank's q / k / v widths
        kv_out = arch.num_key_value_heads * d
        self.qkv_proj = ColumnParallelLinear(
            arch.hidden_size, [arch.num_attention_heads * d, kv_out, kv_out], arch.qkv_bias, ctx, qm
        )
        self.o_proj = RowParallelLinear(arch.num_attention_heads * d, arch.hidden_size, arch.o_bias, ctx, qm)
        self.attn = Attention(self.num_heads, self.num_kv_heads, d, arch.sliding_window)

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, residual: torch.Tensor | None,
        norm: RMSNorm, kv_cache: torch.Tensor, meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over norm(x + residual) -> (output [T, hidden], x + residual)."""
        qkv, residual = self.qkv_proj.forward_normed(x, residual, norm)  # [T, (H + 2 KV) * D]
        return self.o_proj(self.attn.forward_qkv(qkv, rope, kv_cache, meta)), residual


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, ctx: ParallelContext, qm: LinearMethod | None) -> None:
        super().__init__()
        i = arch.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, [i, i], arch.mlp_bias, ctx, qm)
        self.down_proj = RowParallelLinear(i, arch.hidden_size, arch.mlp_bias, ctx, qm)
        self.act = SiluAndMul()

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MLP of norm(x + residual) -> (output [T, hidden], x + residual)."""
        gate_up, residual = self.gate_up_proj.forward_normed(x, residual, norm)  # [T, 2 * inter / tp]
        return self.down_proj.forward_activated(gate_up, self.act), residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, ctx: ParallelContext, qm: LinearMethod | None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, ctx, qm)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, ctx, qm)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each norm is handed to the projection after it, which fuses it at batch 1.
        h, residual = self.self_attn(rope, x, residual, self.input_layernorm, kv_cache, meta)
        return self.mlp(h, residual, self.post_attention_layernorm)


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, ctx: ParallelContext, qm: LinearMethod | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, ctx)
        self.rotary = RotaryEmbedding(
            arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, ctx, qm) for _ in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, KV, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(rope, x, residual, cache, meta)
        return self.norm(x, residual)[0]  # [T, hidden]


class LlamaForCausalLM(nn.Module):
    """Causal LM: `forward` gives hidden states, `compute_logits` the chosen rows' logits.

    quant_method, when given, makes every decoder linear quantized (see layers/linear.py).
    """

    def __init__(self, arch: ModelArch, ctx: ParallelContext, quant_method: LinearMethod | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, ctx, quant_method)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, ctx)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)  # [n, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named checkpoint tensors into place; every parameter must be covered.

        FP8 KV-cache scales (`model.layers.N.self_attn.k_scale` / `v_scale`, also vLLM's
        `.attn.k_scale` and `k_proj.output_scale` forms) set the layers' scales; they apply
        only when the engine runs an FP8 cache."""
        params = dict(self.named_parameters())
        loaded: dict[str, set[int | None]] = {}
        kv: dict[int, dict[str, float]] = {}  # layer -> {"k": .., "v": .., "rot": ..}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self._collect_kv_scale(name, tensor, kv):
                continue
            if self.arch.tie_word_embeddings and name == "lm_head.weight":
                continue  # same storage as the embedding; some checkpoints still ship it
            target, shard = name, None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in _MERGED:
                merged, shard = _MERGED[parts[-2]]
                target = ".".join([*parts[:-2], merged, parts[-1]])
            param = params.get(target)
            if param is None:
                raise KeyError(f"checkpoint tensor {name!r} matches no parameter of the model")
            param.weight_loader(param, tensor.to(param.dtype), shard)  # type: ignore[attr-defined]
            loaded.setdefault(target, set()).add(shard)
        missing = [
            n for n, p in params.items()
            if loaded.get(n, set()) != set(getattr(p, "shard_ids", (None,)))
        ]
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
        self._install_kv_scales(kv)

    def _collect_kv_scale(self, name: str, tensor: torch.Tensor, kv: dict[int, dict[str, float]]) -> bool:
        """Record an FP8 KV-cache scale (or our rotation flag) tensor; False for other names."""
        parts = name.split(".")
        if len(parts) < 5 or parts[:2] != ["model", "layers"] or parts[3] != "self_attn":
            return False
        suffix = ".".join(parts[4:])
        key = _KV_SCALE_NAMES.get(suffix) or ("rot" if suffix == _KV_ROTATION else None)
        if key is None:
            return False
        if tensor.numel() != 1:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}: only one scale per layer is supported")
        layer = int(parts[2])
        if not 0 <= layer < len(self.model.layers):
            raise ValueError(f"{name}: the model has {len(self.model.layers)} layers")
        kv.setdefault(layer, {})[key] = float(tensor.float().item())
        return True

    def _install_kv_scales(self, kv: dict[int, dict[str, float]]) -> None:
        """Set each layer's FP8 KV-cache scales (a missing k or v scale is 1.0, as in vLLM)."""
        if not kv:
            return
        layers = self.model.layers
        scaled = sorted(i for i, d in kv.items() if "k" in d or "v" in d)
        if len(scaled) != len(layers):
            raise ValueError(f"the checkpoint has KV-cache scales for {len(scaled)} of {len(layers)} layers")
        for i, layer in enumerate(layers):
            attn = layer.self_attn.attn
            d = kv[i]
            try:
                attn.set_kv_scales(d.get("k", 1.0), d.get("v", 1.0))
                attn.set_rotation(bool(d.get("rot", 0.0)))
            except ValueError as e:
                raise ValueError(f"model.layers.{i}.self_attn: {e}") from None

    def hf_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This model's weights under HF names (the inverse of load_weights; one rank only).

        Lets a transformers twin run on exactly these weights, e.g. dummy ones, as a baseline.
        Quantized linears yield their stored tensors (qweight, scales, ...) under the same
        prefixes; a tensor every merged part shares (`replicated`) is yielded for each part.
        FP8 KV-cache scales, when set, come as scalar `model.layers.N.self_attn.k_scale` /
        `v_scale` (vLLM's names) plus our `k_rotation` flag.
        """
        if self.model.embed_tokens.ctx.tp_size != 1:
            raise ValueError("hf_state_dict needs the whole model: tensor-parallel size 1")
        if self.lm_head.quantized is not None:
            raise ValueError("a model with a quantized LM head (quantize_lm_head) has no HF layout to give")
        split = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
        attns = [layer.self_attn.attn for layer in self.model.layers]
        if any((a.k_scale, a.v_scale) != (1.0, 1.0) for a in attns):  # FP8 KV-cache scales were set
            for i, a in enumerate(attns):
                for leaf, value in (("k_scale", a.k_scale), ("v_scale", a.v_scale),
                                    (_KV_ROTATION, float(a.rotate_qk))):
                    yield f"model.layers.{i}.self_attn.{leaf}", torch.tensor(value, dtype=torch.float32)
        modules = dict(self.named_modules())
        for name, param in self.named_parameters():
            owner, _, leaf = name.rpartition(".")
            parent, _, attr = owner.rpartition(".")
            if attr in split:
                sizes = modules[owner].local_sizes  # type: ignore[union-attr]
                parts = ([param.detach()] * len(sizes) if getattr(param, "replicated", False)
                         else param.detach().split(sizes, dim=0))
                for part, t in zip(split[attr], parts, strict=True):
                    yield f"{parent}.{part}.{leaf}", t
            else:
                yield name, param.detach()

    @torch.no_grad()
    def init_dummy_weights(self, seed: int) -> None:
        """Random weights with the checkpoint's shapes (benchmarks): N(0, 0.02), norms 1."""
        gen = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
