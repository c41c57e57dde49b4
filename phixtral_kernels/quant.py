"""Weight-only quantized experts: the packed container, its plain-PyTorch twin (dequantize), an RTN quantizer, and the
load-time rewrite that takes act-order out of GEMM 2.

Layout (AutoGPTQ's v1 "gptq" format, stacked over E experts; N = out features, K = in features, as torch Linear):
    qweight [E, K * bits / 32, N] int32   input row k of column n sits in word k // P at bit (k % P) * bits, low bits
                                          first (P = 32 / bits values per word)
    qzeros  [E, G, N * bits / 32] int32   zero point - 1, packed the same way along N; None: symmetric,
                                          zero = 2^(bits-1)
    scales  [E, G, N] fp16 / bf16 / fp32
    g_idx   [E, K] int32                  group of input row k (act-order); None: k // group_size
    W[e, n, k] = scales[e, g, n] * (q[e, k, n] - (z[e, g, n] + 1)),  g = g_idx[e, k],  z the stored zero point

G = K / group_size groups (1 for group_size -1, one group per output channel). `fused_moe` takes a QuantizedExperts in
place of w1 and / or w2; the grouped GEMM dequantizes each weight tile inside its K loop (grouped_gemm.py), so no
dequantized copy exists in memory.
"""

from dataclasses import InitVar, dataclass, field
from typing import Optional, Union

import torch

BITS = (4, 8)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t) -> tuple:
    return tuple(t.shape)


