"""The tuned-config tables (gemm_configs.py) and the config choice of moe_gemm_configs, on a faked CUDA GPU.

No GPU is needed: torch.cuda's name, capability and properties are faked, the interpreter's one-config shortcut is
switched off, and nothing is launched. A table is used where it holds the shape, dtype and bucket; everywhere else,
and whenever it is missing, unreadable or wrong, the heuristic answers, with a warning for what was wrong."""

import json
import types
import warnings
from dataclasses import replace

import pytest
import torch

from phixtral_kernels import gemm_configs, shared_memory
from phixtral_kernels.gemm_configs import SM90_PREFILL, GemmConfig, heuristic_configs, moe_gemm_configs
from phixtral_kernels.shared_memory import gemm_shared_bytes

GPU = "NVIDIA H200"
TABLE_FILE = gemm_configs.table_name(GPU) + ".json"
DIMS = (2560, 10240)
CUDA0 = torch.device("cuda", 0)


def _cfg(block_m, block_n, block_k, **kw):
    return dict(
        block_m=block_m,
        block_n=block_n,
        block_k=block_k,
        num_warps=kw.pop("num_warps", 4),
        num_stages=kw.pop("num_stages", 4),
        **kw,
    )


def _table(**changes) -> dict:
    """A valid table: bf16 buckets T<=1 and T<=64 and T<=4096 (the last for every T above it)."""
    configs = {
        "1": {"1": {"config": _cfg(16, 32, 256), "us": 20.0}, "64": {"config": _cfg(64, 128, 64)},
              "4096": {"config": _cfg(128, 256, 64, num_warps=8, num_stages=4, group_m=16, tma=True)}},
        "2": {"1": {"config": _cfg(16, 64, 128, split_k=8)}, "64": {"config": _cfg(64, 64, 128, split_k=2)},
              "4096": {"config": _cfg(128, 256, 64, num_warps=8, num_stages=3, group_m=16)}},
    }  # fmt: skip
    table = {"format": 1, "gpu": GPU, "shape": {"D": 2560, "F": 10240, "E": 4, "top_k": 2},
             "conditions": {"triton": "3.6.0"}, "configs": {"bfloat16": configs}}  # fmt: skip
    table.update(changes)
    return table


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """A faked H200 whose table folder is tmp_path; returns write(table or text) -> the table's path."""
    monkeypatch.setattr(gemm_configs, "INTERPRET", False)
    monkeypatch.setattr(gemm_configs, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    props = types.SimpleNamespace(shared_memory_per_block_optin=227 * 1024)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    monkeypatch.delenv(gemm_configs.ENV, raising=False)
    gemm_configs.clear_cache()
    gemm_configs._cuda_capability.cache_clear()

    def write(table, name=TABLE_FILE):
        path = tmp_path / name
        path.write_text(table if isinstance(table, str) else json.dumps(table))
        gemm_configs.clear_cache()
        return path

    yield write
    gemm_configs.clear_cache()
    gemm_configs._cuda_capability.cache_clear()


def configs(T, dtype=torch.bfloat16, dims=DIMS, **kw):
    return moe_gemm_configs(T, 2, 4, dims=dims, dtype=dtype, device=CUDA0, **kw)


def test_table_name_sanitizes_the_gpu_name():
    assert gemm_configs.table_name("NVIDIA H200") == "NVIDIA_H200"
    assert gemm_configs.table_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB"
    assert gemm_configs.table_name("NVIDIA RTX PRO 6000 (Blackwell) / x") == "NVIDIA_RTX_PRO_6000_Blackwell_x"


def test_valid_table_is_used_by_bucket(gpu):
    gpu(_table())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g1, g2 = configs(1)
        assert (g1, g2) == (GemmConfig(16, 32, 256, num_stages=4), GemmConfig(16, 64, 128, split_k=8, num_stages=4))
        assert configs(2)[0].block_m == configs(64)[0].block_m == 64  # T goes to the first bucket key >= T
        big = configs(100_000)  # past the largest key: the largest bucket
        assert (
            big[0] == GemmConfig(128, 256, 64, group_m=16, num_warps=8, num_stages=4, tma=True) and big[1].split_k == 1
        )
    # Another dtype, shape, top_k or expert count than the table's, or not a CUDA device: the heuristic.
    heuristic = heuristic_configs(1, 2, 4, (9, 0))
    assert configs(1, dtype=torch.float16) == heuristic
    assert configs(1, dims=(2048, 8192)) == heuristic
    assert moe_gemm_configs(1, 1, 4, dims=DIMS, dtype=torch.bfloat16, device=CUDA0) == heuristic_configs(
        1, 1, 4, (9, 0)
    )
    assert moe_gemm_configs(1, 2, 4, dims=DIMS, dtype=torch.bfloat16, device="cpu") == heuristic_configs(1, 2, 4)
    assert moe_gemm_configs(1, 2, 4) == heuristic_configs(1, 2, 4)


def test_table_is_read_once_per_process(gpu, monkeypatch):
    gpu(_table())
    reads = []
    load = gemm_configs.load_table
    monkeypatch.setattr(gemm_configs, "load_table", lambda *a, **kw: reads.append(a) or load(*a, **kw))
    for T in (1, 3, 64, 5000, 1, 64):
        configs(T)
    assert len(reads) == 1


def test_missing_table_means_the_heuristic_without_a_warning(gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for T in (1, 64, 4096):
            assert configs(T) == heuristic_configs(T, 2, 4, (9, 0))


def test_corrupt_json_warns_and_falls_back(gpu):
    gpu('{"format": 1, "configs": {"bfloat16": ')
    with pytest.warns(RuntimeWarning, match="not valid JSON"):
        assert configs(1) == heuristic_configs(1, 2, 4, (9, 0))


@pytest.mark.parametrize(
    "table, words",
    [
        ([1, 2], "not a JSON object"),
        (_table(format=2), "format 2"),
        (_table(shape={"D": 2560, "F": 10240, "E": 4}), "shape must hold"),
        (_table(configs=None), "no 'configs' object"),
        (_table(gpu="NVIDIA A100-SXM4-80GB"), "written for 'NVIDIA A100-SXM4-80GB'"),
    ],
)
def test_a_file_that_is_not_a_table_warns_and_falls_back(gpu, table, words):
    gpu(table)
    with pytest.warns(RuntimeWarning, match=words):
        assert configs(4096) == (SM90_PREFILL, SM90_PREFILL)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c["1"]["1"]["config"].pop("block_k"), r"missing \['block_k'\]"),
        (lambda c: c["1"]["1"]["config"].update(colour="red"), r"unknown \['colour'\]"),
        (lambda c: c["1"]["1"]["config"].update(split_k=2), "GEMM 1 needs split_k 1"),
        (lambda c: c["2"]["1"]["config"].update(block_m=32), "block_m 16 and 32 differ"),
        (lambda c: c["1"]["1"]["config"].update(block_n=48), "power of two"),
        (lambda c: c["1"]["1"]["config"].update(num_warps="4"), "positive int"),
        (lambda c: c["1"]["1"]["config"].update(tma=1), "tma must be a bool"),
        (lambda c: c["2"]["1"]["config"].update(split_k=64), "split_k 64"),
        (lambda c: c["1"]["1"].update(config=_cfg(16, 256, 256, num_stages=8)), "exceed"),
        (lambda c: c["2"].pop("1"), "no GEMM 2 entry"),
        (lambda c: c["1"].update({"01": c["1"].pop("1")}), "bucket key '01' is not a positive int"),
    ],
)
def test_bad_entry_warns_and_its_bucket_takes_the_heuristic(gpu, change, words):
    table = _table()
    change(table["configs"]["bfloat16"])
    gpu(table)
    with pytest.warns(RuntimeWarning, match=words):
        assert configs(1) == heuristic_configs(1, 2, 4, (9, 0))
    assert configs(64)[0] == GemmConfig(64, 128, 64, num_stages=4)  # the other buckets still serve


