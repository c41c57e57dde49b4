"""Weight-only quantized Linears on the CPU through torch's packed CPU kernels, repacked once from the GPTQ layout.

On a CPU, decode is bound by reading the weights. torch ships two weight-only GEMMs for it, fast only with bfloat16
activations (measured on a 2-core AVX-512 EPYC, torch 2.13, [1, 1024] x [1024, 4096]: fp32 F.linear 616 us, bf16
F.linear 565 us, `_weight_int8pack_mm` 270 us, `_weight_int4pack_mm_for_cpu` 171 us; both packed ops take 2.5-20x
longer with fp32 or fp16 activations):
    _weight_int8pack_mm(x, W int8 [N, K], scales [N])                  y = x @ (W * scales)^T, one scale per channel
    _weight_int4pack_mm_for_cpu(x, W4, group, scales_and_zeros)       y = x @ ((q - 8) * scale + zero)^T per group
How a QuantizedExperts maps onto them (q the stored code, z the zero point, s the scale; W = s * (q - z)):
    4 bits            "int4": q as the int4 code, (scale, zero) = (s, 0), so the op computes s * (q - 8).
    8 bits, 1 group   "int8": q - 128 as int8, per-channel s: s * (q - 128).
    8 bits, groups    "int8x2": q = 16 * hi + lo, two int4 planes stacked along N ([2N, K]) in one int4 call, hi at
                      (16 s, 0) and lo at (s, 8 s): their sum is 16 s (hi - 8) + s lo = s * (q - 128). Exact: 16 s and
                      8 s are s times powers of two. (_weight_int8pack_mm has no groups; one call per group is slower.)
    zero points       the op's centre c (8 or 128) differs from z: y += sum over k in group g of x_k * s_g * (c - z_g),
                      an fp32 [T, G] @ [G, N] product of the per-group sums of x (skipped when symmetric, z = c).
    act-order         each expert's K is permuted by argsort(g_idx) at packing, so its groups become contiguous; x's
                      columns are gathered by the same permutation per call.
    group sizes       the int4 op takes groups of 32, 64, 128 or 256: larger groups (and per channel) repeat their scale
                      over the largest of these that divides them.
Scales become bfloat16 (the op computes in x's dtype): GPTQ's fp16 scales lose 3 mantissa bits, a relative 2^-9, below
a 4-bit step and about one 8-bit rounding step. Accumulation is fp32 inside the ops.
Shapes the ops refuse (int4: N % 16; K % 32) and torch builds without the ops get a reason from
`cpu_packing_unsupported` and the caller dequantizes instead. The ops cost time in proportion to the rows, dequantizing
does not: callers use them up to PACKED_MAX_ROWS[mode] rows (decode and short prompts), and dequantize for longer
prefills.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .quant import QuantizedExperts, pack_rows, unpack_rows

# Rows up to which the packed ops beat dequantizing the weight (torch ops, about 30-40 ms for a [4096, 1024] matrix on
# 2 cores) and a bf16 F.linear, measured at [T, 1024] x [1024, 4096]: int4 31 ms vs 55-64 ms at T = 256 and 57 vs 62 ms
# at T = 512; int8 (per channel) alike; the two-plane int8 runs twice the int4 work and crosses over near T = 128.
PACKED_MAX_ROWS = {"int4": 512, "int8": 512, "int8x2": 128}
_INT4_GROUPS = (256, 128, 64, 32)


@dataclass(frozen=True)
class CPUPackedExperts:
    """E Linears [N, K] repacked for torch's CPU kernels (see the module docstring). Build with `pack_for_cpu`.

    Stacked over the experts, so that a compiled graph can pass them to an op as plain tensors:
    weights  "int4"/"int8x2": [E, N', K / 2] uint8, the op's packed int4 (N' = N or 2N); "int8": [E, N, K] int8
    scales   "int4"/"int8x2": [E, K / group_size, N', 2] (scale, zero) in dtype; "int8": [E, N] in dtype
    offsets  [E, G, N] fp32, or None: s * (c - z) per source group, added as (group sums of x) @ offsets
    perm     [E, K] int64, or None: expert e's x is x[:, perm[e]] (act-order)
    """

    mode: str
    weights: torch.Tensor
    scales: torch.Tensor
    offsets: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]
    group_size: int  # the int4 op's group (0 for "int8")
    out_features: int
    in_features: int
    dtype: torch.dtype

    @property
    def num_experts(self) -> int:
        return self.weights.shape[0]

    @property
    def max_rows(self) -> int:
        """Rows up to which `linear` is the faster way (PACKED_MAX_ROWS)."""
        return PACKED_MAX_ROWS[self.mode]

    def linear(self, x: torch.Tensor, e: int, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, K] -> x @ W[e]^T + bias [T, N] in x's dtype, computed with `dtype` activations."""
        offsets = None if self.offsets is None else self.offsets[e]
        perm = None if self.perm is None else self.perm[e]
        return packed_linear(
            x, self.weights[e], self.scales[e], offsets, perm, bias, self.mode, self.group_size, self.out_features
        )


def packed_linear(x, weight, scales, offsets, perm, bias, mode: str, group_size: int, out_features: int):
    """One packed expert of a CPUPackedExperts: x [T, K] -> x @ W^T + bias [T, N] in x's dtype, computed with the
    activations in the dtype of `scales`. weight, scales, offsets (or None), perm (or None): the expert's slices."""
    xq = x if x.dtype == scales.dtype else x.to(scales.dtype)
    if perm is not None:
        xq = xq.index_select(1, perm)
    if mode == "int8":
        y = torch._weight_int8pack_mm(xq, weight, scales)
    else:
        y = torch._weight_int4pack_mm_for_cpu(xq, weight, group_size, scales)
        if mode == "int8x2":
            y = y[:, :out_features].float() + y[:, out_features:]  # the hi and lo planes, summed in fp32
    if offsets is not None:
        group_sums = xq.float().view(xq.shape[0], offsets.shape[0], -1).sum(-1)  # [T, G]
        y = torch.addmm(y.float(), group_sums, offsets)
    if bias is not None:
        y = y + bias
    return y if y.dtype == x.dtype else y.to(x.dtype)


def cpu_packing_unsupported(w: QuantizedExperts) -> Optional[str]:
    """Why `w` cannot take torch's packed CPU kernels, or None when it can."""
    if not (hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_weight_int8pack_mm")):
        return f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu / _weight_int8pack_mm"
    if w.device.type != "cpu":
        return f"the weights are on {w.device}"
    E, N, K = w.shape
    if K % 32:
        return f"in features K={K} are not a multiple of 32"
    groups = w.num_groups
    if w.bits == 8 and groups == 1:
        return None
    if N % (16 if w.bits == 4 else 8):
        return f"out features N={N} are not a multiple of {16 if w.bits == 4 else 8} (the int4 op's tiles)"
    if _int4_group(K // groups) is None:
        return f"groups of {K // groups} rows do not split into groups of 32, 64, 128 or 256"
    if w.g_idx is not None:
        counts = torch.zeros(E, groups, dtype=torch.int64).scatter_add_(
            1, w.g_idx.long(), torch.ones(E, K, dtype=torch.int64)
        )
        if not bool((counts == K // groups).all()):
            return "g_idx puts unequal numbers of rows into the groups"
    return None


def pack_for_cpu(w: QuantizedExperts, dtype: torch.dtype = torch.bfloat16) -> CPUPackedExperts:
    """Repack `w` for torch's CPU kernels with `dtype` activations (a ValueError when `cpu_packing_unsupported`)."""
    reason = cpu_packing_unsupported(w)
    if reason is not None:
        raise ValueError(f"cannot pack for the CPU kernels: {reason}")
    E, N, K = w.shape
    G = w.num_groups
    q = unpack_rows(w.qweight, w.bits).transpose(1, 2)  # [E, N, K] codes in [0, 2^bits)
    scales = w.scales.float()  # [E, G, N]
    zeros = w.zero_points()  # [E, G, N]
    perm = None
    if w.g_idx is not None:
        perm = torch.argsort(w.g_idx.long(), dim=1, stable=True)  # [E, K]: groups contiguous, each of K / G rows
        q = torch.gather(q, 2, perm[:, None, :].expand(E, N, K))
    centre = 2 ** (w.bits - 1)  # 8 or 128: what the op subtracts from every code
    offsets = None
    if w.qzeros is not None and not bool((zeros == centre).all()):
        offsets = (scales * (centre - zeros)).contiguous()  # [E, G, N] fp32
    if perm is not None:
        perm = perm.contiguous()
    if w.bits == 8 and G == 1:
        weights, op_scales = (q - 128).to(torch.int8).contiguous(), scales[:, 0].to(dtype).contiguous()
        return CPUPackedExperts("int8", weights, op_scales, offsets, perm, 0, N, K, dtype)
    op_group = _int4_group(K // G)
    repeat = K // G // op_group  # op groups per source group
    if w.bits == 4:
        mode, codes = "int4", q
        op_scales = scales
        op_zeros = torch.zeros_like(scales)
    else:  # two int4 planes, hi then lo, stacked along N
        mode, codes = "int8x2", torch.cat([q >> 4, q & 15], dim=1)  # [E, 2N, K]
        op_scales = torch.cat([16 * scales, scales], dim=2)  # [E, G, 2N]
        op_zeros = torch.cat([torch.zeros_like(scales), 8 * scales], dim=2)
    scale_zero = torch.stack([op_scales, op_zeros], dim=-1).repeat_interleave(repeat, dim=1)  # [E, K / op_group, N', 2]
    weights = torch.stack(
        [torch._convert_weight_to_int4pack_for_cpu(codes[e].to(torch.int32).contiguous(), 1) for e in range(E)]
    )
    return CPUPackedExperts(mode, weights, scale_zero.to(dtype).contiguous(), offsets, perm, op_group, N, K, dtype)


def unpack_codes(cpu: CPUPackedExperts, e: Optional[int] = None) -> torch.Tensor:
    """The GPTQ codes [E, N, K] int32 (or expert e's [N, K]) back from the packed form, exactly: pack_for_cpu's
    inverse for the codes (scales and zero points stay in the GPTQ tensors). A ValueError where this torch packs int4
    in a layout `int4_layout_known` has not confirmed."""
    w = cpu.weights if e is None else cpu.weights[e : e + 1]
    E, N, K = w.shape[0], cpu.out_features, cpu.in_features
    if cpu.mode == "int8":
        codes = w.to(torch.int32) + 128
    else:
        if not int4_layout_known():
            raise ValueError("this torch packs int4 CPU weights in a layout phixtral cannot read back")
        rows = 2 * N if cpu.mode == "int8x2" else N
        planes = _unpack_int4pack(w, rows, K)  # [E, rows, K]
        codes = planes if cpu.mode == "int4" else 16 * planes[:, :N] + planes[:, N:]
    if cpu.perm is not None:  # packing gathered columns perm[j] into j: scatter them back
        perm = cpu.perm if e is None else cpu.perm[e : e + 1]
        codes = torch.empty_like(codes).scatter_(2, perm[:, None, :].expand(E, N, K), codes)
    return codes if e is None else codes[0]


def with_qweight(w: QuantizedExperts, e: Optional[int] = None) -> QuantizedExperts:
    """w (or expert e of it, as w.select(e)) with a real qweight: w itself, or where w released its qweight to a meta
    placeholder, one rebuilt from the codes of its CPU packed form (exactly)."""
    if not w.released_qweight:
        return w if e is None else w.select(e)
    codes = unpack_codes(w.cpu_packed, e)
    qweight = pack_rows((codes if e is None else codes[None]).transpose(1, 2), w.bits)
    if e is None:
        return QuantizedExperts(qweight, w.qzeros, w.scales, w.g_idx, w.bits, w.group_size, check=False,
                                cpu_packed=w.cpu_packed)  # fmt: skip
    pick = lambda t: None if t is None else t[e : e + 1]  # noqa: E731
    return QuantizedExperts(qweight, pick(w.qzeros), pick(w.scales), pick(w.g_idx), w.bits, w.group_size, check=False)


def _unpack_int4pack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    # [E, N, K / 2] uint8 in _convert_weight_to_int4pack_for_cpu's layout -> [E, N, K] int32 codes. The layout, read off
    # the op and checked by int4_layout_known: blocks of 32 rows, then a block of 16 if N leaves one, each a [K, 16]
    # (or [K, 8]) byte tile; byte (k, j) holds, at column k, rows j and j + 16 (low and high nibble) of a 32-row block,
    # rows 2j and 2j + 1 of a 16-row one.
    E = packed.shape[0]
    flat = packed.reshape(E, -1)
    head = (N // 32) * 32
    tiles = flat[:, : head * K // 2].reshape(E, head // 32, K, 16)
    halves = torch.stack([tiles & 15, tiles >> 4], dim=2)  # [E, N / 32, 2, K, 16]
    codes = halves.permute(0, 1, 2, 4, 3).reshape(E, head, K)
    if head < N:
        tiles = flat[:, head * K // 2 :].reshape(E, (N - head) // 16, K, 8)
        pairs = torch.stack([tiles & 15, tiles >> 4], dim=-1)  # [E, 1, K, 8, 2]
        codes = torch.cat([codes, pairs.permute(0, 1, 3, 4, 2).reshape(E, N - head, K)], dim=1)
    return codes.to(torch.int32)


@functools.lru_cache(maxsize=None)
def int4_layout_known() -> bool:
    """Whether `_unpack_int4pack` reads this torch's int4 CPU packing back exactly (checked once, on random matrices
    of both block sizes)."""
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return False
    generator = torch.Generator().manual_seed(0)
    try:
        for N in (16, 48, 64):
            codes = torch.randint(0, 16, (N, 64), generator=generator, dtype=torch.int32)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            if not torch.equal(_unpack_int4pack(packed[None], N, 64)[0], codes):
                return False
    except RuntimeError:
        return False
    return True


def _int4_group(rows: int) -> Optional[int]:
    """The int4 op's group for source groups of `rows` rows: the largest of 256 / 128 / 64 / 32 dividing it."""
    return next((g for g in _INT4_GROUPS if rows % g == 0), None)


__all__ = [
    "CPUPackedExperts",
    "PACKED_MAX_ROWS",
    "cpu_packing_unsupported",
    "int4_layout_known",
    "pack_for_cpu",
    "packed_linear",
    "unpack_codes",
    "with_qweight",
]
