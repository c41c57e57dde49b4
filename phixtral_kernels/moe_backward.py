"""fused_moe with autograd: the forward of moe_triton.py, and a backward that runs through the same sorted slot map.

Forward, slot s = (t, k), expert e = topk_ids[t, k], w_s its routing weight (softmax over the token's k picked logits):
    a_s = x[t] @ w1[e]^T + b1[e]      h_s = gelu_tanh(a_s)      out[t] = sum_k w_s (h_s @ w2[e]^T + b2[e])

Backward, g = dout [T, D], r the sorted row of slot s (R rows by upper bound):
    u_r     = g[t] @ w2[e]                      grouped GEMM: g gathered by slot in the kernel, B the view w2^T
    a_r                                         GEMM 1 again without the activation, fp32 out (recomputed, see below)
    dwts_s  = u_r . h_r + g[t] . b2[e]          \\ one pass over the sorted rows: `_act_backward_kernel`
    da_r    = w_s u_r gelu_tanh'(a_r)           /  (da is zero on padding rows)
    dx[t]   = sum_k da_r @ w1[e]                grouped GEMM: B the [E, D, F] view w1^T, scattered to slot order, then
                                                the fixed-order top-k sum of `moe_combine` in fp32
    dlogits = w * (dwts - sum_k w dwts) at the k picked experts, 0 elsewhere      torch, [T, E]
    dgate   = dlogits^T x,  dx += dlogits @ gate                              torch, [E, D] and [T, D]
    dw1[e]  = sum_r da_r^T x[t],  db1[e] = sum_r da_r,  dw2[e] = sum_r (w_s g[t])^T h_r,  db2[e] = sum_r w_s g[t]
                                                `_weight_grad_kernel`: one program per output tile of an expert, looping
                                                over the expert's rows (bounds read on the device), bias sums alongside

Only what the requested gradients need runs: router training with only gate_weight requiring grad launches the u GEMM
and the row pass, no recompute and no dx GEMM. Everything accumulates in fp32; gradients come back in their input's
dtype.

Why a is recomputed rather than kept: the forward is the inference forward unchanged (it stores h only), and keeping a
would hold another [R, F] tensor per layer from forward to backward (335 MB in fp32 at T = 4096, top_k = 2, F = 10240)
for a GEMM that is one fifth of the backward's work. The recompute also gives a in fp32, straight from the accumulator.

No host sync, as in the forward: every grid is an upper bound and every row range is read on the device. Sums have a
fixed order (no atomics), so gradients are bit-identical run to run. Not differentiable twice (`once_differentiable`).
"""

import torch

from ._triton import INTERPRET, next_power_of_2, tl, triton
from .gemm_configs import GemmConfig, moe_gemm_configs
from .grouped_gemm import check_gemm_inputs, launch_grouped_gemm
from .moe_triton import DECODE_MAX_TOKENS, DECODE_PATHS, decode_path, moe_config_args, triton_moe_forward  # noqa: F401 -- their home before moe_triton.py
from .routing import RoutingMap
from .unpermute import moe_combine

# Columns per step of the row pass. The interpreter's cost is per op, not per element: take bigger steps there.
_BLOCK_COLS = 128 if INTERPRET else 64