def test_env_switch_and_source_select_the_heuristic(gpu, monkeypatch, tmp_path):
    gpu(_table())
    tuned, heuristic = configs(1), heuristic_configs(1, 2, 4, (9, 0))
    assert tuned != heuristic
    monkeypatch.setenv(gemm_configs.ENV, "heuristic")
    assert configs(1) == heuristic
    assert configs(1, tuned=True) == tuned  # the argument wins over the variable
    monkeypatch.delenv(gemm_configs.ENV)
    assert configs(1, tuned=False) == heuristic
    with gemm_configs.source("heuristic"):
        assert configs(1) == heuristic
    assert configs(1) == tuned
    # A table's path: that table, for whatever GPU it was written.
    other = _table(gpu="somewhere else")
    other["configs"]["bfloat16"]["1"]["1"]["config"]["block_k"] = 64
    path = gpu(other, name="elsewhere.json")
    monkeypatch.setenv(gemm_configs.ENV, str(path))
    assert configs(1)[0].block_k == 64
    monkeypatch.setenv(gemm_configs.ENV, str(tmp_path / "absent.json"))
    with pytest.warns(RuntimeWarning, match="no file"):
        assert configs(1) == heuristic


def test_the_decode_chains_gemm2_sums_without_split_k(gpu):
    """sum_in_gemm2 (the decode chain's GEMM 2 summing each token's rows): the bucket's "2sum" entry; without one the
    table's GEMM 2 if it has no K-split, else the heuristic's no-split GEMM 2 on the table's block_m."""
    table = _table()
    gpu(table)
    g1, g2 = configs(1, sum_in_gemm2=True)
    assert g1 == GemmConfig(16, 32, 256, num_stages=4)  # GEMM 1 does not change with it
    assert (
        g2 == heuristic_configs(1, 2, 4, (9, 0), sum_in_gemm2=True)[1] and g2.split_k == 1 and g2.block_m == g1.block_m
    )
    assert configs(64, sum_in_gemm2=True)[1] == GemmConfig(
        64, 64, 128, num_stages=4
    )  # split_k 2 in the table: no-split heuristic
    table["configs"]["bfloat16"]["2"]["64"]["config"]["split_k"] = 1
    table["configs"]["bfloat16"]["2sum"] = {"1": {"config": _cfg(16, 64, 256, num_stages=3)}}
    gpu(table)
    assert configs(1, sum_in_gemm2=True)[1] == GemmConfig(16, 64, 256, num_stages=3)
    assert configs(1)[1].split_k == 8  # the other chains keep the table's GEMM 2
    assert configs(64, sum_in_gemm2=True)[1] == GemmConfig(64, 64, 128, num_stages=4)  # the table's, as it is


