"""GPTQ (Frantar et al. 2022) of a loaded float model's Linears, in place, into GPTQ's v1 layout.

Each Linear's rows are quantized one input column at a time, the rounding error pushed onto the columns not yet
quantized through the inverse Hessian of its calibration inputs (H = 2/n X^T X). Layer by layer: a layer's inputs come
from the already quantized layers before it; inside a layer Wqkv and fc1 first (both read ln(x)), then out_proj and fc2
on the outputs of the quantized Wqkv / fc1. An expert's Hessian only sees the calibration tokens routed to it.
desc_act (act-order) processes columns by decreasing Hessian diagonal (g_idx records each column's group).
`quantize_layer_gptq` is one layer of it and needs only that layer's tensors: `phixtral quantize` (streaming.py) reads
one layer at a time from the files and runs it there.
"""

import math

import torch
import torch.nn.functional as F

from phixtral_kernels import (
    QuantizedExperts,
    act_order_g_idx,
    dequantize_experts,
    gelu_tanh,
    pack_cols,
    pack_rows,
    quant_grid,
    quantize_values,
    topk_softmax_torch,
)

from .gptq_format import GPTQConfig
from .rtn import float_bias, float_weight, set_quantized


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, gptq: GPTQConfig, *, block_size: int = 128,
                  overwrite_h: bool = False):  # fmt: skip
    """GPTQ on one Linear: w [N, K] float, H [K, K] = 2/n sum x x^T of its inputs -> (q [K, N] codes, scale [G, N],
    zero [G, N], g_idx [K] or None, the Hessian-weighted error sum).

    Columns are quantized in order (by decreasing H diagonal with desc_act); each group's grid (`quant_grid`) is set
    when its first column comes up, from the columns as the earlier errors left them. Dead inputs (H_kk = 0) are
    quantized as zeros. Damping: damp_percent of the mean diagonal. overwrite_h: H (float32) is the solver's scratch
    space, which saves a [K, K] copy; the caller must not read it afterwards. Beside that space, one [K, K] temporary
    at a time: the permutation and each factor of the inverse are computed into it and copied back.
    """
    W = w.detach().float().clone()
    N, K = W.shape
    H = H.detach() if overwrite_h and H.dtype == torch.float32 else H.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    gs = gptq.group_size if gptq.group_size > 0 else K
    perm = None
    if gptq.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H.copy_(H[perm[:, None], perm[None, :]])
    H.diagonal().add_(gptq.damp_percent * torch.mean(torch.diag(H)))
    Hinv = _inverse_upper_cholesky_(H)
    Q = torch.zeros(K, N, device=W.device)
    scales = torch.zeros(K // gs, N, device=W.device)
    zeros = torch.zeros(K // gs, N, device=W.device)
    loss = 0.0
    if gptq.group_size > 0:
        block_size = max(block_size // gs, 1) * gs  # a multiple of the group size: groups never straddle blocks
    else:  # per channel: one grid for the whole row, from the weights as they are
        scales[0], zeros[0] = quant_grid(W.min(1).values, W.max(1).values, gptq.bits, gptq.sym)
    for b0 in range(0, K, block_size):
        b1 = min(b0 + block_size, K)
        W1, Err1, Hinv1 = W[:, b0:b1].clone(), torch.zeros(N, b1 - b0, device=W.device), Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if gptq.group_size > 0 and col % gs == 0:
                group = W1[:, i : i + gs]  # the group's columns with the errors of every earlier column applied
                s, z = quant_grid(group.min(1).values, group.max(1).values, gptq.bits, gptq.sym)
                scales[col // gs], zeros[col // gs] = s, z
            s, z = scales[col // gs], zeros[col // gs]
            w_col = W1[:, i]
            q = quantize_values(w_col, s, z, gptq.bits)
            Q[col] = q
            err = (w_col - s * (q - z)) / Hinv1[i, i]
            loss += float((err**2).sum()) / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]
    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[inv]
        g_idx = act_order_g_idx(perm, gs)
    return Q, scales, zeros, g_idx, loss


def _inverse_upper_cholesky_(H: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H's inverse, computed in H's memory (H [K, K] symmetric positive definite)."""
    H.copy_(torch.linalg.cholesky(H))
    H.copy_(torch.cholesky_inverse(H))
    H.copy_(torch.linalg.cholesky(H, upper=True))
    return H


def _pack(packed, scales, zeros, g_idx, gptq: GPTQConfig) -> QuantizedExperts:
    """Stack per-expert GPTQ results (codes already packed by pack_rows) into a QuantizedExperts."""
    q = torch.stack(packed)
    qzeros = None if gptq.sym else pack_cols((torch.stack(zeros) - 1).to(torch.int32), gptq.bits)
    g = torch.stack(g_idx).to(torch.int32) if g_idx[0] is not None else None
    return QuantizedExperts(q, qzeros, torch.stack(scales).half(), g, gptq.bits, gptq.group_size)


class _Hessians:
    """Running H = 2/n sum x x^T per expert of one Linear stack."""

    def __init__(self, E: int, K: int, device):
        self.H = torch.zeros(E, K, K, device=device)
        self.n = [0] * E

    def of(self, e: int) -> tuple[torch.Tensor, int]:
        """(expert e's H, rows seen): _quantize_stack's hessian_of."""
        return self.H[e], self.n[e]

    def add(self, e: int, x: torch.Tensor) -> None:
        # x [rows, K]; running mean of 2 x x^T, as GPTQ's add_batch
        rows = x.shape[0]
        if rows == 0:
            return
        total = self.n[e] + rows
        x = x.float() * math.sqrt(2.0 / total)
        self.H[e] *= self.n[e] / total
        self.H[e] += x.t() @ x
        self.n[e] = total


def _quantize_stack(model, name: str, hessian_of, gptq: GPTQConfig) -> float:
    """GPTQ of the Linear stack `name`, one expert at a time: hessian_of(e) -> (H [K, K] float32, rows seen) is called
    when expert e's turn comes, and its H is the solver's scratch space (so an expert's Hessian can be made just before
    it is solved and is gone after); each expert's codes are packed before the next expert is solved."""
    module = model.get_submodule(name)
    w = float_weight(module)
    results = []  # per expert: (packed codes, scale, zero, g_idx, error)
    for e in range(w.shape[0]):
        H, rows = hessian_of(e)
        if not rows:  # no calibration token reached the expert: H = 0 would zero every input; the identity rounds
            H = torch.eye(w.shape[2], device=w.device)
        q, *rest = gptq_quantize(w[e], H, gptq, overwrite_h=True)
        del H
        results.append((pack_rows(q.to(torch.int32), gptq.bits), *rest))
        del q
    packed, scales, zeros, g_idx, losses = zip(*results)
    set_quantized(model, name, _pack(packed, scales, zeros, g_idx, gptq), float_bias(module))
    return sum(losses)


def _moe_inputs(moe, h: torch.Tensor, experts=None) -> list:
    """For each expert in `experts` (default: all), the rows of h [T, D] routed to it (top-k over the router logits,
    ties to the lowest index)."""
    _, picks = topk_softmax_torch(h @ moe.gate.weight.t(), moe.top_k)  # [T, top_k], ties to the lowest index
    return [h[(picks == e).any(-1)] for e in (range(moe.gate.weight.shape[0]) if experts is None else experts)]


def _ln_batches(x: torch.Tensor, block, batch_size: int):
    """Batches of the layer input x [B, S, D] with their block.ln outputs, computed one batch at a time."""
    for b in range(0, x.shape[0], batch_size):
        yield x[b : b + batch_size], block.ln(x[b : b + batch_size])


def _collect_into(hessians: _Hessians):
    """A forward pre-hook that adds its module's input rows to hessians (one stack)."""

    def hook(module, args):
        hessians.add(0, args[0].reshape(-1, args[0].shape[-1]))

    return hook


@torch.no_grad()
def quantize_model_gptq(
    model, gptq: GPTQConfig, windows: torch.Tensor, *, batch_size: int = 8, progress: bool = True
) -> dict:
    """GPTQ of every `quantizable` Linear, in place, calibrated on token windows [n, S]. Returns {module: error}."""
    from tqdm.auto import tqdm

    x = calibration_inputs(model.wte.weight, windows, batch_size=batch_size)
    losses = {}
    with tqdm(total=4 * len(model.h), desc="gptq", unit="linear", disable=not progress) as bar:
        for i in range(len(model.h)):
            losses.update(quantize_layer_gptq(model, i, x, gptq, batch_size=batch_size, bar=bar))
    model.quantization = gptq
    return losses


def calibration_inputs(wte: torch.Tensor, windows: torch.Tensor, *, batch_size: int = 8) -> torch.Tensor:
    """The first layer's inputs [n, S, D] for token windows [n, S]: rows of the embedding wte [V, D], on its device."""
    return torch.cat([F.embedding(windows[i : i + batch_size].to(wte.device), wte)
                      for i in range(0, len(windows), batch_size)])  # fmt: skip


@torch.no_grad()
def quantize_layer_gptq(model, i: int, x: torch.Tensor, gptq: GPTQConfig, *, batch_size: int = 8, bar=None) -> dict:
    """GPTQ of layer i's four Linear stacks, in place, on its inputs x [n, S, D] (fp32), which it then replaces with
    the quantized layer's outputs: the next layer's inputs. Returns {module: error}.

    Only layer i of `model` needs its tensors (the others may stay on the meta device): it runs on x's device, the
    positions come from the config, and the packed modules are built where the ones they replace are."""
    block, device = model.h[i], x.device
    B, S, D = x.shape
    position_ids = torch.arange(S, device=device)[None].expand(batch_size, S)
    losses, prefix = {}, f"h.{i}"
    # 1. Wqkv and fc1 read ln(x)
    attn_in = _Hessians(1, D, device)
    E = block.moe.gate.weight.shape[0]
    fc1_in = _Hessians(E, D, device)
    for _, h in _ln_batches(x, block, batch_size):
        flat = h.reshape(-1, D)
        attn_in.add(0, flat)
        for e, rows in enumerate(_moe_inputs(block.moe, flat)):
            fc1_in.add(e, rows)
    for name, H in ((prefix + ".mixer.Wqkv", attn_in), (prefix + ".moe.fc1", fc1_in)):
        losses[name] = _quantize_stack(model, name, H.of, gptq)
        if bar is not None:
            bar.update(1)
    del attn_in, fc1_in
    # 2. out_proj reads the attention output, fc2 the hidden units, both from the quantized Wqkv / fc1. fc2's Hessians
    # are [F, F] each: one expert's is made when that expert is solved, so one is alive at a time.
    out_proj_in = _Hessians(1, block.mixer.out_proj.in_features, device)
    hook = block.mixer.out_proj.register_forward_pre_hook(_collect_into(out_proj_in))
    try:
        for xb, h in _ln_batches(x, block, batch_size):
            cos, sin = model._rope(position_ids[: xb.shape[0]])
            block.mixer(h, cos, sin, None, None)
    finally:
        hook.remove()
    name = prefix + ".mixer.out_proj"
    losses[name] = _quantize_stack(model, name, out_proj_in.of, gptq)
    del out_proj_in
    if bar is not None:
        bar.update(1)

    def fc2_hessian(e: int) -> tuple[torch.Tensor, int]:
        fc2_in = _Hessians(1, block.moe.fc1.weight.shape[1], device)
        w1 = None
        for _, h in _ln_batches(x, block, batch_size):
            (rows,) = _moe_inputs(block.moe, h.reshape(-1, D), [e])
            if rows.shape[0]:
                if w1 is None:
                    w1 = dequantize_experts(block.moe.fc1.weight.select(e), rows.dtype)[0]  # quantized in step 1
                fc2_in.add(0, gelu_tanh(F.linear(rows, w1, block.moe.fc1.bias[e])))
        return fc2_in.of(0)

    name = prefix + ".moe.fc2"
    losses[name] = _quantize_stack(model, name, fc2_hessian, gptq)
    if bar is not None:
        bar.update(1)
    # 3. the next layer's inputs: this layer, quantized
    for b in range(0, B, batch_size):
        xb = x[b : b + batch_size]
        cos, sin = model._rope(position_ids[: xb.shape[0]])
        x[b : b + batch_size] = block(xb, cos, sin, None, None)
    return losses
