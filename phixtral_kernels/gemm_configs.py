"""Tile choice of the grouped GEMMs, apart from the kernel that consumes it: `GemmConfig`, the heuristic per GPU
generation, Hopper's prefill tiles, the per-GPU tuned tables and the adjustments for quantized weights and the top-k
sum.

`moe_gemm_configs` gives (GEMM 1, GEMM 2) for a layer: this GPU's tuned table where it holds the layer's shape, dtype
and token bucket, else `heuristic_configs` (by mean rows per expert; 128x256 tiles on sm_90 from 1024 rows per expert).
`quantized_config` narrows K tiles for packed weights; `topk_sum_fits` says whether GEMM 2 can sum each token's rows.

Tuned tables: the ones `python benchmarks/tune_moe.py` writes, read at run time.

One JSON file per GPU model, phixtral_kernels/configs/<GPU name>.json (the name as torch.cuda.get_device_name gives it,
every run of characters other than letters, digits, '.', '_' and '-' made one '_': "NVIDIA H200" -> NVIDIA_H200.json):

    {"format": 1, "gpu": "NVIDIA H200", "shape": {"D": 2560, "F": 10240, "E": 4, "top_k": 2},
     "conditions": {"date": ..., "torch": ..., "triton": ..., ...},
     "configs": {"bfloat16": {"1": {"<T>": {"config": {"block_m": 16, "block_n": 64, "block_k": 128, "split_k": 1,
                                                       "group_m": 8, "num_warps": 4, "num_stages": 4, "tma": false},
                                            "us": 21.4, ...},
                                   ...},
                              "2": {...}},
                 "float16": {...}}}

"1" and "2" are GEMM 1 and GEMM 2; "2sum", optional, GEMM 2 summing each token's rows itself (no split-K: the decode
chain's, `expert_gemm2_sum`), where a bucket lacks it the heuristic's no-split GEMM 2 on the bucket's block_m. A bucket
key <T> is the largest token count of its bucket: T goes to the first key >= T, the largest key also serves every T
above it. Keys other than "config" in an entry are information (times).
A table answers only at its own shape (D, F, E, top_k); elsewhere, and for buckets it lacks, the heuristic does.

Every entry is checked when the table is read: a bad or missing field, GEMM 1 or "2sum" with split_k > 1, the GEMMs on
different block_m, tiles whose stages overflow the GPU's shared memory: a warning, and that bucket goes to the
heuristic. A file that is not JSON or not such a table: a warning, and the heuristic everywhere. Never an exception.

PHIXTRAL_MOE_CONFIGS: "tuned" (default: this GPU's table when there is one), "heuristic" (never a table), or the path
of a table file to use instead of this GPU's.
"""

import bisect
import functools
import json
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import shared_memory
from ._triton import INTERPRET, next_power_of_2
from .quant import QuantizedExperts

ENV = "PHIXTRAL_MOE_CONFIGS"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
FORMAT = 1
DTYPES = ("float16", "bfloat16", "float32")
_FIELDS = {"block_m", "block_n", "block_k", "split_k", "group_m", "num_warps", "num_stages", "tma"}
_REQUIRED = {"block_m", "block_n", "block_k", "num_warps", "num_stages"}
DEFAULT_SHARED_BYTES = 227 * 1024  # Hopper's opt-in shared memory per block: a table parsed for no particular GPU

_override: str | None = None  # set by `source`


