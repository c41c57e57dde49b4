"""What a router can be taught from the experts themselves: their own per-token losses, and closed-form gates.

Every expert of a merged phixtral is a dense model of its own: the shared attention, embeddings and LayerNorms with that
expert's fc1 / fc2 in every layer (exactly the model it was fine-tuned as, when only the MLPs were fine-tuned).
`only_expert` runs a MoE model that way, and `expert_token_losses` scores each token under each expert's own model:

    losses [E, B, S]          loss_e(t) = -log p_e(token t + 1 | tokens <= t)
    per-token target [T, E]   q_e(t) = softmax_e(-loss_e(t) / tau)       (tau -> 0: the per-token oracle's choice)

`token_target_loss` distills q into one layer's router with a cross-entropy; `ridge_gates` solves every layer's gate in
closed form (ridge regression of a target logit matrix on the layer's MoE inputs, layer by layer from the first, so
that each layer is fitted on the inputs the gates below it produce).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from phixtral_kernels import fused_moe


def expert_forward(moe, e: int, x: torch.Tensor) -> torch.Tensor:
    """One MoE layer's expert e alone on x [B, S, D] -> [B, S, D], with routing weight 1 (the softmax over its single
    pick)."""
    w1, w2 = moe.fc1.weight_for(x), moe.fc2.weight_for(x)
    y = fused_moe(
        x.reshape(-1, x.shape[-1]),  # [T, D]
        moe.gate.weight[e : e + 1],
        w1[e : e + 1],
        moe.fc1.bias[e : e + 1],
        w2[e : e + 1],
        moe.fc2.bias[e : e + 1],
        1,
        backend=moe.backend,
    )
    return y.view(x.shape)


@contextmanager
def only_expert(model, e: int):
    """Within the block, every MoE layer of `model` runs expert e alone: the dense model that expert was trained as."""
    E = model.config.num_local_experts
    if not 0 <= e < E:
        raise ValueError(f"expert must be in [0, {E}), got {e}")
    moes = [block.moe for block in model.h]
    for moe in moes:
        moe.forward = lambda x, moe=moe: expert_forward(moe, e, x)  # an instance attribute shadows MoE.forward
    try:
        yield model
    finally:
        for moe in moes:
            del moe.forward


@torch.no_grad()
def expert_token_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """Per-token next-token losses of each expert's own model on windows [B, S + 1]: [E, B, S] float32."""
    windows = windows.to(model.device)
    x, y = windows[:, :-1], windows[:, 1:]  # [B, S] each
    out = []
    for e in range(model.config.num_local_experts):
        with only_expert(model, e):
            logits = model(x)  # [B, S, V] fp32
        out.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape))
    return torch.stack(out)


def token_targets(losses: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft per-token targets [T, E] from per-expert losses [E, ...]: softmax over experts of -loss / tau."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    return (-losses.flatten(1).t().float() / tau).softmax(-1)


def token_target_logits(losses: torch.Tensor, tau: float) -> torch.Tensor:
    """The logits [T, E] whose softmax is token_targets(losses, tau), centred per token: -(loss - mean loss) / tau."""
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    z = -losses.flatten(1).t().double() / tau  # [T, E]
    return (z - z.mean(-1, keepdim=True)).float()


def token_target_loss(router_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one layer's router logits [T, E] against soft targets [T, E] (rows summing to 1) -> scalar."""
    return -(targets * router_logits.float().log_softmax(-1)).sum(-1).mean()


def moe_inputs(model, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Each MoE layer's input (the block's LayerNorm output) on windows [B, S + 1]: per layer [B * S, D] float32."""
    per_layer = [[] for _ in model.h]
    handles = [
        block.moe.register_forward_pre_hook(lambda mod, args, i=i: per_layer[i].append(args[0].flatten(0, 1).float()))
        for i, block in enumerate(model.h)
    ]
    try:
        with torch.no_grad():
            for chunk in windows.split(batch_size):
                model(chunk[:, :-1].to(model.device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(xs) for xs in per_layer]


def ridge_solve(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """The gate W [E, D] minimizing mean ||x W^T - y||^2 + lam * ||W||^2 for inputs x [N, D] and targets y [N, E].

    Solved in float64 through the D x D normal equations (D is small, N large)."""
    x64, y64 = x.double(), y.double()
    n, d = x64.shape
    gram = x64.t() @ x64 / n + lam * torch.eye(d, dtype=torch.float64, device=x.device)  # [D, D]
    return torch.linalg.solve(gram, x64.t() @ y64 / n).t()  # [E, D]


def ridge_gates(model, windows: torch.Tensor, targets: torch.Tensor, *, lam: float, batch_size: int) -> None:
    """Set every layer's gate to the ridge solution that maps its MoE inputs to targets [B * S, E], layer by layer.

    windows [B, S + 1]; targets: the logits wanted for every predicted position, in windows' row-major order. Layer l
    is solved on the inputs produced with layers < l already set, so a layer's gate is fitted to what it will see."""
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam!r}")
    for i, block in enumerate(model.h):
        x = moe_inputs(model, windows, batch_size)[i]  # [B * S, D]
        with torch.no_grad():
            block.moe.gate.weight.copy_(ridge_solve(x, targets.to(x.device), lam).to(block.moe.gate.weight.dtype))


def spaced_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """n windows [n, seq_len + 1] at evenly spaced offsets of a token stream [N] (no randomness: a fit on them is the
    same for every seed)."""
    last = stream.numel() - seq_len - 1  # the largest offset
    if last < 0:
        raise ValueError(f"a stream of {stream.numel()} tokens has no window of {seq_len + 1}")
    offsets = [(i * last) // max(1, n - 1) for i in range(n)] if n > 1 else [0]
    return torch.stack([stream[o : o + seq_len + 1] for o in offsets])


def ridge_init(model, streams: dict[str, torch.Tensor], *, windows: int, seq_len: int, tau: float, lam: float,
               batch_size: int) -> None:  # fmt: skip
    """Set every gate in closed form: the ridge fit of the per-token target logits (token_target_logits of the experts'
    own losses) on `windows` evenly spaced windows of each stream. The result depends on the experts, the shared weights
    and the data only, never on the gates the model came with."""
    fit = torch.cat([spaced_windows(streams[name], windows, seq_len) for name in sorted(streams)])  # [W, S + 1]
    losses = torch.cat([expert_token_losses(model, chunk) for chunk in fit.split(batch_size)], dim=1)  # [E, W, S]
    ridge_gates(model, fit, token_target_logits(losses, tau), lam=lam, batch_size=batch_size)


__all__ = [
    "expert_forward",
    "expert_token_losses",
    "moe_inputs",
    "only_expert",
    "ridge_gates",
    "ridge_init",
    "ridge_solve",
    "spaced_windows",
    "token_target_logits",
    "token_target_loss",
    "token_targets",
]