@pytest.mark.parametrize(
    "entry, words", [(_cfg(16, 64, 128, split_k=2), "2sum needs split_k 1"), (_cfg(32, 64, 128), "differ")]
)
def test_a_bad_2sum_entry_rejects_its_bucket(gpu, entry, words):
    table = _table()
    table["configs"]["bfloat16"]["2sum"] = {"1": {"config": entry}}
    gpu(table)
    with pytest.warns(RuntimeWarning, match=words):
        assert configs(1, sum_in_gemm2=True) == heuristic_configs(1, 2, 4, (9, 0), sum_in_gemm2=True)


def test_heuristic_takes_128x256_tiles_on_hopper_for_large_T_only():
    assert heuristic_configs(4096, 2, 4, (9, 0)) == (SM90_PREFILL, SM90_PREFILL)
    assert (
        SM90_PREFILL.block_n == 256
        and SM90_PREFILL.num_warps == 8
        and SM90_PREFILL.group_m == 16
        and not SM90_PREFILL.tma
    )
    for capability in (None, (8, 0), (8, 9), (12, 0)):  # sm_120: 99 KB of shared memory, too little for its stages
        assert heuristic_configs(4096, 2, 4, capability)[0].block_n == 128
    assert heuristic_configs(512, 2, 4, (9, 0))[0].block_n == 128  # 256 rows per expert: too few 128x256 tiles
    for T in (1, 8, 64, 512, 4096, 16384):
        g1, g2 = heuristic_configs(T, 2, 4, (9, 0))
        assert g1.block_m == g2.block_m and g1.split_k == 1