@dataclass(frozen=True)
class GemmConfig:
    """Tile shape and launch options of one grouped GEMM. block_m must equal the RoutingMap's."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # Weight tiles through a TMA tensor descriptor (tl.make_tensor_descriptor) instead of pointer loads. Taken only
    # where it can serve: the triton version has the API, the weights are a contiguous float stack (not quantized, not
    # the backward's transposed views) and each weight row is a multiple of 16 bytes; elsewhere the pointer loads run.
    tma: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig.{name} must be a power of two >= 16 (tl.dot's smallest tile), got {v!r}")
        for name in ("split_k", "group_m", "num_warps", "num_stages"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"GemmConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.tma, bool):
            raise ValueError(f"GemmConfig.tma must be a bool, got {self.tma!r}")


# Prefill tiles on Hopper: 128x256 outputs in 64-deep K steps, two warpgroups issuing wgmma, 3 stages of A + B tiles
# (48 KB a stage in fp16 / bf16, of the 227 KB a block may have), 16 row tiles walking one group of B columns so that
# they share it while it sits in L2. Only where the rows per expert fill enough of these tiles: at T = 1024 (E = 4,
# top_k = 2) GEMM 2 (N = D = 2560) would have 160 tiles, 1.2 waves of 132 SMs, against 320 of 128x128.
SM90_PREFILL = GemmConfig(block_m=128, block_n=256, block_k=64, group_m=16, num_warps=8, num_stages=3)
SM90_PREFILL_MIN_ROWS = 1024  # mean rows per expert
# Prefill tiles in fp32 (ieee FMA dots, every GPU): 16-deep K steps keep the 128x128 tile's operands in registers, and
# 4 stages take 48 KB, within every GPU's shared memory (see `heuristic_configs`).
FP32_PREFILL = GemmConfig(block_m=128, block_n=128, block_k=16, num_warps=8, num_stages=4)


def moe_gemm_configs(num_tokens: int, top_k: int, num_experts: int, *, sum_in_gemm2: bool = False, dims=None,
                     dtype=None, device=None, tuned: bool | None = None) -> tuple[GemmConfig, GemmConfig]:  # fmt: skip
    """(GEMM 1, GEMM 2) configs for T tokens: the tuned table of this GPU where it has them, else `heuristic_configs`.

    Interpreter: one config with large tiles (its cost is per op, not per element).

    dims (D, F) of the layer, dtype and device of its activations: with all three and a CUDA device, the table that
    `python benchmarks/tune_moe.py` wrote for this GPU (see the module docstring) answers first, when it was tuned at
    this shape and dtype. tuned=False, or PHIXTRAL_MOE_CONFIGS=heuristic, skips it; tuned=True reads it even under that
    variable. The table is read once per process and GPU: a call costs a dictionary lookup and a bisection, never a file
    read or a host sync. Both configs share block_m (the routing map's) and GEMM 1's split_k is 1.

    sum_in_gemm2 (top_k <= 2): GEMM 2 without K-split, so that it can sum each token's rows itself (`expert_gemm2_sum`,
    the decode chain): the table's "2sum" entry for the bucket, else the heuristic's no-split GEMM 2 on the table's
    block_m. GEMM 1's config, and so block_m, never changes with it.

    With dtype and a device of known shared memory (`shared_limit`), both configs fit it (`fit_shared_memory`: fewer
    stages, then smaller K and N tiles): fp32 tiles sized for sm_80 / sm_90 overflow the 99 KB of sm_86 / sm_89 /
    sm_120. Launches fit their config again with the weights' and output's own sizes (`launch_grouped_gemm`).
    """
    if INTERPRET:
        cfg = GemmConfig(block_m=32, block_n=64, block_k=64, num_warps=4, num_stages=1)
        return cfg, cfg
    if device is None:
        return heuristic_configs(num_tokens, top_k, num_experts, sum_in_gemm2=sum_in_gemm2, dtype=dtype)
    capability = _capability(device)
    gemm1, gemm2 = _unfitted(num_tokens, top_k, num_experts, capability, sum_in_gemm2, dims, dtype, device, tuned)
    limit = shared_limit(device)
    if dtype is None or limit is None:
        return gemm1, gemm2
    element = torch.finfo(dtype).bits // 8
    return tuple(shared_memory.fit_shared_memory(c, limit[1], element, limit[0]) for c in (gemm1, gemm2))


def _unfitted(num_tokens, top_k, num_experts, capability, sum_in_gemm2, dims, dtype, device, tuned):
    """moe_gemm_configs' choice before it is fitted to the device's shared memory."""
    found = lookup(num_tokens, top_k, num_experts, dims, dtype, device, tuned)
    if found is None:
        return heuristic_configs(num_tokens, top_k, num_experts, capability, sum_in_gemm2=sum_in_gemm2, dtype=dtype)
    gemm1, gemm2, gemm2_sum = found
    if not (sum_in_gemm2 and top_k <= 2):
        return gemm1, gemm2
    if gemm2_sum is not None:
        return gemm1, gemm2_sum
    if gemm2.split_k == 1:
        return gemm1, gemm2  # the table's GEMM 2 sums as it is
    no_split = heuristic_configs(num_tokens, top_k, num_experts, capability, sum_in_gemm2=True, dtype=dtype)[1]
    return gemm1, replace(no_split, block_m=gemm1.block_m)


def heuristic_configs(num_tokens: int, top_k: int, num_experts: int, capability=None, *,
                      sum_in_gemm2: bool = False, dtype=None) -> tuple[GemmConfig, GemmConfig]:  # fmt: skip
    """(GEMM 1, GEMM 2) configs for T tokens, chosen by the mean rows per expert; capability (major, minor) of the GPU.

    Decode shapes stream weights (small M tile, K-split for GEMM 2 whose N = D gives too few tiles to fill the SMs);
    prefill shapes use 128x128 tiles for the tensor cores, 128x256 (`SM90_PREFILL`) on Hopper once the experts have
    enough rows. Starting points: the tuned tables replace them per GPU.

    sum_in_gemm2 (top_k <= 2): GEMM 2 without K-split (see `moe_gemm_configs`); at decode it takes N tiles of 32 instead
    (D = 2560: 80 programs per expert, each streaming all of F, where the K-split of 4 over N tiles of 64 had 160
    programs streaming a quarter of F each) and six stages of loads in flight. (K steps of 256 spilled 4.9 KB per
    thread in fp32 on sm_80; 128 x 6 stages spill 16 B there, fp16 / bf16 none.)

    dtype float32: tl.dot runs as ieee FMA (no tensor cores, no wgmma), whose operand fragments hold a whole K step per
    thread: K steps of 32 on 64-row tiles and `FP32_PREFILL`'s 16 on 128x128 ones (K steps of 64 there spilled 16 B per
    thread on sm_86 in 2 stages, 5.7 KB on sm_80 in 3, 13 KB on sm_90's 128x256 tiles; none at these). None and the
    other dtypes: the tiles above. Fitting the stages to a GPU's shared memory is `moe_gemm_configs`' part.
    """
    fp32 = dtype == torch.float32
    no_split = sum_in_gemm2 and top_k <= 2
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        gemm1 = GemmConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=4)
        if no_split:
            return gemm1, GemmConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=6)
        return gemm1, GemmConfig(block_m=16, block_n=64, block_k=128, split_k=4, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        block_m = max(16, next_power_of_2(int(rows_per_expert)))
        block_k = 32 if fp32 and block_m >= 64 else 128
        gemm1 = GemmConfig(block_m=block_m, block_n=64, block_k=block_k, num_warps=4, num_stages=4)
        return gemm1, replace(gemm1, split_k=1 if no_split else 2)
    if fp32:
        return FP32_PREFILL, FP32_PREFILL
    # Hopper only: sm_120 (RTX Blackwell) has 99 KB of shared memory a block, too little for these stages; sm_100
    # untested.
    if capability is not None and capability[0] == 9 and rows_per_expert >= SM90_PREFILL_MIN_ROWS:
        return SM90_PREFILL, SM90_PREFILL
    cfg = GemmConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    return cfg, cfg


def _capability(device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def shared_limit(device) -> tuple[tuple[int, int], int] | None:
    """(capability, opt-in shared memory per block) of the GPU `device` is on, None off CUDA. On a CUDA device the
    bytes are torch's figure (`shared_memory_per_block_optin`), else shared_memory.SHARED_BYTES' for the capability:
    also where aot's recording on meta tensors names a target capability. Cached per device: no host sync."""
    device = torch.device(device)
    capability = _capability(device)
    if capability is None:
        return None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return capability, shared_memory.cuda_shared_bytes(index)
    return capability, shared_memory.capability_shared_bytes(capability)


