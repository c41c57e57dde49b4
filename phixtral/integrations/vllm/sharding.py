"""Where each checkpoint tensor goes in the vLLM model, and which part of it a tensor-parallel rank keeps.

Plain torch and phixtral only (no vLLM): the vLLM model's loader and MoE layer call these functions, and the default
tests check them by simulating the ranks.

Tensor parallelism, R ranks, rank r:
    attention   as vLLM's other models: Wqkv column-parallel by heads (QKVParallelLinear, fed the q / k / v row blocks
                of phi-msft's fused Wqkv), out_proj row-parallel;
    experts     sharded along F, a Megatron MLP per expert: rank r keeps rows [r F/R, (r+1) F/R) of every fc1 weight and
                bias (column-parallel) and the same columns of every fc2 weight (row-parallel). Every rank holds the
                whole gate and the whole x, so every rank routes the same way; GELU acts per element of F, so each rank
                computes its slice of h exactly, and its fc2 product is a partial sum over its F columns:
                    partial_r[t] = sum_k w[t, k] * (gelu(x[t] @ w1_r[e]^T + b1_r[e]) @ w2_r[e]^T + [r == 0] b2[e])
                    out[t]       = sum_r partial_r[t]                        (the all-reduce)
                fc2's bias is kept by rank 0 only (zeros elsewhere), so the sum adds it once.
One all-reduce per layer: attention's and the MoE's partial sums are added first (out_proj's bias on rank 0 too), then
reduced together, since the block adds both to the residual.
"""

from typing import Optional

import torch

from ...config import PhixtralConfig
from ...layouts import (
    IGNORED_SUFFIXES,  # noqa: F401  (importable from here, as before)
    Target,
    checkpoint_map,
)

EXPERT_TENSORS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


# --- names ---------------------------------------------------------------------------------------------------------
def vllm_param_name(param: str) -> str:
    """phixtral's parameter name (phixtral.model.Phixtral) -> the vLLM model's.

    The vLLM model keeps phixtral's module names under `model.` (the part vLLM compiles), except the head: its
    LayerNorm is `model.final_ln` and its projection the ParallelLMHead `lm_head` (weight and bias).
    """
    if param.startswith("lm_head.ln."):
        return "model.final_ln." + param.removeprefix("lm_head.ln.")
    if param.startswith("lm_head.linear."):
        return "lm_head." + param.removeprefix("lm_head.linear.")
    if param == "wte.weight" or param.startswith("h."):
        return "model." + param
    raise ValueError(f"no vLLM parameter for phixtral parameter {param!r}")


def checkpoint_targets(config: PhixtralConfig) -> dict[str, Target]:
    """{checkpoint tensor name: Target} over every key layout a checkpoint of this config may use.

    A MoE config (more than one expert) takes the phi-msft MoE layout; a dense one the dense phi-msft and the HF layouts
    (names never collide across layouts).
    """
    if config.is_moe:
        return checkpoint_map(config, "phi-msft-moe")
    return {**checkpoint_map(config, "phi-msft-dense"), **checkpoint_map(config, "hf")}


def vllm_param_names(config: PhixtralConfig) -> set[str]:
    """Every parameter of the vLLM model for this config (a dense model has no gate parameter)."""
    return {vllm_param_name(t.param) for t in checkpoint_targets(config).values()}


# --- attention -----------------------------------------------------------------------------------------------------
def qkv_shards(target: Target, tensor: torch.Tensor, config: PhixtralConfig) -> list[tuple[str, torch.Tensor]]:
    """A Wqkv tensor (weight or bias) as [(shard id, rows)], for QKVParallelLinear's loader to keep this rank's heads.

    phi-msft's fused Wqkv (rows [Q | K | V]) gives three pieces; an HF q_proj / k_proj / v_proj (a row block of Wqkv in
    `target.index`) gives one.
    """
    hd = config.head_dim
    q, k = config.n_head * hd, config.n_head_kv * hd
    blocks = {"q": (0, q), "k": (q, q + k), "v": (q + k, q + 2 * k)}
    if not target.index:
        return [(shard, tensor[start:stop]) for shard, (start, stop) in blocks.items()]
    rows = target.index[0]
    for shard, (start, stop) in blocks.items():
        if (rows.start, rows.stop) == (start, stop):
            return [(shard, tensor)]
    raise ValueError(f"rows {rows} of Wqkv are not its q, k or v block {blocks}")


# --- experts -------------------------------------------------------------------------------------------------------
def expert_rows(F: int, rank: int, world: int) -> slice:
    """The slice of the expert hidden dim F that rank `rank` of `world` keeps (contiguous, F / world long)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")
    if F % world:
        raise ValueError(
            f"tensor parallelism shards the experts along their hidden dim: n_inner={F} must be divisible by the "
            f"tensor-parallel size {world}"
        )
    n = F // world
    return slice(rank * n, (rank + 1) * n)


def shard_expert_tensor(name: str, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """One expert's tensor as rank `rank` of `world` keeps it.

    name: "fc1.weight" [F, D] -> [F/R, D] rows; "fc1.bias" [F] -> [F/R]; "fc2.weight" [D, F] -> [D, F/R] columns;
    "fc2.bias" [D] -> itself on rank 0, zeros on the others (the all-reduce adds it once).
    Works the same on stacked tensors (a leading expert dim).
    """
    if name == "fc2.bias":
        return tensor if rank == 0 else torch.zeros_like(tensor)
    if name in ("fc1.weight", "fc1.bias"):
        dim = -2 if name == "fc1.weight" else -1
    elif name == "fc2.weight":
        dim = -1
    else:
        raise ValueError(f"name must be one of {EXPERT_TENSORS}, got {name!r}")
    rows = expert_rows(tensor.shape[dim], rank, world)
    return tensor.narrow(dim, rows.start, rows.stop - rows.start)


def shard_experts(w1, b1, w2, b2, rank: int, world: int):
    """Stacked expert tensors w1 [E, F, D], b1 [E, F], w2 [E, D, F], b2 [E, D] -> this rank's (w1, b1, w2, b2)."""
    return tuple(shard_expert_tensor(n, t, rank, world) for n, t in zip(EXPERT_TENSORS, (w1, b1, w2, b2)))


def expert_name(param: str) -> Optional[str]:
    """ "fc1.weight", ... when a vLLM parameter name is a stacked expert tensor (`...moe.fc1.weight`), else None."""
    _, sep, tail = param.rpartition(".moe.")
    return tail if sep and tail in EXPERT_TENSORS else None