def test_the_moe_passes_its_shape_dtype_and_device(monkeypatch):
    """fused_moe asks for the configs of its own layer; quantized experts are kept off the tables."""
    from kernel_cases import moe_layer

    from phixtral_kernels import fused_moe, moe_triton, quantize_rtn

    calls = []
    real = moe_triton.moe_gemm_configs
    monkeypatch.setattr(moe_triton, "moe_gemm_configs", lambda *a, **kw: calls.append((a, kw)) or real(*a, **kw))
    x, g, w1, b1, w2, b2 = moe_layer(5, 64, 96, 4, torch.float16)
    fused_moe(x, g, w1, b1, w2, b2, 2, backend="triton")
    args, kw = calls[-1]
    assert args == (5, 2, 4) and (kw["dims"], kw["dtype"], kw["device"]) == ((64, 96), torch.float16, x.device)
    fused_moe(x, g, quantize_rtn(w1, bits=8, group_size=32), b1, w2, b2, 2, backend="triton")
    assert calls[-1][1]["device"] is None


# ------------------------------------------------------------------------------------------------ shared memory
# sm_86 / sm_89 / sm_120 (RTX 30xx / 40xx / 50xx, A10, L4, L40) allow 99 KB a block; the heuristic's fp32 tiles were
# sized for sm_80 / sm_90 (122,880 B at decode, 131,072 B at prefill, compiled): they must come back fitted.
SM86_SHARED = 101_376


@pytest.fixture
def sm86(gpu, monkeypatch):
    """The faked GPU as an RTX 4090-like sm_86 part: 99 KB of opt-in shared memory, no tuned table."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    props = types.SimpleNamespace(shared_memory_per_block_optin=SM86_SHARED)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: props)
    gemm_configs.clear_cache()
    gemm_configs._cuda_capability.cache_clear()
    return gpu


def _need(cfg, dtype, capability=(8, 6)):
    element = torch.finfo(dtype).bits // 8
    return gemm_shared_bytes(cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages, cfg.num_warps, element, capability)


@pytest.mark.parametrize("T, sum_in_gemm2", [(1, True), (1, False), (64, False)])
def test_fp32_configs_fit_sm86_with_fewer_stages(sm86, T, sum_in_gemm2):
    """The heuristic's fp32 choice on sm_86: the same tiles (block_m is the routing map's) in the most stages that fit.
    Unfitted they overflow 99 KB: GEMM 1 16x64x128 in 4 stages, GEMM 2 summing 16x32x128 in 6 (122,880 B each)."""
    fitted = configs(T, dtype=torch.float32, sum_in_gemm2=sum_in_gemm2)
    heuristic = heuristic_configs(T, 2, 4, (8, 6), sum_in_gemm2=sum_in_gemm2, dtype=torch.float32)
    for got, want in zip(fitted, heuristic):
        assert _need(want, torch.float32) > SM86_SHARED, "the heuristic's fp32 stages overflow sm_86 unfitted"
        assert (
            _need(got, torch.float32) <= SM86_SHARED < _need(replace(got, num_stages=got.num_stages + 1), torch.float32)
        )
        assert replace(got, num_stages=want.num_stages) == want, "only the stages change"
    # decode: GEMM 1 in 3 stages (81,920 B), GEMM 2 summing in 5 (98,304 B); T = 64: 32x64x128 in 3 (98,304 B)
    assert tuple(c.num_stages for c in fitted) == {1: (3, 5 if sum_in_gemm2 else 3), 64: (3, 3)}[T]


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)])
def test_fp32_tiles_keep_k_steps_short_where_fma_dots_would_spill(capability):
    """fp32 dots are ieee FMA on every GPU: 64-row tiles step K by 32 and prefill takes FP32_PREFILL (128x128x16, 4
    stages: 48 KB), never Hopper's 128x256 wgmma tiles; decode and 32-row tiles keep theirs. Other dtypes unchanged."""
    fp32 = dict(dtype=torch.float32)
    assert heuristic_configs(1, 2, 4, capability, **fp32) == heuristic_configs(1, 2, 4, capability)
    assert heuristic_configs(64, 2, 4, capability, **fp32) == heuristic_configs(64, 2, 4, capability)
    g1, g2 = heuristic_configs(128, 2, 4, capability, **fp32)
    assert (g1.block_m, g1.block_n, g1.block_k, g2.block_k, g2.split_k) == (64, 64, 32, 32, 2)
    assert heuristic_configs(4096, 2, 4, capability, **fp32) == (gemm_configs.FP32_PREFILL,) * 2
    for dtype in (torch.float16, torch.bfloat16, None):
        assert heuristic_configs(4096, 2, 4, capability, dtype=dtype) == heuristic_configs(4096, 2, 4, capability)
    limit = shared_memory.capability_shared_bytes(capability)
    for T in (128, 4096):
        for cfg in heuristic_configs(T, 2, 4, capability, **fp32):
            assert shared_memory.fit_shared_memory(cfg, limit, 4, capability) is cfg, "they fit every GPU as they are"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 64, 128, 4096])