if triton is not None:

    @triton.jit
    def _act_backward_kernel(
        # pointers
        u_ptr,  # [R, F] fp32: g[t] @ w2[e] per sorted row
        a_ptr,  # [R, F] fp32: pre-activation per sorted row (read when COMPUTE_DA)
        h_ptr,  # [R, F]: gelu_tanh(a) per sorted row, the forward's (read when COMPUTE_DWTS)
        g_ptr,  # [T, D]: dout (read when COMPUTE_DWTS)
        b2_ptr,  # [E, D] (read when COMPUTE_DWTS)
        da_ptr,  # [R, F] out (COMPUTE_DA): w_s u gelu_tanh'(a), zero on padding rows
        dwts_ptr,  # [S] fp32 out (COMPUTE_DWTS): gradient of each slot's routing weight
        sorted_token_ids_ptr,  # [R] int32: sorted row -> slot, sentinel S on padding rows
        expert_offsets_ptr,  # [E + 1] int32
        topk_weights_ptr,  # [S] fp32
        # sizes
        F,
        D,
        num_slots,
        E,
        # strides (u, a, h and da are contiguous along F)
        stride_u_r,
        stride_a_r,
        stride_h_r,
        stride_g_t,
        stride_g_d,
        stride_b2_e,
        stride_b2_d,
        stride_da_r,
        # meta
        TOP_K: tl.constexpr,
        E_PAD: tl.constexpr,
        COMPUTE_DA: tl.constexpr,
        COMPUTE_DWTS: tl.constexpr,
        BLOCK_M: tl.constexpr,  # the routing map's block_m: a tile holds rows of one expert
        BLOCK_F: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Grid: (RoutingMap.max_tiles,), at most cdiv(R, BLOCK_M)."""
        # --- program -> row tile; tiles past the rows in use exit (the grid is an upper bound)
        row_start = tl.program_id(0) * BLOCK_M
        if row_start >= tl.load(expert_offsets_ptr + E):
            return
        offs_m = row_start + tl.arange(0, BLOCK_M)
        slots = tl.load(sorted_token_ids_ptr + offs_m)
        mask_m = slots < num_slots
        weight = tl.load(topk_weights_ptr + slots, mask=mask_m, other=0.0)
        dwts = tl.zeros([BLOCK_M], dtype=tl.float32)

        # --- along F: da = w u gelu_tanh'(a) and the u . h part of dwts, in fp32 (every load upcast first: the
        # interpreter's bf16 arithmetic is wrong, and fp32 is what the sums need anyway)
        for f in tl.range(0, F, BLOCK_F):
            offs_f = f + tl.arange(0, BLOCK_F)
            mask_f = offs_f < F
            mask = mask_m[:, None] & mask_f[None, :]
            rows = offs_m.to(tl.int64)[:, None]
            u = tl.load(u_ptr + rows * stride_u_r + offs_f[None, :], mask=mask, other=0.0)
            if COMPUTE_DWTS:
                h = tl.load(h_ptr + rows * stride_h_r + offs_f[None, :], mask=mask, other=0.0).to(tl.float32)
                dwts += tl.sum(u * h, axis=1)
            if COMPUTE_DA:
                a = tl.load(a_ptr + rows * stride_a_r + offs_f[None, :], mask=mask, other=0.0)
                # gelu_tanh(a) = a sigmoid(2z), z = sqrt(2/pi) (a + 0.044715 a^3); with s = sigmoid(2z):
                # gelu_tanh'(a) = s (1 + a (1 - s) 2 sqrt(2/pi) (1 + 3 * 0.044715 a^2))
                s = tl.sigmoid(1.5957691216057308 * (a + 0.044715 * a * a * a))
                slope = s * (1.0 + a * (1.0 - s) * 1.5957691216057308 * (1.0 + 0.134145 * a * a))
                da = tl.where(mask, weight[:, None] * u * slope, 0.0)  # padding rows: 0, summed by the weight grads
                tl.store(
                    da_ptr + rows * stride_da_r + offs_f[None, :], da.to(da_ptr.dtype.element_ty), mask=mask_f[None, :]
                )

        # --- along D: the g[t] . b2[e] part of dwts, then one store per slot
        if COMPUTE_DWTS:
            offs_e = tl.arange(0, E_PAD)
            expert_ends = tl.load(expert_offsets_ptr + 1 + offs_e, mask=offs_e < E, other=row_start + 1)
            expert = tl.sum((expert_ends <= row_start).to(tl.int32), axis=0)
            tokens = (slots // TOP_K).to(tl.int64)
            for d in tl.range(0, D, BLOCK_D):
                offs_d = d + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                g = tl.load(
                    g_ptr + tokens[:, None] * stride_g_t + offs_d[None, :] * stride_g_d,
                    mask=mask_m[:, None] & mask_d[None, :],
                    other=0.0,
                ).to(tl.float32)
                b2 = tl.load(b2_ptr + expert.to(tl.int64) * stride_b2_e + offs_d * stride_b2_d, mask=mask_d, other=0.0)
                dwts += tl.sum(g * b2.to(tl.float32)[None, :], axis=1)
            tl.store(dwts_ptr + slots, dwts, mask=mask_m)

    @triton.jit
    def _weight_grad_kernel(
        # pointers
        p_ptr,  # GATHER_P: [T, N] read by token; else [R, N] sorted rows
        q_ptr,  # GATHER_Q: [T, K] read by token; else [R, K] sorted rows
        dweight_ptr,  # [E, N, K] out (WEIGHT_GRAD): sum over the expert's rows of p'^T q
        dbias_ptr,  # [E, N] out (BIAS_GRAD): sum over the expert's rows of p'
        sorted_token_ids_ptr,  # [R] int32: sorted row -> slot, sentinel S on padding rows
        expert_offsets_ptr,  # [E + 1] int32
        topk_weights_ptr,  # [S] fp32 (read when SCALE_P: p' = w_s p)
        # sizes
        N,
        K,
        num_slots,
        # strides
        stride_p_r,
        stride_p_n,
        stride_q_r,
        stride_q_k,
        stride_dw_e,
        stride_dw_n,
        stride_dw_k,
        stride_db_e,
        stride_db_n,
        # meta
        TOP_K: tl.constexpr,
        GATHER_P: tl.constexpr,
        GATHER_Q: tl.constexpr,
        SCALE_P: tl.constexpr,
        WEIGHT_GRAD: tl.constexpr,
        BIAS_GRAD: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,  # interpreter + bf16 only: its bf16 arithmetic is wrong, upcast first
        DOT_PRECISION: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Grid: (E * cdiv(N, BLOCK_N), cdiv(K, BLOCK_K)), or (E * cdiv(N, BLOCK_N), 1) without WEIGHT_GRAD. Each
        program owns one [BLOCK_N, BLOCK_K] tile of one expert's gradient and loops over that expert's rows: no
        atomics, a fixed summation order, and an expert with no rows writes zeros."""
        # --- program -> (expert, output tile), and the expert's rows from the map (read on the device)
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        expert = pid // num_pid_n
        offs_n = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        mask_k = offs_k < K
        row_begin = tl.load(expert_offsets_ptr + expert)
        row_end = tl.load(expert_offsets_ptr + expert + 1)

        # --- loop over the expert's rows, fp32 accumulators
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        bias_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r in tl.range(row_begin, row_end, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            slots = tl.load(sorted_token_ids_ptr + offs_r, mask=offs_r < row_end, other=num_slots)
            mask_r = slots < num_slots  # padding rows and the next expert's rows join no sum
            if GATHER_P:
                p_rows = (slots // TOP_K).to(tl.int64)
            else:
                p_rows = offs_r.to(tl.int64)
            p = tl.load(
                p_ptr + p_rows[:, None] * stride_p_r + offs_n[None, :] * stride_p_n,
                mask=mask_r[:, None] & mask_n[None, :],
                other=0.0,
            )
            if SCALE_P:
                weight = tl.load(topk_weights_ptr + slots, mask=mask_r, other=0.0)
                p_f32 = p.to(tl.float32) * weight[:, None]
                p = p_f32.to(p_ptr.dtype.element_ty)  # the dot's operands share q's dtype
            else:
                p_f32 = p.to(tl.float32)
            if BIAS_GRAD:
                bias_acc += tl.sum(p_f32, axis=0)
            if WEIGHT_GRAD:
                if GATHER_Q:
                    q_rows = (slots // TOP_K).to(tl.int64)
                else:
                    q_rows = offs_r.to(tl.int64)
                q = tl.load(
                    q_ptr + q_rows[:, None] * stride_q_r + offs_k[None, :] * stride_q_k,
                    mask=mask_r[:, None] & mask_k[None, :],
                    other=0.0,
                )
                if DOT_IN_FP32:
                    p = p_f32
                    q = q.to(tl.float32)
                acc = tl.dot(tl.trans(p), q, acc, input_precision=DOT_PRECISION)

        # --- stores, cast once; the bias gradient from the first K tile only
        if WEIGHT_GRAD:
            dw_ptrs = (
                dweight_ptr
                + expert.to(tl.int64) * stride_dw_e
                + offs_n[:, None] * stride_dw_n
                + offs_k[None, :] * stride_dw_k
            )
            tl.store(dw_ptrs, acc.to(dweight_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_k[None, :])
        if BIAS_GRAD:
            if pid_k == 0:
                db_ptrs = dbias_ptr + expert.to(tl.int64) * stride_db_e + offs_n * stride_db_n
                tl.store(db_ptrs, bias_acc.to(dbias_ptr.dtype.element_ty), mask=mask_n)


# ------------------------------------------------------------------------------------------------------- launchers


def _gathered_gemm_fp32(name, a, w, bias, routing: RoutingMap, config: GemmConfig) -> torch.Tensor:
    """c[r] = a[slot_r // top_k] @ w[e_r]^T (+ bias[e_r]) per sorted row, no activation: c [R, N] fp32, padding rows
    unwritten. w [E, N, K] may be a transposed view: the kernel takes strides."""
    check_gemm_inputs(name, a, w, bias, routing, config)
    c = torch.empty(routing.max_rows, w.shape[1], dtype=torch.float32, device=a.device)
    if routing.num_slots:
        launch_grouped_gemm(
            a, w, bias, c, routing, config, gather_a=True, scatter_c=False, activation="", mul_routing_weight=False
        )
    return c


def expert_preact(
    x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, routing: RoutingMap, config: GemmConfig
) -> torch.Tensor:
    """a = x[slot // top_k] @ w1[e]^T + b1[e] per sorted row: GEMM 1 without its activation. Returns a [R, F] fp32."""
    return _gathered_gemm_fp32("expert_preact", x, w1, b1, routing, config)


def expert_grad_hidden(g: torch.Tensor, w2: torch.Tensor, routing: RoutingMap, config: GemmConfig) -> torch.Tensor:
    """u = g[slot // top_k] @ w2[e] per sorted row: g [T, D], w2 [E, D, F]. Returns u [R, F] fp32, padding rows
    unwritten."""
    return _gathered_gemm_fp32("expert_grad_hidden", g, w2.transpose(1, 2), None, routing, config)  # [E, F, D] view


def expert_grad_input(da: torch.Tensor, w1: torch.Tensor, routing: RoutingMap, config: GemmConfig) -> torch.Tensor:
    """dx[t] = sum_k da[r] @ w1[e]: da [R, F] sorted rows, w1 [E, F, D]. Returns dx [T, D] fp32 (fixed-order sum)."""
    w1_t = w1.transpose(1, 2)  # [E, D, F] view
    check_gemm_inputs("expert_grad_input", da, w1_t, None, routing, config)
    y = torch.empty(config.split_k, routing.num_slots, w1.shape[2], dtype=torch.float32, device=da.device)
    if routing.num_slots:
        launch_grouped_gemm(
            da, w1_t, None, y, routing, config, gather_a=False, scatter_c=True, activation="", mul_routing_weight=False
        )
    return moe_combine(y, routing.top_k, torch.float32)


def act_backward(u, a, h, g, b2, routing: RoutingMap, *, compute_da: bool, compute_dwts: bool):
    """The row pass: (da [R, F] in h's dtype or None, dwts [T, top_k] fp32 or None) from u, a [R, F] fp32, h [R, F],
    g [T, D], b2 [E, D]. a may be None when compute_da is off."""
    R, F = u.shape
    T, D = g.shape
    da = torch.empty(R, F, dtype=h.dtype, device=u.device) if compute_da else None
    dwts = torch.empty(routing.num_slots, dtype=torch.float32, device=u.device) if compute_dwts else None
    if routing.num_slots == 0 or not (compute_da or compute_dwts):
        return da, None if dwts is None else dwts.view(T, routing.top_k)
    a_arg = a if compute_da else u
    da_arg = da if compute_da else u
    dwts_arg = dwts if compute_dwts else routing.topk_weights
    E = routing.num_experts
    _act_backward_kernel[(routing.max_tiles,)](
        u, a_arg, h, g, b2, da_arg, dwts_arg,
        routing.sorted_token_ids, routing.expert_offsets, routing.topk_weights,
        F, D, routing.num_slots, E,
        u.stride(0), a_arg.stride(0), h.stride(0), g.stride(0), g.stride(1), b2.stride(0), b2.stride(1),
        da_arg.stride(0),
        TOP_K=routing.top_k, E_PAD=next_power_of_2(E), COMPUTE_DA=compute_da, COMPUTE_DWTS=compute_dwts,
        BLOCK_M=routing.block_m, BLOCK_F=_BLOCK_COLS, BLOCK_D=_BLOCK_COLS,
        num_warps=4 if routing.block_m <= 64 else 8,
    )  # fmt: skip
    return da, None if dwts is None else dwts.view(T, routing.top_k)


def _weight_grad_config() -> dict:
    """Tiles of the weight-gradient kernel. Interpreter: big tiles (its cost is per op). GPU: 128 x 128 output tiles for
    the tensor cores, 32 rows per step (a decode step's experts hold a row or two). A starting point, not tuned."""
    if INTERPRET:
        return dict(BLOCK_R=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1)
    return dict(BLOCK_R=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)


def expert_weight_grad(
    p, q, routing: RoutingMap, *, gather_p: bool, gather_q: bool, scale_p: bool, weight: bool, bias: bool
):
    """Per expert, over its rows r of the sorted map: dweight[e] = sum_r p'_r^T q_r [E, N, K] and dbias[e] = sum_r p'_r
    [E, N], p'_r = w_s p_r if scale_p else p_r. p [T or R, N], q [T or R, K]: gathered by token (slot // top_k) when
    gather_*, else sorted rows. Returns (dweight or None, dbias or None) in p's dtype, summed in fp32. No host sync."""
    N, K, E = p.shape[1], q.shape[1], routing.num_experts
    dweight = torch.empty(E, N, K, dtype=p.dtype, device=p.device) if weight else None
    dbias = torch.empty(E, N, dtype=p.dtype, device=p.device) if bias else None
    if not (weight or bias):
        return dweight, dbias
    dw_arg = dweight if weight else p.new_empty(1, 1, 1)
    db_arg = dbias if bias else p.new_empty(1, 1)
    cfg = _weight_grad_config()
    grid = (E * triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(K, cfg["BLOCK_K"]) if weight else 1)
    _weight_grad_kernel[grid](
        p, q, dw_arg, db_arg, routing.sorted_token_ids, routing.expert_offsets, routing.topk_weights,
        N, K, routing.num_slots,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        dw_arg.stride(0), dw_arg.stride(1), dw_arg.stride(2), db_arg.stride(0), db_arg.stride(1),
        TOP_K=routing.top_k, GATHER_P=gather_p, GATHER_Q=gather_q, SCALE_P=scale_p, WEIGHT_GRAD=weight, BIAS_GRAD=bias,
        DOT_IN_FP32=INTERPRET and p.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if p.dtype == torch.float32 else "tf32",
        **cfg,
    )  # fmt: skip
    return dweight, dbias


def expert_weight_grads(x, g, h, da, routing: RoutingMap, needs: tuple[bool, bool, bool, bool]):
    """(dw1, db1, dw2, db2) in x's dtype, None where `needs` (w1, b1, w2, b2) is False: two launches, no host sync.

    x [T, D], g [T, D] (dout), h [R, F] (the forward's; padding rows never read), da [R, F] (None when neither dw1 nor
    db1 is needed). dw1[e] = sum da^T x[t], db1[e] = sum da; dw2[e] = sum (w_s g[t])^T h, db2[e] = sum w_s g[t].
    """
    need_w1, need_b1, need_w2, need_b2 = needs
    dw1 = db1 = dw2 = db2 = None
    if need_w1 or need_b1:
        dw1, db1 = expert_weight_grad(
            da, x, routing, gather_p=False, gather_q=True, scale_p=False, weight=need_w1, bias=need_b1
        )
    if need_w2 or need_b2:
        dw2, db2 = expert_weight_grad(
            g, h, routing, gather_p=True, gather_q=False, scale_p=True, weight=need_w2, bias=need_b2
        )
    return dw1, db1, dw2, db2


# ----------------------------------------------------------------------------------------------- autograd Function


class FusedMoEFunction(torch.autograd.Function):
    """fused_moe's Triton path with a backward (see the module docstring).

    apply(x, gate_weight, w1, b1, w2, b2, top_k)."""

    @staticmethod
    def forward(ctx, x, gate_weight, w1, b1, w2, b2, top_k):
        out, routing, h = triton_moe_forward(x, gate_weight, w1, b1, w2, b2, top_k)
        r = routing
        ctx.save_for_backward(
            x, gate_weight, w1, b1, w2, b2, h, r.topk_weights, r.topk_ids, r.sorted_token_ids, r.expert_offsets
        )
        ctx.block_m = routing.block_m
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        x, gate_weight, w1, b1, w2, b2, h, topk_weights, topk_ids, sorted_token_ids, expert_offsets = ctx.saved_tensors
        routing = RoutingMap(topk_weights, topk_ids, sorted_token_ids, expert_offsets, ctx.block_m)
        need_x, need_gate, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:6]
        inputs = (x, gate_weight, w1, b1, w2, b2)
        if routing.num_slots == 0:
            grads = [torch.zeros_like(t) if need else None for t, need in zip(inputs, ctx.needs_input_grad)]
            return (*grads, None)
        T, E, top_k = routing.num_tokens, routing.num_experts, routing.top_k
        gemm1, gemm2 = moe_gemm_configs(T, top_k, E, **moe_config_args(x, w1, w2))  # the forward's: same arguments
        g = dout  # [T, D] in x's dtype, any strides
        need_router = need_x or need_gate  # through the routing weights
        need_da = need_x or need_w1 or need_b1  # through the expert MLP's input side

        u = expert_grad_hidden(g, w2, routing, gemm1) if (need_router or need_da) else None  # [R, F] fp32
        a = expert_preact(x, w1, b1, routing, gemm1) if need_da else None  # [R, F] fp32
        da, dwts = (None, None)
        if u is not None:
            da, dwts = act_backward(u, a, h, g, b2, routing, compute_da=need_da, compute_dwts=need_router)

        dx = dgate = None
        if need_router:
            dvalues = topk_weights * (
                dwts - (topk_weights * dwts).sum(-1, keepdim=True)
            )  # softmax backward, [T, top_k]
            dlogits = torch.zeros(T, E, dtype=torch.float32, device=x.device).scatter_(1, topk_ids.long(), dvalues)
            if need_gate:
                dgate = (dlogits.t() @ x.float()).to(gate_weight.dtype)  # [E, D]
            if need_x:
                dx = dlogits @ gate_weight.float()  # [T, D] fp32
        if need_x:
            dx = dx + expert_grad_input(da, w1, routing, gemm2)
            dx = dx.to(x.dtype)
        dw1, db1, dw2, db2 = expert_weight_grads(x, g, h, da, routing, (need_w1, need_b1, need_w2, need_b2))
        return dx, dgate, dw1, db1, dw2, db2, None


__all__ = [
    "FusedMoEFunction",
    "act_backward",
    "expert_grad_hidden",
    "expert_grad_input",
    "expert_preact",
    "expert_weight_grad",
    "expert_weight_grads",
]
