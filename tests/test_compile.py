"""Every kernel compiles ahead of time for sm_80, sm_86, sm_89 and sm_90 at phixtral shapes: tensor cores used, nothing
spilled, shared memory within each GPU's limit and equal to (quantized: at most) the estimate the configs are fitted by.
sm_75 (T4) is in the report for information: no tensor cores there, which is why the kernels are gated off below sm_80.

Each test compiles only what it adds: sm_80 / sm_90 in fp16 / bf16 (forward, backward, quantized, TMA), sm_86 / sm_89
in every dtype (forward), where 99 KB of shared memory a block is what fp32 tiles must fit."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _report(*args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """`python -m phixtral_kernels.aot ... --json`: (its JSON report, the process)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiling needs the real JIT functions
    proc = subprocess.run(
        [sys.executable, "-m", "phixtral_kernels.aot", *args, "--json"], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


def _assert_shared_memory_as_estimated(rows: list) -> None:
    """Every row within its target's limit; every grouped GEMM's compiled shared memory equal to the estimate its
    config was fitted by (float weights), or under it by less than 1.6x (quantized: an upper bound)."""
    for r in rows:
        assert 0 <= r["shared_bytes"] <= r["shared_limit"], r
        if r["kernel"] != "grouped_gemm_kernel":
            assert r["shared_estimate"] is None, r
        elif " w4" in r["variant"] or " w8" in r["variant"]:
            assert r["shared_bytes"] <= r["shared_estimate"] < 1.6 * r["shared_bytes"], r
        else:
            assert r["shared_bytes"] == r["shared_estimate"], r


def test_kernels_compile_for_sm80_and_sm90_with_tensor_cores_and_no_spills():
    report, proc = _report("--archs", "80", "90", "--tokens", "1", "64", "128", "4096")
    assert "aot: compiled 1/" in proc.stderr, "no progress lines on stderr"
    rows = [r for r in report["rows"] if not r["info_only"]]
    info = [r for r in report["rows"] if r["info_only"]]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in rows} == {"float16", "bfloat16"}
    kernels = {"fused_routing_kernel", "topk_softmax_kernel", "align_kernel", "grouped_gemm_kernel", "combine_kernel"}
    assert {r["kernel"] for r in rows} == kernels
    gemms = [r for r in rows if r["kernel"] == "grouped_gemm_kernel"]
    assert len(gemms) == 2 * 4 * 2 * 2  # gemm1 and gemm2, 4 token counts, 2 dtypes, 2 archs
    assert len({r["variant"] for r in gemms}) == 2 * (4 + 1), (
        "one GEMM config per token count, and sm_90's prefill tiles"
    )
    # T = 1 takes the decode chain: one-program routing, GEMM 1, GEMM 2 summing each token's rows (no combine)
    decode = [r for r in rows if r["tokens"] == 1]
    assert sorted({(r["kernel"], r["variant"].split(" ")[0]) for r in decode}) == [
        ("fused_routing_kernel", ""), ("grouped_gemm_kernel", "gemm1"), ("grouped_gemm_kernel", "gemm2+sum")
    ]  # fmt: skip
    assert len(decode) == 3 * 2 * 2 and all(r["tensor_core"] for r in decode), decode
    missing_tc = [r for r in gemms if not r["tensor_core"]]
    assert not missing_tc, f"no mma/wgmma in: {missing_tc}"
    # Prefill (T=4096): 128x256x64 tiles of wgmma on sm_90, 128x128 on sm_80; no TMA unless asked for.
    prefill = {(r["arch"], r["variant"].split()[1]) for r in gemms if r["tokens"] == 4096}
    assert prefill == {("sm_90", "128x256x64"), ("sm_80", "128x128x64")}, prefill
    # wgmma wants 64-row tiles per warpgroup: the decode tiles (16 and 32 rows) run mma.sync on sm_90 too.
    big = [r for r in gemms if r["arch"] == "sm_90" and int(r["variant"].split()[1].split("x")[0]) >= 64]
    assert len(big) == 2 * 2 * 2 and all(r["wgmma"] > 0 for r in big), big
    assert not any(r["wgmma"] for r in gemms if r["arch"] == "sm_80")
    assert not any(r["tma"] for r in rows)
    spills = [r for r in rows if r["spill_bytes"]]
    assert not spills, f"register spills in: {spills}"
    assert {r["arch"]: r["shared_limit"] for r in rows} == {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    _assert_shared_memory_as_estimated(rows)
    # sm_75: reported, fp16 only (no bf16 there), never counted as a problem whatever it shows.
    assert {r["arch"] for r in info} == {"sm_75"} and {r["dtype"] for r in info} == {"float16"}
    assert len([r for r in info if r["kernel"] == "grouped_gemm_kernel"]) == 2 * 4
    assert report["problems"] == 0 and proc.returncode == 0


def test_backward_kernels_compile_with_tensor_cores_and_no_spills():
    """fused_moe's backward launches (GEMMs over transposed weight views, the row pass, the combine, the weight
    gradients), decode and prefill."""
    report, proc = _report("--backward", "--archs", "80", "90", "--tokens", "1", "4096", "--dtypes", "bfloat16")
    rows = [r for r in report["rows"] if not r["info_only"]]
    assert {r["kernel"] for r in rows} == {
        "grouped_gemm_kernel",
        "act_backward_kernel",
        "combine_kernel",
        "weight_grad_kernel",
    }
    gemms = {r["variant"].split()[0] for r in rows if r["kernel"] == "grouped_gemm_kernel"}
    assert gemms == {"grad_hidden", "preact", "grad_input"}
    assert all(r["tensor_core"] for r in rows if r["kernel"] in ("grouped_gemm_kernel", "weight_grad_kernel"))
    assert not [r for r in rows if r["spill_bytes"]]
    _assert_shared_memory_as_estimated(rows)
    assert report["problems"] == 0 and proc.returncode == 0


def test_quantized_gemms_compile_with_tensor_cores_and_no_spills():
    """fused_moe on 4-bit act-order experts (GEMM 1 looks up every element's group; GEMM 2's act-order absorbed at load)
    and on 8-bit per-channel experts, plus the quantized dense Linear, decode and prefill, bf16."""
    report, proc = _report(
        "--quant", "w4g128za", "w8c", "--archs", "80", "90", "--tokens", "1", "4096", "--dtypes", "bfloat16"
    )
    rows = report["rows"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}, "no sm_75 rows: the kernels are gated off there"
    gemms = [r for r in rows if r["kernel"] == "grouped_gemm_kernel"]
    variants = {r["variant"].split()[0] + " " + r["variant"].split()[-1] for r in gemms}
    # gemm2+sum: T = 1, the decode chain's GEMM 2, which sums each token's rows itself
    assert variants == {
        "gemm1 w4g128za", "gemm2 w4g128z", "gemm2+sum w4g128z", "linear w4g128za",
        "gemm1 w8c", "gemm2 w8c", "gemm2+sum w8c", "linear w8c",
    }  # fmt: skip
    assert len(gemms) == 3 * 2 * 2 * 2  # gemm1, gemm2, linear x 2 schemes x 2 token counts x 2 archs
    assert all(r["tensor_core"] for r in gemms), [r for r in gemms if not r["tensor_core"]]
    assert not [r for r in rows if r["spill_bytes"]], [r for r in rows if r["spill_bytes"]]
    _assert_shared_memory_as_estimated(rows)
    assert report["problems"] == 0 and proc.returncode == 0


@pytest.mark.skipif(
    not hasattr(pytest.importorskip("triton.language"), "make_tensor_descriptor"),
    reason="this triton has no tl.make_tensor_descriptor (3.3): the TMA flag is ignored there",
)
def test_sm90_prefill_with_tma_weight_loads_compiles_to_wgmma_and_tma_copies():
    """GemmConfig.tma on the prefill launches: the sm_90 PTX of both GEMMs holds wgmma and cp.async.bulk.tensor, within
    the shared memory and without spills. (sm_80, which has no TMA, compiles them to mma.sync and plain loads:
    `python -m phixtral_kernels.aot --tma` shows it; left out here to keep the test short.)"""
    report, proc = _report("--tma", "--archs", "90", "--tokens", "4096", "--dtypes", "bfloat16")
    assert {r["arch"] for r in report["rows"]} == {"sm_90"}
    gemms = {r["variant"].split()[0]: r for r in report["rows"] if r["kernel"] == "grouped_gemm_kernel"}
    assert set(gemms) == {"gemm1", "gemm2"}
    for r in gemms.values():
        assert r["variant"].split()[1:] == ["128x256x64", "split1", "tma"] and r["tma_requested"], r
        assert r["wgmma"] > 0 and r["tma"] > 0 and r["spill_bytes"] == 0 and r["shared_bytes"] <= 227 * 1024, r
    _assert_shared_memory_as_estimated(report["rows"])
    assert report["problems"] == 0 and proc.returncode == 0


def test_sm86_and_sm89_fit_their_99_kb_in_every_dtype():
    """RTX 30xx / 40xx, A10, L4, L40 (sm_86, sm_89): 99 KB of shared memory a block. Decode (T = 1: the decode chain)
    and prefill (T = 4096) in fp32, fp16 and bf16 within it, as estimated; tensor cores in fp16 / bf16; no spills. fp32
    takes fewer stages than on sm_80 at decode (3 and 5 for 4 and 6) and FP32_PREFILL's 16-deep K steps at prefill."""
    report, proc = _report("--archs", "86", "89", "--tokens", "1", "4096", "--dtypes", "float32", "float16", "bfloat16")
    rows = report["rows"]
    assert {(r["arch"], r["shared_limit"]) for r in rows} == {("sm_86", 99 * 1024), ("sm_89", 99 * 1024)}
    assert {r["dtype"] for r in rows} == {"float32", "float16", "bfloat16"}
    gemms = [r for r in rows if r["kernel"] == "grouped_gemm_kernel"]
    assert len(gemms) == 2 * 2 * 3 * 2  # gemm1 and gemm2, decode and prefill, 3 dtypes, 2 archs
    _assert_shared_memory_as_estimated(rows)
    assert all(r["tensor_core"] for r in gemms if r["dtype"] != "float32")
    assert not [r for r in rows if r["spill_bytes"]], [r for r in rows if r["spill_bytes"]]
    fp32 = {
        (r["tokens"], r["variant"].split()[0]): (r["variant"].split()[1], r["num_stages"])
        for r in gemms
        if r["dtype"] == "float32"
    }
    assert fp32 == {(1, "gemm1"): ("16x64x128", 3), (1, "gemm2+sum"): ("16x32x128", 5),
                    (4096, "gemm1"): ("128x128x16", 4), (4096, "gemm2"): ("128x128x16", 4)}  # fmt: skip
    assert report["problems"] == 0 and proc.returncode == 0
