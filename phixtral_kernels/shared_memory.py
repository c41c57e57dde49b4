"""Shared memory: how much each GPU lets a block have, and how much a grouped GEMM launch takes.

A GEMM tile's K loop keeps its A [BLOCK_M, BLOCK_K] and B [BLOCK_K, BLOCK_N] tiles in shared memory, one buffer per
load in flight; compiled by triton 3.9 and read back from `metadata.shared` (`python -m phixtral_kernels.aot`):

    mma.sync and FMA dots (sm_80 - sm_89, fp32 anywhere, tiles under 64 rows on sm_90): max(1, num_stages - 1) buffers
    wgmma (sm_90, fp16 / bf16, 64 rows or more, warps in whole warpgroups): num_stages buffers, + 8 B of barrier each
        with TMA weight loads

The store of a tensor-core accumulator goes through shared memory too, at most the whole tile in the stored dtype,
reusing the K loop's buffers: the larger of the two counts. That is exact for every float launch fused_moe and its
backward make. Quantized weights stream packed words in B's place, their scale and zero rows (act-order: a scale tile
per buffer, g_idx's run, one zero tile) beside them, and stage the dequantized B tile once for the dot: an upper bound,
within 1.6x of the compiled figure at fused_moe's quantized launches.

The opt-in limit per block comes from torch (`shared_memory_per_block_optin`) where it says, else from `SHARED_BYTES`.
MIN_CAPABILITY admits sm_86 / sm_89 / sm_120 (RTX 30xx / 40xx / 50xx, A10, L4, L40), whose 99 KB per block fp32 tiles
sized for sm_80 / sm_90 overflow: `fit_shared_memory` lowers stages (and then tiles) until a config fits.
"""

import functools
from dataclasses import replace

import torch

# Opt-in shared memory per block by (major, minor), from the CUDA programming guide's table (1 KB of each SM's is
# reserved for the system, so 163 KB rather than 164 on sm_80).
SHARED_BYTES = {
    (7, 0): 96 * 1024,
    (7, 2): 96 * 1024,
    (7, 5): 64 * 1024,
    (8, 0): 163 * 1024,
    (8, 6): 99 * 1024,
    (8, 7): 163 * 1024,
    (8, 9): 99 * 1024,
    (9, 0): 227 * 1024,
    (10, 0): 227 * 1024,
    (12, 0): 99 * 1024,
}
# A capability missing from the table: the smallest limit of sm_80 and newer, which every such GPU has.
FALLBACK_SHARED_BYTES = 99 * 1024
_WGMMA_MIN_ROWS = 64  # a warpgroup's wgmma covers 64 rows: smaller tiles take mma.sync on sm_90 too
_BARRIER_BYTES = 8  # one mbarrier per buffer of TMA loads


def capability_shared_bytes(capability) -> int:
    """The opt-in shared memory per block of GPUs of this capability ((major, minor) or 86-style int)."""
    if isinstance(capability, int):
        capability = divmod(capability, 10)
    major, minor = capability
    if (major, minor) in SHARED_BYTES:
        return SHARED_BYTES[(major, minor)]
    same_major = [v for (m, _), v in SHARED_BYTES.items() if m == major]
    return min(same_major) if same_major else FALLBACK_SHARED_BYTES


@functools.lru_cache(maxsize=None)
def cuda_shared_bytes(index: int) -> int:
    """The opt-in shared memory per block of CUDA device `index`: torch's figure, else the table's for its
    capability."""
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if isinstance(optin, int) and optin > 0:
        return optin
    return capability_shared_bytes(tuple(torch.cuda.get_device_capability(index)))


def uses_wgmma(capability, block_m: int, num_warps: int, element_bytes: int) -> bool:
    """Whether triton compiles the GEMM's tl.dot to Hopper's wgmma (operands from shared memory, one more buffer)."""
    if capability is None:
        return False
    major = capability[0] if isinstance(capability, tuple) else capability // 10
    return major == 9 and element_bytes == 2 and block_m >= _WGMMA_MIN_ROWS and num_warps % 4 == 0