def test_fp16_and_bf16_configs_are_unchanged_on_sm86(sm86, dtype, T):
    assert configs(T, dtype=dtype) == heuristic_configs(T, 2, 4, (8, 6))
    assert configs(T, dtype=dtype, sum_in_gemm2=True) == heuristic_configs(T, 2, 4, (8, 6), sum_in_gemm2=True)


def test_the_capability_table_serves_where_torch_gives_no_figure(sm86, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: types.SimpleNamespace())
    gemm_configs.clear_cache()
    assert gemm_configs.shared_limit(CUDA0) == ((8, 6), SM86_SHARED)
    assert configs(1, dtype=torch.float32)[0].num_stages == 3
    assert shared_memory.capability_shared_bytes((8, 9)) == shared_memory.capability_shared_bytes(120) == SM86_SHARED
    assert (
        shared_memory.capability_shared_bytes((9, 0)) == 227 * 1024
        and shared_memory.capability_shared_bytes(80) == 163 * 1024
    )
    assert shared_memory.capability_shared_bytes((13, 0)) == SM86_SHARED  # unknown: the smallest of sm_80 and newer


def test_sm80_fits_an_fp32_table_entry_and_hopper_keeps_every_heuristic_config():
    """sm_80's 163 KB: 64x64x128 in 4 fp32 stages (196,608 B) goes to 3; sm_90's 227 KB takes every heuristic config
    as it is, in every dtype (wgmma's extra buffer counted at 64 rows and more)."""
    g1 = GemmConfig(64, 64, 128, num_stages=4)
    fitted = shared_memory.fit_shared_memory(g1, 163 * 1024, 4, (8, 0))
    assert fitted == replace(g1, num_stages=3)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        element = torch.finfo(dtype).bits // 8
        for T in (1, 64, 128, 4096):
            for sums in (False, True):
                for cfg in heuristic_configs(T, 2, 4, (9, 0), sum_in_gemm2=sums, dtype=dtype):
                    assert shared_memory.fit_shared_memory(cfg, 227 * 1024, element, (9, 0)) is cfg


