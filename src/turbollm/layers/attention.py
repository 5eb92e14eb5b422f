"""Paged attention in plain torch (fast Triton kernels replace the inner calls later).

The KV cache of one layer is one tensor [2, num_blocks, block_size, num_kv_heads, head_dim]
on the model's device, allocated by the worker. Token t of a request lives in block
block_table[t // block_size] at slot t % block_size; `slot_mapping` gives the flat slot
(block * block_size + offset) of every token computed this step.

On a GPU both phases run the Triton kernels of kernels/paged_attention.py; on the CPU (and
as their executable specification) the torch code below runs.

FP8 cache (float8_e4m3fn): each layer stores e4m3(k / k_scale) and e4m3(v / v_scale) with
per-layer scales (`Attention.k_scale` / `v_scale`: from the checkpoint, calibrated offline
by compress/kv_scales.py, or 1.0). Reading never dequantizes the cache: k_scale is folded
into the softmax scale and v_scale into the output, in the kernels and in the torch code.
The scales are host floats set once after loading (no device tensor, no sync per step).
With an FP8 cache, q and k are also multiplied by a Hadamard matrix after rotary
(`rotate_qk`, on by default where head_dim is a power of two): scores are unchanged and the
e4m3 rounding of k costs about half as much (kernels/rope_cache.py says why).

Batch layout contract (built by the worker): requests with one query token (decodes) come
first, then requests with longer chunks (prompt chunks). Every request attends to all of
its cached tokens plus its own new tokens, causally.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from turbollm.kernels.rope_cache import rotate_heads, store_kv
from turbollm.layers.rotary import apply_rope

try:  # the Triton kernels need triton, which CPU-only torch builds lack
    from turbollm.kernels import paged_attention as paged_kernels
    from turbollm.kernels import prefill_attention as prefill_kernels
    from turbollm.kernels import rope_cache as rope_kernels
except ImportError:  # pragma: no cover
    paged_kernels = None
    prefill_kernels = None
    rope_kernels = None

DENSE_PREFILL_MIN_TOKENS = 2048
"""On a GPU, a step whose prompt chunks are all whole prompts (nothing cached before them)
with one of at least this many tokens runs its prefill attention as torch's SDPA (flash)
per prompt, on the k and v still in the projection output: on an H100 that is ~1.6x our
paged kernel at 8k tokens (docs/performance.md). Shorter or chunked prompts take the
paged kernel, which batches every request into one launch."""


@dataclass
class AttentionMetadata:
    """Where this step's tokens sit in the paged cache. Tensors live on the model's device."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 flat cache slot of each new token
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [num_reqs] int64 tokens in the cache after this step
    query_start_loc: torch.Tensor  # [num_reqs + 1] int64 offset of each request's first token
    query_lens_cpu: list[int]
    """New tokens of each request this step (host copy: sizes the python-side loops)."""
    seq_lens_cpu: list[int]
    num_decodes: int
    """The first num_decodes requests have exactly one query token."""

    @property
    def num_reqs(self) -> int:
        return len(self.query_lens_cpu)

    @functools.cached_property
    def longest_whole_prompt(self) -> int:
        """Tokens of the longest prompt chunk when every chunk is a whole prompt (nothing
        cached before it), else 0: once per step, not once per layer."""
        nd = self.num_decodes
        qlens, slens = self.query_lens_cpu[nd:], self.seq_lens_cpu[nd:]
        return max(qlens) if qlens and qlens == slens else 0


