"""Combine: the weighted expert outputs, already back in slot order, summed into token order.

    y [P, S, D] fp32 (P K-split partials, S = T * top_k slots, routing weight already applied) -> out [T, D]
    out[t] = sum_p sum_k y[p, t * top_k + k]

Summed in fp32 in a fixed order (no atomics), so the result is bit-identical from run to run; cast once at the store.
"""

import torch

from ._triton import tl, triton, triton_unavailable_reason

if triton is not None:

    @triton.jit
    def _combine_kernel(
        # pointers
        y_ptr,  # [SPLIT, S, D] fp32
        out_ptr,  # [T, D]
        # sizes
        T,
        D,
        # strides
        stride_y_split,
        stride_y_s,
        stride_out_t,
        # meta
        TOP_K: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Grid: (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)). y and out are contiguous along D."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (offs_t < T)[:, None] & (offs_d < D)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for p in tl.static_range(SPLIT):
            for k in tl.static_range(TOP_K):
                rows = (offs_t * TOP_K + k).to(tl.int64)
                acc += tl.load(
                    y_ptr + p * stride_y_split.to(tl.int64) + rows[:, None] * stride_y_s + offs_d[None, :],
                    mask=mask,
                    other=0.0,
                )
        out_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * stride_out_t + offs_d[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_combine(y: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum y [P, S, D] fp32 over K-splits and each token's top_k slots: -> out [S // top_k, D] in `dtype`."""
    if y.dim() != 3 or y.dtype != torch.float32:
        raise ValueError(f"moe_combine: y must be fp32 [splits, slots, D], got {tuple(y.shape)} {y.dtype}")
    if top_k < 1 or y.shape[1] % top_k:
        raise ValueError(f"moe_combine: {y.shape[1]} slots is not a multiple of top_k={top_k}")
    reason = triton_unavailable_reason(y.device)
    if reason is not None:
        raise RuntimeError(f"moe_combine cannot run: {reason}")
    y = y if y.stride(2) == 1 else y.contiguous()
    splits, num_slots, D = y.shape
    T = num_slots // top_k
    out = torch.empty(T, D, dtype=dtype, device=y.device)
    if T == 0 or D == 0:
        return out
    block_t, block_d = 16, 256
    grid = (triton.cdiv(T, block_t), triton.cdiv(D, block_d))
    _combine_kernel[grid](
        y, out, T, D, y.stride(0), y.stride(1), out.stride(0),
        TOP_K=top_k, SPLIT=splits, BLOCK_T=block_t, BLOCK_D=block_d,
    )  # fmt: skip
    return out


__all__ = ["moe_combine"]