def test_fitting_shrinks_the_tile_when_one_stage_is_too_many():
    cfg = GemmConfig(128, 128, 64, num_warps=8, num_stages=3)
    fitted = shared_memory.fit_shared_memory(cfg, 40_000, 4, (8, 6))
    assert fitted.block_m == 128 and _need(fitted, torch.float32) <= 40_000
    # one stage of 128x128x64 fp32 is 64 KB: K tiles of 32, in the most stages that fit (2: one buffer of 32 KB)
    assert (fitted.block_n, fitted.block_k, fitted.num_stages) == (128, 32, 2)
    # fp16: the epilogue's fp32 [128, N] tile alone is 64 KB at N = 128: K tiles down to 16, then N tiles of 64
    fp16 = shared_memory.fit_shared_memory(cfg, 40_000, 2, (8, 6))
    assert (fp16.block_n, fp16.block_k, fp16.num_stages) == (64, 16, 3)
    assert shared_memory.fit_shared_memory(cfg, 1, 4, (8, 6)) == GemmConfig(128, 16, 16, num_warps=8, num_stages=1)


def test_a_tuned_fp32_entry_over_sm86s_shared_memory_is_rejected(sm86):
    """A table's entry is checked by the same estimate: 128x128x64 in 3 fp32 stages (131,072 B) cannot have run on a
    99 KB GPU, so its bucket takes the fitted heuristic; 16x64x128 in 3 stages (81,920 B) stays."""
    table = _table()
    fp32 = table["configs"]["float32"] = table["configs"].pop("bfloat16")
    fp32["1"]["1"]["config"] = fp32["2"]["1"]["config"] = _cfg(16, 64, 128, num_stages=3)
    fp32["1"]["4096"]["config"] = fp32["2"]["4096"]["config"] = _cfg(128, 128, 64, num_warps=8, num_stages=3)
    for bucket in ("1", "2"):
        fp32[bucket].pop("64")
    sm86(table)
    with pytest.warns(RuntimeWarning, match="need 131072 B of shared memory, which exceeds the GPU's 101376 B"):
        assert configs(4096, dtype=torch.float32) == (gemm_configs.FP32_PREFILL,) * 2
    assert configs(1, dtype=torch.float32) == (GemmConfig(16, 64, 128, num_stages=3),) * 2


@pytest.mark.parametrize("capability", [80, 86, 89, 90])
def test_every_launch_fused_moe_records_fits_the_targets_shared_memory(monkeypatch, capability):
    """Every grouped GEMM launch of fused_moe (float, quantized, its backward) at phixtral's shape, as recorded on meta
    tensors for the target (what `python -m phixtral_kernels.aot` compiles), within the target's limit by the estimate;
    the quantized ones fitted at launch, with their packing."""
    from phixtral_kernels.launches import record_backward_launches, record_launches

    monkeypatch.setattr(gemm_configs, "INTERPRET", False)
    limit = shared_memory.capability_shared_bytes(capability)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        launches = []
        for T in (1, 64, 128, 4096):
            for quant in ("", "w4g128za", "w8c"):
                launches += record_launches(T, dtype, 2560, 10240, 4, 2, quant=quant, capability=capability)
        launches += record_backward_launches(4096, dtype, 2560, 10240, 4, 2, capability=capability)
        gemms = [launch for launch in launches if launch.kernel.__name__ == "_grouped_gemm_kernel"]
        assert len(gemms) == 4 * 8 + 3  # per T: 2 float, 3 of each scheme (the Linear too); the backward's 3
        for launch in gemms:
            kw, a, c = launch.kwargs, launch.args[0], launch.args[6]
            need = gemm_shared_bytes(
                kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["num_stages"], kw["num_warps"], a.element_size(),
                divmod(capability, 10), w_bits=kw["W_BITS"], act_order=kw["HAS_G_IDX"], group_size=kw["GROUP_SIZE"],
                zeros=kw["HAS_ZEROS"], scale_bytes=launch.args[2].element_size(), out_bytes=c.element_size(),
            )  # fmt: skip
            assert need <= limit, (
                capability,
                dtype,
                {k: kw[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_stages")},
            )