class Attention(nn.Module):
    """Writes this step's k/v into the paged cache, then attends over each request's cache."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.window = sliding_window
        """A query at position p sees keys in (p - window, p] (Mistral); None: all earlier keys."""
        self.k_scale = 1.0
        """FP8 cache only: the cache holds e4m3(k / k_scale) (see the module docstring)."""
        self.v_scale = 1.0
        """FP8 cache only: the cache holds e4m3(v / v_scale)."""
        self.rotate_qk = head_dim & (head_dim - 1) == 0
        """FP8 cache only: q and k are multiplied by the Hadamard matrix after rotary (k_scale
        then applies to the rotated k). Off for scales calibrated without it (vLLM's)."""

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """Set the FP8-cache scales (finite, > 0); ValueError naming a bad one."""
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"{name} must be finite and > 0, got {s}")
        self.k_scale, self.v_scale = float(k_scale), float(v_scale)

    def set_rotation(self, rotate: bool) -> None:
        """Turn the FP8 cache's Hadamard rotation of q and k on or off (power-of-two head_dim)."""
        if rotate and self.head_dim & (self.head_dim - 1):
            raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, got {self.head_dim}")
        self.rotate_qk = rotate

    def cache_scales(self, kv_cache: torch.Tensor) -> tuple[float, float]:
        """(k_scale, v_scale) for this cache: the layer's for an FP8 cache, else (1.0, 1.0)."""
        if kv_cache.dtype == torch.float8_e4m3fn:
            return self.k_scale, self.v_scale
        return 1.0, 1.0

    def forward_qkv(
        self,
        qkv: torch.Tensor,  # [T, (H + 2 KV) * D] the q | k | v projection, before rotary
        rope: tuple[torch.Tensor, torch.Tensor],  # (cos, sin) [T, 1, D / 2] each
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Rotary on q and k, the cache write, then attention -> [T, H * D].

        On a GPU one fused kernel rotates q in place inside `qkv` and stores rotated k and v in
        the cache (kernels/rope_cache.py); elsewhere the torch ops do the same steps.
        """
        num_tokens = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        cos, sin = rope
        rotate = self.rotate_qk and kv_cache.dtype == torch.float8_e4m3fn
        if qkv.is_cuda and rope_kernels is not None:
            rope_kernels.rope_and_cache(
                qkv, cos.view(num_tokens, -1), sin.view(num_tokens, -1), kv_cache, meta.slot_mapping,
                self.num_heads, self.num_kv_heads, self.head_dim, *self.cache_scales(kv_cache), rotate,
            )
            heads = qkv.view(num_tokens, -1, self.head_dim)  # [T, H + 2 KV, D]: q and k now rotated
            q = heads[:, : self.num_heads]  # [T, H, D] strided
            kv = heads[:, self.num_heads :].split(self.num_kv_heads, dim=1)  # k, v [T, KV, D] strided
            return self._forward_triton(q, kv_cache, meta, kv).view(num_tokens, -1)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = apply_rope(q, cos, sin, self.head_dim), apply_rope(k, cos, sin, self.head_dim)
        if rotate:  # [T, H * D] and [T, KV * D], each head times the Hadamard matrix
            q = rotate_heads(q, self.head_dim).to(q.dtype).view(num_tokens, q_size)
            k = rotate_heads(k, self.head_dim).to(k.dtype).view(num_tokens, kv_size)
        return self.forward(q, k, v, kv_cache, meta)

    def forward(
        self,
        q: torch.Tensor,  # [T, H * D]
        k: torch.Tensor,  # [T, KV * D]
        v: torch.Tensor,  # [T, KV * D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KV, D]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        write_kv_cache(kv_cache, k, v, meta.slot_mapping, *self.cache_scales(kv_cache))
        if q.is_cuda and paged_kernels is not None:
            new_kv = (k.view(num_tokens, self.num_kv_heads, -1), v.view(num_tokens, self.num_kv_heads, -1))
            return self._forward_triton(q, kv_cache, meta, new_kv).view(num_tokens, -1)
        out = torch.empty_like(q)  # [T, H, D]
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], kv_cache, meta)
        start = nd
        for i in range(nd, meta.num_reqs):
            qlen = meta.query_lens_cpu[i]
            out[start : start + qlen] = self._prefill(q[start : start + qlen], kv_cache, meta, i)
            start += qlen
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _forward_triton(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """GPU: the Triton paged kernels (kernels/paged_attention.py); q [T, H, D] (rows may be
        strided) -> [T, H, D] contiguous. A step of only decodes or only chunks is one call.
        new_kv: this step's rotated k and v [T, KV, D], for the dense prefill path."""
        assert paged_kernels is not None
        nd = meta.num_decodes
        k_scale, v_scale = self.cache_scales(kv_cache)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]: each route writes its rows
        if nd:
            paged_kernels.paged_decode_attention(
                q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], self.scale,
                max_seq_len=max(meta.seq_lens_cpu[:nd]), sliding_window=self.window,
                k_scale=k_scale, v_scale=v_scale, out=out[:nd],
            )
        if nd < meta.num_reqs and new_kv is not None and self._dense_prefill_pays(q, kv_cache, meta):
            self._dense_prefill(q[nd:], new_kv[0][nd:], new_kv[1][nd:], meta, out=out[nd:])
        elif nd < meta.num_reqs:
            # Prompt chunks follow the decodes, whose tokens are the first nd rows of q.
            prefill_kernels.paged_prefill_attention(
                q[nd:], kv_cache, meta.block_tables[nd:], meta.query_start_loc[nd:] - nd,
                meta.seq_lens[nd:], self.scale, max_query_len=max(meta.query_lens_cpu[nd:]),
                sliding_window=self.window, k_scale=k_scale, v_scale=v_scale, out=out[nd:],
            )
        return out  # [T, H, D]

    def _dense_prefill_pays(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whole prompts only, one of them long, a cache in q's dtype (the paged kernels read
        an FP8 cache: both paths then see the same rounded k and v), no window cut."""
        longest = meta.longest_whole_prompt
        return (kv_cache.dtype == q.dtype and longest >= DENSE_PREFILL_MIN_TOKENS
                and (self.window is None or longest <= self.window))

    def _dense_prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal SDPA over each whole prompt: q [T, H, D], k/v [T, KV, D] -> [T, H, D] (into
        `out` when given, e.g. rows of a larger tensor)."""
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
        start = 0
        for qlen in meta.query_lens_cpu[meta.num_decodes :]:
            qh, kh, vh = (t[start : start + qlen].transpose(0, 1)[None] for t in (q, k, v))  # [1, *, L, D]
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale, enable_gqa=True)
            out[start : start + qlen] = o[0].transpose(0, 1)
            start += qlen
        return out

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One query per request, batched: q [nd, H, D] -> [nd, H, D]."""
        nd = q.shape[0]
        k_scale, v_scale = self.cache_scales(kv_cache)
        max_len = max(meta.seq_lens_cpu[:nd])
        k, v = gather_kv(kv_cache, meta.block_tables[:nd], max_len, q.dtype)  # [nd, L, KV, D] each
        pos = torch.arange(max_len, device=q.device)
        seq_lens = meta.seq_lens[:nd, None]  # [nd, 1]
        visible = pos[None, :] < seq_lens  # [nd, L]
        if self.window is not None:
            visible &= pos[None, :] > seq_lens - 1 - self.window
        # SDPA reads k/v through strides (no copy) and handles GQA without repeating heads.
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [nd, H, 1, D]
            k.transpose(1, 2),  # [nd, KV, L, D]
            v.transpose(1, 2),
            attn_mask=visible[:, None, None, :],  # [nd, 1, 1, L]
            enable_gqa=True, scale=self.scale * k_scale,
        )  # [nd, H, 1, D]
        return out[:, :, 0] if v_scale == 1.0 else out[:, :, 0] * v_scale

    def _prefill(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, i: int
    ) -> torch.Tensor:
        """A chunk of one request: q [qlen, H, D] -> [qlen, H, D], causal over its cache."""
        qlen, seq_len = q.shape[0], meta.seq_lens_cpu[i]
        k_scale, v_scale = self.cache_scales(kv_cache)
        scale = self.scale * k_scale  # k = cache * k_scale: folded into the softmax scale
        k, v = gather_kv(kv_cache, meta.block_tables[i : i + 1], seq_len, q.dtype)  # [1, S, KV, D]
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, qlen, D]
        kh, vh = k.transpose(1, 2), v.transpose(1, 2)  # [1, KV, S, D]
        if qlen == seq_len and (self.window is None or seq_len <= self.window):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True, scale=scale)
        else:
            # Query j sits at position seq_len - qlen + j and sees keys up to it.
            qpos = torch.arange(seq_len - qlen, seq_len, device=q.device)[:, None]  # [qlen, 1]
            kpos = torch.arange(seq_len, device=q.device)[None, :]  # [1, S]
            mask = kpos <= qpos  # [qlen, S]
            if self.window is not None:
                mask &= kpos > qpos - self.window
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=True, scale=scale)
        out = out[0].transpose(0, 1)  # [qlen, H, D]
        return out if v_scale == 1.0 else out * v_scale  # v = cache * v_scale


def write_kv_cache(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    """Store k, v ([T, KV * D]) at their flat slots in the cache (any cache dtype), in place;
    an FP8 cache gets k / k_scale and v / v_scale."""
    store_kv(kv_cache, k, v, slot_mapping, k_scale, v_scale)


def check_kv_cache_device(kv_dtype: torch.dtype, device: torch.device) -> None:
    """ValueError when `device` cannot hold an FP8 cache: the kernels' e4m3 conversions need
    compute capability >= 8.9 (Ada, Hopper). The CPU runs the torch path and always can."""
    if kv_dtype != torch.float8_e4m3fn or device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ValueError(
            f"kv_cache_dtype 'fp8' needs a GPU with FP8 support (compute capability >= 8.9, e.g. Ada or "
            f"Hopper); {torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}: use kv_cache_dtype 'auto'"
        )


def attention_layers(model: nn.Module) -> list[Attention]:
    """The model's Attention modules in layer order (one per KV cache)."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def gather_kv(
    kv_cache: torch.Tensor, block_tables: torch.Tensor, length: int, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [B, length, KV, D] for each row of block_tables [B, max_blocks], in `dtype`
    (default: the cache's)."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    nblocks = -(-length // block_size)
    bt = block_tables[:, :nblocks]  # [B, nblocks]
    b = bt.shape[0]
    # One index_select over the flattened table fetches k and v together (faster than
    # advanced indexing, which is generic over index shapes).
    kv = kv_cache.index_select(1, bt.reshape(-1))  # [2, B * nblocks, block_size, KV, D]
    kv = kv.view(2, b, nblocks * block_size, kv_heads, head_dim)[:, :, :length]
    if dtype is not None and dtype != kv.dtype:
        kv = kv.to(dtype)
    return kv[0], kv[1]