def gemm_shared_bytes(
    block_m: int,
    block_n: int,
    block_k: int,
    num_stages: int,
    num_warps: int,
    element_bytes: int,
    capability=None,
    *,
    w_bits: int = 0,
    act_order: bool = False,
    group_size: int = 0,
    zeros: bool = False,
    scale_bytes: int = 2,
    tma: bool = False,
    out_bytes: int = 4,
) -> int:
    """Shared memory of one grouped GEMM launch (see the module docstring): exact for float weights at fused_moe's
    configs, an upper bound for packed ones (w_bits 4 or 8, with act_order, group_size (0: one group), zeros,
    scale_bytes per scale) and wherever the epilogue's conversion of the accumulator, out_bytes per element of the
    stored tile, outgrows the K loop's buffers. capability: the target's (major, minor) or 86-style int; None counts
    the buffers of mma.sync."""
    wgmma = uses_wgmma(capability, block_m, num_warps, element_bytes)
    buffers = num_stages if wgmma else max(1, num_stages - 1)
    a_tile = block_m * block_k * element_bytes
    # The store converts a tensor-core accumulator's layout through shared memory (at most the whole tile in the
    # stored dtype); fp32's FMA dot leaves the accumulator in a layout the store takes as it is.
    epilogue = 0 if element_bytes == 4 else block_m * block_n * out_bytes
    if not w_bits:
        barriers = buffers * _BARRIER_BYTES if tma and wgmma else 0
        return max(buffers * (a_tile + block_k * block_n * element_bytes) + barriers, epilogue)
    pack = 32 // w_bits
    words = block_k // pack * block_n * 4
    once = block_k * block_n * element_bytes  # the dequantized B tile, staged for the dot
    if act_order:  # a group per input row: g_idx's run and a [BLOCK_K, BLOCK_N] scale tile per buffer, one zero tile
        side = block_k * 4 + block_k * block_n * scale_bytes
        once += block_k * block_n // pack * 4 if zeros else 0
    elif group_size:  # one scale row (and zero row) per K tile, padded as the compiler lays small rows out
        side = max(block_n * scale_bytes, 512) + (max(block_n // pack * 4, 512) if zeros else 0)
    else:  # per channel: read once before the loop
        side = 0
    return max(buffers * (a_tile + words + side) + once, epilogue)


def fit_shared_memory(config, shared_bytes: int, element_bytes: int, capability=None, **quant):
    """`config` (a GemmConfig) as it fits `shared_bytes` per block by `gemm_shared_bytes` (quant: its keywords for
    packed weights, out_bytes): the most stages that fit, up to the config's; where one stage is too many, K tiles
    halved, then N tiles, down to 16. block_m never changes (the routing map is aligned to it), nor anything else.
    Returns config itself when it fits."""

    def need(c) -> int:
        return gemm_shared_bytes(
            c.block_m, c.block_n, c.block_k, c.num_stages, c.num_warps, element_bytes, capability, tma=c.tma, **quant
        )

    if need(config) <= shared_bytes:
        return config
    tile = config
    while True:
        for stages in range(config.num_stages, 0, -1):
            fitted = replace(tile, num_stages=stages)
            if need(fitted) <= shared_bytes:
                return fitted
        if tile.block_k > 16:
            tile = replace(tile, block_k=tile.block_k // 2)
        elif tile.block_n > 16:
            tile = replace(tile, block_n=tile.block_n // 2)
        else:
            return fitted  # the smallest tile: nothing left to give


__all__ = [
    "FALLBACK_SHARED_BYTES",
    "SHARED_BYTES",
    "capability_shared_bytes",
    "cuda_shared_bytes",
    "fit_shared_memory",
    "gemm_shared_bytes",
    "uses_wgmma",
]