def quantized_config(config: GemmConfig, w: QuantizedExperts) -> GemmConfig:
    """The config a quantized GEMM runs with. Contiguous groups (no g_idx): K tiles no longer than a group, so that
    each tile reads one scale row instead of one per input row. Act-order (g_idx): K tiles of 32 under 128x128 output
    tiles, where the per-element scale and zero tiles would spill."""
    group = w.kernel_group_size
    if w.g_idx is not None:
        if config.block_m * config.block_n >= 128 * 128 and config.block_k > 32:
            # Per-element scale and zero tiles [BLOCK_K, BLOCK_N] next to the 128x128 accumulator spilled on sm_80
            # (triton 3.6: 64 B of stack per thread at BLOCK_K 64); at 32 they fit.
            return replace(config, block_k=32)
        return config
    if group and group % config.block_k and group >= 16 and not group & (group - 1):
        return replace(config, block_k=group)  # a power of two below block_k: tiles of one group each
    return config  # other group sizes: the kernel looks up each input row's group


def topk_sum_fits(top_k: int, config: GemmConfig) -> bool:
    """Whether GEMM 2 can sum each token's rows itself (`expert_gemm2_sum`): one or two rows per token, no K-split."""
    return top_k <= 2 and config.split_k == 1


# ------------------------------------------------------------------------------------------------ tuned tables


