"""Causal self-attention of phi-2: fused qkv, partial rotary (NeoX half-split on the first rotary_dim dims of each
head), SDPA over a static KV cache, and the guard against fp16 overflow of q.k^T (see Attention.forward)."""

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import PhixtralConfig
from .runtime import RuntimeSettings


class KVCache(nn.Module):
    """Preallocated keys and values of one layer: [B, H_kv, L, hd] each, written at the slots in input_pos."""

    def __init__(self, batch_size: int, n_head_kv: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch_size, n_head_kv, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_row: int = 0):
        # input_pos [S] (the same slots in every row) or [B, S] (each row its own); k, v [B, H_kv, S, hd]
        # -> the caches of rows cache_row .. cache_row + B - 1: [B, H_kv, L, hd] (views, no copy)
        rows = slice(cache_row, cache_row + k.shape[0])
        k_rows, v_rows = self.k_cache[rows], self.v_cache[rows]
        if input_pos.dim() == 1:
            k_rows.index_copy_(2, input_pos, k)
            v_rows.index_copy_(2, input_pos, v)
        else:  # b [B, 1] and input_pos [B, S] index [B, S, H_kv, hd]
            b = torch.arange(k.shape[0], device=k.device)[:, None]
            k_rows[b, :, input_pos], v_rows[b, :, input_pos] = k.transpose(1, 2), v.transpose(1, 2)
        return k_rows, v_rows


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX half-split rotary on the first 2 * cos.shape[-1] dims of x [B, S, H, hd]; cos, sin [B, S, 1, rotary_dim / 2]
    fp32.

    Computed in fp32 and cast back, so fp16 models rotate as accurately as fp32 ones.
    """
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half].float(), x[..., half : 2 * half].float(), x[..., 2 * half :]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1)


class Attention(nn.Module):
    """Causal self-attention: fused qkv (HF's split q/k/v are concatenated into Wqkv at load), partial rotary, SDPA."""

    def __init__(self, config: PhixtralConfig, runtime: Optional[RuntimeSettings] = None):
        super().__init__()
        self.runtime = runtime if runtime is not None else RuntimeSettings()  # the model's: attention_upcast
        self.n_head, self.n_head_kv, self.head_dim = config.n_head, config.n_head_kv, config.head_dim
        # Wqkv rows: [Q (H * hd) | K (H_kv * hd) | V (H_kv * hd)], heads contiguous inside each part.
        self.Wqkv = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_head_kv) * self.head_dim)
        self.out_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd)
        self.kv_cache: Optional[KVCache] = None
        # "scores": q times 2^-floor(log2(sqrt(hd))), exact in fp16; SDPA's scale is the rest of 1/sqrt(hd), in
        # (1/2, 1].
        self.prescale = 2.0 ** -math.floor(math.log2(math.sqrt(self.head_dim)))

    @property
    def upcast(self) -> str:
        """How this layer computes fp16 attention, one of ATTENTION_UPCAST: its model's attention_upcast."""
        return self.runtime.attention_upcast

    def forward(self, x, cos, sin, mask, input_pos, cache_row: int = 0):
        # x [B, S, D]; cos, sin [B, S, 1, rotary_dim / 2]; mask [B, 1, S, L] bool or None (causal);
        # input_pos [S] or [B, S] or None; cache_row: the KV cache row of batch row 0
        B, S, _ = x.shape
        hd = self.head_dim
        qk, v = self.Wqkv(x).split([(self.n_head + self.n_head_kv) * hd, self.n_head_kv * hd], dim=-1)
        qk = qk.view(B, S, self.n_head + self.n_head_kv, hd)
        if cos.shape[-1]:
            qk = apply_rotary(qk, cos, sin)  # q's and k's heads in one call
        q, k = qk.split([self.n_head, self.n_head_kv], dim=2)
        q, k, v = (
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.view(B, S, self.n_head_kv, hd).transpose(1, 2),
        )  # [B, H, S, hd]
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_row)  # [B, H_kv, L, hd]
            if mask is not None and mask.shape[-1] < k.shape[2]:  # per-row positions: only the slots the mask covers
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        if self.n_head_kv != self.n_head:
            k = k.repeat_interleave(self.n_head // self.n_head_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_head_kv, dim=1)
        scale = 1.0 / math.sqrt(hd)
        upcast = self.runtime.attention_upcast
        if q.dtype == torch.float16 and upcast == "scores":
            # SDPA's fused CUDA kernels (flash, memory-efficient) accumulate q.k^T and take the softmax in fp32; with q
            # pre-scaled, a kernel that stores q.k^T in fp16 holds at most twice the final score, not 9x (hd = 80).
            q, scale = q * self.prescale, scale / self.prescale
        elif q.dtype == torch.float16:
            # phi-2's q.k^T exceeds the fp16 range in the late layers (NaN logits); the original code upcasts the
            # same way. Upcasting q, k, v costs an fp32 copy of the cache per step, small next to reading the weights
            # at batch 1; bf16 has the range and stays as it is.
            q, k, v = q.float(), k.float(), v.float()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
        y = y.transpose(1, 2).reshape(B, S, self.n_head * hd).to(x.dtype)  # [B, S, H * hd]
        return self.out_proj(y)