@dataclass(frozen=True)
class QuantizedExperts:
    """E stacked weight-only quantized Linears [E, N, K] (see the module docstring for the layout and the math).

    Construction checks every shape and dtype and raises a ValueError naming the tensor. check=True (the default) also
    reads g_idx to check its range, a host read: the model builds its containers with check=False once loaded.
    cpu_packed: the same weights repacked for torch's CPU kernels (`phixtral_kernels.cpu_packed.pack_for_cpu`), which
    the torch backend uses for bfloat16 activations on the CPU, up to its max_rows rows; `select` and `to` drop it.
    """

    qweight: torch.Tensor
    qzeros: Optional[torch.Tensor]
    scales: torch.Tensor
    g_idx: Optional[torch.Tensor]
    bits: int
    group_size: int
    check: InitVar[bool] = True
    cpu_packed: Optional[object] = field(default=None, compare=False, repr=False)  # a cpu_packed.CPUPackedExperts

    def __post_init__(self, check: bool):
        bits, group_size = self.bits, self.group_size
        if isinstance(bits, bool) or bits not in BITS:
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dtype != torch.int32 or self.qweight.dim() != 3:
            raise ValueError(f"qweight must be an int32 tensor [E, K * bits / 32, N], got {_describe(self.qweight)}")
        if not isinstance(self.scales, torch.Tensor):
            raise ValueError(f"scales is required: a float tensor [E, G, N], got {_describe(self.scales)}")
        E, words, N = self.qweight.shape
        K = words * (32 // bits)
        if group_size > 0 and K % group_size:
            raise ValueError(
                f"group_size {group_size} does not divide K={K} (the in features qweight {_shape(self.qweight)} packs)"
            )
        G = K // group_size if group_size > 0 else 1
        if not self.scales.is_floating_point() or _shape(self.scales) != (E, G, N):
            raise ValueError(
                f"scales must be a float tensor [E, G, N] = {(E, G, N)} (K={K}, group_size {group_size}, qweight "
                f"{_shape(self.qweight)}), got {_describe(self.scales)}"
            )
        if self.qzeros is not None:
            if (N * bits) % 32:
                raise ValueError(f"qzeros: N={N} out features do not pack into 32-bit words at {bits} bits")
            want = (E, G, N * bits // 32)
            if (
                not isinstance(self.qzeros, torch.Tensor)
                or self.qzeros.dtype != torch.int32
                or _shape(self.qzeros) != want
            ):
                raise ValueError(
                    f"qzeros must be an int32 tensor [E, G, N * bits / 32] = {want}, got {_describe(self.qzeros)}"
                )
        if self.g_idx is not None:
            if (
                not isinstance(self.g_idx, torch.Tensor)
                or self.g_idx.dtype not in _INDEX_DTYPES
                or _shape(self.g_idx) != (E, K)
            ):
                raise ValueError(f"g_idx must be an int32 tensor [E, K] = {(E, K)}, got {_describe(self.g_idx)}")
            if check and self.g_idx.device.type != "meta" and self.g_idx.numel():
                lo, hi = (int(v) for v in self.g_idx.aminmax())
                if lo < 0 or hi >= G:
                    raise ValueError(f"g_idx holds groups in [{lo}, {hi}], outside [0, G={G})")
        packed = self.cpu_packed
        if packed is not None and (
            (packed.num_experts, packed.out_features, packed.in_features) != (E, N, K)
            or self.scales.device.type != "cpu"
        ):
            held = (packed.num_experts, packed.out_features, packed.in_features)
            raise ValueError(
                f"cpu_packed holds [E, N, K] = {held} but qweight packs {(E, N, K)} on {self.scales.device}"
            )
        # With a CPU packed form qweight may be a meta placeholder: the packed form holds the codes, and what needs
        # qweight reads them back from it (cpu_packed.with_qweight).
        released = packed is not None and self.qweight.device.type == "meta"
        for name in ("qweight", "qzeros", "g_idx"):
            t = getattr(self, name)
            if t is not None and t.device != self.scales.device and not (name == "qweight" and released):
                raise ValueError(f"{name} is on {t.device} but scales on {self.scales.device}")

    # --- sizes -----------------------------------------------------------------------------------------------------
    @property
    def pack(self) -> int:
        """Values per int32 word."""
        return 32 // self.bits

    @property
    def num_experts(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[2]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * self.pack

    @property
    def num_groups(self) -> int:
        return self.scales.shape[1]

    @property
    def shape(self) -> tuple:
        """(E, N, K): the shape of the float weight this stands for."""
        return (self.num_experts, self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.scales.device

    @property
    def released_qweight(self) -> bool:
        """qweight is a meta placeholder standing for codes that live only in `cpu_packed` (cpu_packed.with_qweight
        reads them). A container wholly on meta (as launch recording builds) has released nothing."""
        return self.cpu_packed is not None and self.qweight.device.type == "meta" and self.scales.device.type != "meta"

    @property
    def dtype(self) -> torch.dtype:
        """The scales' dtype."""
        return self.scales.dtype

    @property
    def kernel_group_size(self) -> int:
        """The group size as the kernel takes it: 0 for one group over the whole K (per channel)."""
        return self.group_size if self.group_size > 0 and self.num_groups > 1 else 0

    def group_index(self) -> torch.Tensor:
        """[E, K] int64: the group of every input row (g_idx, or k // group_size)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        k = torch.arange(self.in_features, device=self.device)
        rows = k // self.group_size if self.group_size > 0 else torch.zeros_like(k)
        return rows.expand(self.num_experts, -1)

    def zero_points(self) -> torch.Tensor:
        """[E, G, N] int32: the zero points (stored + 1, or 2^(bits-1) when symmetric)."""
        if self.qzeros is None:
            return torch.full(_shape(self.scales), 2 ** (self.bits - 1), dtype=torch.int32, device=self.device)
        return unpack_cols(self.qzeros, self.bits) + 1

    def select(self, experts) -> "QuantizedExperts":
        """The experts at `experts` (an int, a slice or an index tensor), as a new container."""
        if isinstance(experts, int):
            experts = slice(experts, experts + 1)
        pick = lambda t: None if t is None else t[experts]  # noqa: E731
        return QuantizedExperts(pick(self.qweight), pick(self.qzeros), pick(self.scales), pick(self.g_idx),
                                self.bits, self.group_size, check=False)  # fmt: skip

    def to(self, device) -> "QuantizedExperts":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedExperts(move(self.qweight), move(self.qzeros), move(self.scales), move(self.g_idx),
                                self.bits, self.group_size, check=False)  # fmt: skip


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} {_shape(t)}"
    return "None" if t is None else type(t).__name__


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedExperts)


# --- packing ----------------------------------------------------------------------------------------------------------
def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., K, N] integers in [0, 2^bits) -> [..., K * bits / 32, N] int32, row k in word k // P at bit
    (k % P) * bits."""
    per = 32 // bits
    *lead, K, N = q.shape
    if K % per:
        raise ValueError(f"{K} rows do not pack into 32-bit words at {bits} bits ({per} per word)")
    shifts = (torch.arange(per, device=q.device, dtype=torch.int64) * bits).view(per, 1)
    words = (q.to(torch.int64).reshape(*lead, K // per, per, N) << shifts).sum(-2)  # < 2^32, no overlap between fields
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # the same 32 bits, as int32


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_rows`: [..., W, N] int32 -> [..., W * 32 / bits, N] int32 in [0, 2^bits)."""
    per = 32 // bits
    *lead, W, N = words.shape
    shifts = (torch.arange(per, device=words.device, dtype=torch.int32) * bits).view(per, 1)
    fields = (words.unsqueeze(-2) >> shifts) & (2**bits - 1)  # arithmetic shift, then masked: the raw bits
    return fields.reshape(*lead, W * per, N)


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., G, N] -> [..., G, N * bits / 32] int32, packed along N (qzeros)."""
    return pack_rows(q.transpose(-1, -2), bits).transpose(-1, -2).contiguous()


def unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_cols`."""
    return unpack_rows(words.transpose(-1, -2), bits).transpose(-1, -2)


# --- the twin: dequantize ---------------------------------------------------------------------------------------------
def dequantize_experts(w: QuantizedExperts, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The float weights [E, N, K] a QuantizedExperts stands for, computed in fp32, returned in `dtype` (default: the
    scales' dtype). W[e, n, k] = scales[e, g, n] * (q[e, k, n] - zero[e, g, n]), g = g_idx[e, k]."""
    E, N, K = w.shape
    G = w.num_groups
    q = unpack_rows(w.qweight, w.bits)  # [E, K, N] int32
    scales, zeros = w.scales.float(), w.zero_points()  # [E, G, N]
    if w.g_idx is None:  # contiguous groups: broadcast over each group's K / G rows, nothing gathered
        out = (q.view(E, G, K // G, N) - zeros[:, :, None]).float() * scales[:, :, None]
    else:
        g = w.g_idx.long()
        out = torch.stack(
            [(q[e] - zeros[e].index_select(0, g[e])).float() * scales[e].index_select(0, g[e]) for e in range(E)]
        )
    return out.view(E, K, N).transpose(1, 2).to(dtype or w.dtype)


def dense_weight(w: Union[torch.Tensor, QuantizedExperts], dtype: torch.dtype) -> torch.Tensor:
    """A float weight as it is, or a QuantizedExperts dequantized to `dtype`."""
    return dequantize_experts(w, dtype) if is_quantized(w) else w


# --- quantizing -------------------------------------------------------------------------------------------------------
def quant_grid(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, scale_dtype=torch.float16):
    """(scale, zero) of the uniform grid covering [xmin, xmax] (both widened to include 0), as AutoGPTQ's quantizer.

    sym: zero = 2^(bits-1) and the grid is centred on 0. Otherwise zero = round(-xmin / scale), never 0: the v1 format
    stores zero - 1, so a 0 would be stored as -1; when it would be 0 (every value >= 0) the scale widens to
    xmax / (2^bits - 2) and the zero is 1. The scale is rounded to `scale_dtype` first, so that quantizing and
    dequantizing use the same scale.
    """
    maxq = 2**bits - 1
    xmin, xmax = torch.minimum(xmin, torch.zeros_like(xmin)), torch.maximum(xmax, torch.zeros_like(xmax))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-xmin / scale)
        at_zero = zero < 1
        scale = torch.where(at_zero, xmax / (maxq - 1), scale)
        zero = torch.where(at_zero, 1.0, zero)
    tiny = torch.finfo(scale_dtype).tiny if scale_dtype != torch.float16 else 2.0**-24  # fp16's smallest subnormal
    scale = scale.clamp(min=tiny).to(scale_dtype).float()
    if not sym:
        zero = torch.round(-xmin / scale).clamp(1, maxq)  # again, with the rounded scale
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes clamp(round(w / scale) + zero, 0, 2^bits - 1), as float."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def act_order_g_idx(order: torch.Tensor, group_size: int) -> torch.Tensor:
    """g_idx [..., K] int32 for input rows processed in `order` [..., K] (a permutation): the i-th row processed,
    order[i], falls in group i // group_size, as GPTQ with act-order writes it."""
    K = order.shape[-1]
    groups = (torch.arange(K, device=order.device) // (group_size if group_size > 0 else K)).expand_as(order)
    return torch.empty_like(order, dtype=torch.int32).scatter_(-1, order.long(), groups.to(torch.int32))


def quantize_rtn(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    sym: bool = True,
    g_idx: Optional[torch.Tensor] = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedExperts:
    """Round-to-nearest quantization of float weights w [E, N, K] (or one Linear [N, K], as E = 1) into a
    QuantizedExperts.

    Each group of input rows gets one (scale, zero) per output channel from its min and max (`quant_grid`). g_idx [E, K]
    (or [K]) assigns rows to groups in any order (act-order); None groups k // group_size. sym: no qzeros (zero
    2^(bits-1)); else zero points, stored as zero - 1.
    """
    if w.dim() == 2:
        w = w.unsqueeze(0)
    if g_idx is not None and g_idx.dim() == 1:
        g_idx = g_idx.unsqueeze(0).expand(w.shape[0], -1)
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    E, N, K = w.shape
    if group_size != -1 and (group_size < 1 or K % group_size):
        raise ValueError(f"group_size {group_size} does not divide K={K}")
    G = K // group_size if group_size > 0 else 1
    wt = w.detach().float().transpose(1, 2)  # [E, K, N]
    if g_idx is None:
        groups = (torch.arange(K, device=w.device) // (group_size if group_size > 0 else K)).expand(E, K)
    else:
        groups = g_idx.to(w.device).long()
    index = groups[:, :, None].expand(E, K, N)
    xmin = torch.full((E, G, N), float("inf"), device=w.device).scatter_reduce(1, index, wt, "amin")
    xmax = torch.full((E, G, N), float("-inf"), device=w.device).scatter_reduce(1, index, wt, "amax")
    scale, zero = quant_grid(xmin, xmax, bits, sym, scale_dtype)  # [E, G, N]
    q = quantize_values(wt, torch.gather(scale, 1, index), torch.gather(zero, 1, index), bits)  # [E, K, N]
    qzeros = None if sym else pack_cols((zero - 1).to(torch.int32), bits)
    g = None if g_idx is None else g_idx.to(device=w.device, dtype=torch.int32).contiguous()
    return QuantizedExperts(pack_rows(q.to(torch.int32), bits), qzeros, scale.to(scale_dtype), g, bits, group_size)


# --- act-order out of GEMM 2 ------------------------------------------------------------------------------------------
def _gather_last(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t [E, ..., F] with its last dim reordered by perm [E, F] per expert."""
    index = perm.view(perm.shape[0], *([1] * (t.dim() - 2)), perm.shape[1]).expand_as(t)
    return torch.gather(t, -1, index)


def absorb_act_order(w1, b1: torch.Tensor, w2: QuantizedExperts):
    """Reorder each expert's hidden units so that fc2's act-order groups become contiguous: -> (w1, b1, w2) computing
    the same MoE, with w2's g_idx gone (None) whenever its groups all hold group_size rows, as GPTQ's do.

    The hidden dim F is private to an expert (h = gelu(x W1[e]^T + b1[e]) only feeds W2[e]), so permuting it by
    perm_e = argsort(g_idx2[e]) in fc1's output rows, b1 and fc2's input rows changes nothing but the order of GEMM 2's
    sum. GEMM 2 then reads one scale row per K tile instead of looking up every element's group. fc1's own g_idx runs
    along D (the model's hidden state, shared by every expert and the attention), so it stays.
    w1: [E, F, D] float or a QuantizedExperts; b1 [E, F]; w2: a QuantizedExperts over [E, D, F]. Unchanged when w2 has
    no g_idx.
    """
    if not is_quantized(w2) or w2.g_idx is None:
        return w1, b1, w2
    perm = torch.argsort(w2.g_idx.long(), dim=1, stable=True)  # [E, F]
    g_sorted = torch.gather(w2.g_idx.long(), 1, perm)
    q2 = unpack_rows(w2.qweight, w2.bits)  # [E, F, D]
    q2 = torch.gather(q2, 1, perm[:, :, None].expand_as(q2))
    trivial = w2.group_size > 0 and bool(
        torch.equal(g_sorted, (torch.arange(w2.in_features, device=perm.device) // w2.group_size).expand_as(g_sorted))
    )
    g2 = None if trivial else g_sorted.to(torch.int32)
    new_w2 = QuantizedExperts(pack_rows(q2, w2.bits), w2.qzeros, w2.scales, g2, w2.bits, w2.group_size, check=False)
    new_b1 = torch.gather(b1, 1, perm)
    if is_quantized(w1):
        qzeros = None if w1.qzeros is None else pack_cols(_gather_last(unpack_cols(w1.qzeros, w1.bits), perm), w1.bits)
        new_w1 = QuantizedExperts(_gather_last(w1.qweight, perm), qzeros, _gather_last(w1.scales, perm), w1.g_idx,
                                  w1.bits, w1.group_size, check=False)  # fmt: skip
    else:
        new_w1 = torch.gather(w1, 1, perm[:, :, None].expand_as(w1))
    return new_w1, new_b1, new_w2


__all__ = [
    "BITS",
    "QuantizedExperts",
    "absorb_act_order",
    "act_order_g_idx",
    "dense_weight",
    "dequantize_experts",
    "is_quantized",
    "pack_cols",
    "pack_rows",
    "quant_grid",
    "quantize_rtn",
    "quantize_values",
    "unpack_cols",
    "unpack_rows",
]