def table_name(gpu_name: str) -> str:
    """File stem of a GPU's table: "NVIDIA H200" -> "NVIDIA_H200"."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", gpu_name).strip("_") or "unknown_gpu"


def table_path(gpu_name: str) -> Path:
    """Where the table of a GPU named `gpu_name` lives: CONFIG_DIR / "<table_name>.json"."""
    return CONFIG_DIR / f"{table_name(gpu_name)}.json"


@contextmanager
def source(mode: str):
    """Within the block, configs come from `mode` ("tuned", "heuristic" or a table's path) whatever PHIXTRAL_MOE_CONFIGS
    says: one process can run both (the benchmark's tuned against untuned providers)."""
    global _override
    before, _override = _override, mode
    try:
        yield
    finally:
        _override = before


def current_source() -> str:
    """Where configs come from now: `source`'s mode inside its block, else PHIXTRAL_MOE_CONFIGS, else "tuned"."""
    return _override or os.environ.get(ENV) or "tuned"


class TunedTable:
    """A table checked on load: {dtype name: (bucket keys ascending, [(gemm1, gemm2, gemm2_sum or None) or None for a
    rejected bucket])}."""

    def __init__(self, gpu: str, shape: tuple, buckets: dict, conditions: dict):
        self.gpu, self.shape, self.buckets, self.conditions = gpu, shape, buckets, conditions

    def get(self, num_tokens: int, top_k: int, num_experts: int, dims, dtype_name: str):
        """(gemm1, gemm2, gemm2_sum or None) for T tokens of this dtype at this shape, or None (another shape, no such
        bucket, a rejected one)."""
        if dims is None or (int(dims[0]), int(dims[1]), num_experts, top_k) != self.shape:
            return None
        found = self.buckets.get(dtype_name)
        if not found:
            return None
        keys, configs = found
        i = bisect.bisect_left(keys, num_tokens)
        return configs[min(i, len(keys) - 1)]


def parse_table(data, *, where: str, shared_bytes: int = DEFAULT_SHARED_BYTES, capability=None) -> TunedTable | None:
    """A TunedTable from a table's JSON object, or None with a warning when it is not one. Rejected buckets: a warning
    each, None in their place. shared_bytes, capability: the GPU's, which every config must fit
    (`shared_memory.gemm_shared_bytes`)."""

    def bad(why: str):
        warnings.warn(
            f"tuned GEMM configs {where} ignored ({why}): the heuristic configs serve instead",
            RuntimeWarning,
            stacklevel=4,
        )
        return None

    if not isinstance(data, dict):
        return bad("not a JSON object")
    if data.get("format") != FORMAT:
        return bad(f"format {data.get('format')!r}, expected {FORMAT}")
    shape, configs = data.get("shape"), data.get("configs")
    if not isinstance(shape, dict) or any(not _positive_int(shape.get(k)) for k in ("D", "F", "E", "top_k")):
        return bad(f"shape must hold positive ints D, F, E and top_k, got {shape!r}")
    if not isinstance(configs, dict):
        return bad("no 'configs' object")
    buckets, problems = {}, []
    for dtype_name, per_gemm in configs.items():
        if dtype_name not in DTYPES or not isinstance(per_gemm, dict) or not isinstance(per_gemm.get("1"), dict) \
                or not isinstance(per_gemm.get("2"), dict):  # fmt: skip
            problems.append(f"{dtype_name}: expected a dtype name ({', '.join(DTYPES)}) holding objects '1' and '2'")
            continue
        element = torch.finfo(getattr(torch, dtype_name)).bits // 8
        entries = {}
        for key in set(per_gemm["1"]) | set(per_gemm["2"]):
            try:
                T = int(key)
                if T < 1 or str(T) != key:
                    raise ValueError
            except ValueError:
                problems.append(f"{dtype_name}: bucket key {key!r} is not a positive int")
                continue
            try:
                gemms = [_entry(per_gemm[g].get(key), g, element, shared_bytes, capability) for g in ("1", "2")]
                sums = per_gemm.get("2sum")
                if sums is not None and not isinstance(sums, dict):
                    raise ValueError("'2sum' is not an object")
                gemms.append(
                    _entry(sums[key], "2sum", element, shared_bytes, capability) if sums and key in sums else None
                )
                block_ms = sorted({g.block_m for g in gemms if g is not None})
                if len(block_ms) > 1:
                    raise ValueError(f"block_m {block_ms[0]} and {block_ms[1]} differ (one routing map serves all)")
                entries[T] = tuple(gemms)
            except (ValueError, TypeError) as e:
                problems.append(f"{dtype_name} T<={T}: {e}")
                entries[T] = None
        if entries:
            keys = sorted(entries)
            buckets[dtype_name] = (keys, [entries[k] for k in keys])
    for problem in problems:
        warnings.warn(
            f"tuned GEMM configs {where}: {problem}; the heuristic serves there", RuntimeWarning, stacklevel=3
        )
    gpu = data.get("gpu") if isinstance(data.get("gpu"), str) else ""
    conditions = data.get("conditions") if isinstance(data.get("conditions"), dict) else {}
    return TunedTable(gpu, (shape["D"], shape["F"], shape["E"], shape["top_k"]), buckets, conditions)


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _entry(entry, gemm: str, element: int, shared_bytes: int, capability) -> GemmConfig:
    """One bucket's config of GEMM `gemm`, checked: raises ValueError or TypeError saying what is wrong."""
    if entry is None:
        raise ValueError(f"no GEMM {gemm} entry")
    cfg = entry.get("config") if isinstance(entry, dict) else None
    if not isinstance(cfg, dict):
        raise ValueError(f"GEMM {gemm}: no 'config' object")
    if _REQUIRED - set(cfg) or set(cfg) - _FIELDS:
        raise ValueError(f"GEMM {gemm}: missing {sorted(_REQUIRED - set(cfg))}, unknown {sorted(set(cfg) - _FIELDS)}")
    config = GemmConfig(**cfg)  # checks powers of two, positive ints, tma a bool
    if gemm == "1" and config.split_k != 1:
        raise ValueError("GEMM 1 needs split_k 1 (GELU acts on the whole sum)")
    if gemm == "2sum" and config.split_k != 1:
        raise ValueError("GEMM 2sum needs split_k 1 (each token's rows are summed as they are stored)")
    if max(config.block_m, config.block_n, config.block_k) > 256 or config.block_m * config.block_n > 128 * 256:
        raise ValueError(f"GEMM {gemm}: tiles larger than 128x256 (the accumulator would spill)")
    if config.num_warps not in (1, 2, 4, 8, 16) or config.num_stages > 8 or config.split_k > 16:
        raise ValueError(
            f"GEMM {gemm}: num_warps {config.num_warps} (1 to 16, a power of two), num_stages {config.num_stages} "
            f"(<= 8), split_k {config.split_k} (<= 16: each split has its own fp32 output)"
        )
    c = config
    need = shared_memory.gemm_shared_bytes(
        c.block_m, c.block_n, c.block_k, c.num_stages, c.num_warps, element, capability, tma=c.tma
    )
    if need > shared_bytes:
        raise ValueError(
            f"GEMM {gemm}: {config.num_stages} stages of {config.block_m}x{config.block_n}x{config.block_k} tiles need "
            f"{need} B of shared memory, which exceeds the GPU's {shared_bytes} B"
        )
    return config


def load_table(path: Path, *, shared_bytes: int = DEFAULT_SHARED_BYTES, gpu_name: str | None = None,
               missing_ok: bool = True, capability=None) -> TunedTable | None:  # fmt: skip
    """The table in `path`, checked; None when there is no such file (with a warning unless missing_ok), None with a
    warning when it is unreadable, not a table, or (gpu_name given) written for another GPU."""
    where = f"in {path}"
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if not missing_ok:
            warnings.warn(
                f"tuned GEMM configs: no file {path} ({ENV}): the heuristic configs serve", RuntimeWarning, stacklevel=2
            )
        return None
    except OSError as e:
        warnings.warn(f"tuned GEMM configs {where} ignored (unreadable: {e})", RuntimeWarning, stacklevel=2)
        return None
    try:
        data = json.loads(text)
    except ValueError as e:
        warnings.warn(f"tuned GEMM configs {where} ignored (not valid JSON: {e}): the heuristic configs serve instead",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return None
    try:
        table = parse_table(data, where=where, shared_bytes=shared_bytes, capability=capability)
    except Exception as e:  # noqa: BLE001 -- whatever the file holds, the heuristic serves and nothing raises
        warnings.warn(f"tuned GEMM configs {where} ignored ({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
        return None
    if table is not None and gpu_name is not None and table.gpu != gpu_name:
        warnings.warn(
            f"tuned GEMM configs {where} ignored (written for {table.gpu!r}, this GPU is {gpu_name!r})",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return table


@functools.lru_cache(maxsize=None)
def _table_for(index: int, path: str | None) -> TunedTable | None:
    """The table for CUDA device `index`: `path`, or this GPU's file in CONFIG_DIR. Read once per process."""
    gpu = dict(shared_bytes=shared_memory.cuda_shared_bytes(index), capability=_cuda_capability(index))
    if path is not None:
        return load_table(Path(path), missing_ok=False, **gpu)
    name = torch.cuda.get_device_name(index)
    return load_table(table_path(name), gpu_name=name, **gpu)


def clear_cache() -> None:
    """Forget the tables and GPU figures read so far (after writing a table, or in tests)."""
    _table_for.cache_clear()
    shared_memory.cuda_shared_bytes.cache_clear()


def lookup(num_tokens: int, top_k: int, num_experts: int, dims, dtype, device, tuned: bool | None = None):
    """(gemm1, gemm2, gemm2_sum or None) from the tuned table for this GPU, or None: not a CUDA device, the heuristic
    asked for (tuned False, or PHIXTRAL_MOE_CONFIGS=heuristic with tuned None), no table, or none for this shape, dtype
    or T."""
    if tuned is False or dims is None or dtype is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    mode = current_source()
    if mode == "heuristic":
        if tuned is not True:
            return None
        mode = "tuned"
    index = device.index if device.index is not None else torch.cuda.current_device()
    table = _table_for(index, None if mode == "tuned" else mode)
    if table is None:
        return None
    return table.get(num_tokens, top_k, num_experts, dims, str(dtype).replace("torch.", ""))


__all__ = [
    "CONFIG_DIR",
    "ENV",
    "FP32_PREFILL",
    "SM90_PREFILL",
    "SM90_PREFILL_MIN_ROWS",
    "GemmConfig",
    "TunedTable",
    "clear_cache",
    "current_source",
    "heuristic_configs",
    "load_table",
    "lookup",
    "moe_gemm_configs",
    "parse_table",
    "quantized_config",
    "shared_limit",
    "source",
    "table_name",
    "table_path",
    "topk_sum_fits",
]
