"""`phixtral quantize`: RTN and GPTQ into AutoGPTQ's v1 layout, written atomically, loaded back by from_pretrained."""

import json

import pytest
import torch
from helpers_models import (
    _corpus,
    dequantize_gptq_tensors,
    gptq_codes,
    msft_moe_checkpoint,
    read_tensors,
    reference_phixtral_forward,
)

import phixtral
from phixtral.cli import main
from phixtral.commands.evaluate import evaluate
from phixtral.commands.quantize import gptq_quantize
from phixtral.commands.stdlib_data import slice_texts
from phixtral.quant import GPTQConfig, QuantizedExpertLinear, quantize_model_rtn
from phixtral_kernels import dequantize_experts, quantize_rtn

IDS = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))


def _quantize(out, *args):
    return main(["quantize", "--model", str(msft_moe_checkpoint()), "--out", str(out), "--no-progress", *args])


def test_rtn_round_trip(tmp_path, capsys):
    """quantize -> load: the logits of the model computed from the dequantized files (fp32), and near the float
    model."""
    assert _quantize(tmp_path / "q", "--bits", "8", "--group-size", "32", "--no-sym") == 0
    assert "8-bit rtn, group size 32" in capsys.readouterr().err
    folder = tmp_path / "q"
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"], qc["quant_method"]) == (
        8,
        32,
        False,
        False,
        "gptq",
    )
    assert json.loads((folder / "quantize_report.json").read_text())["method"] == "rtn"
    tensors = read_tensors(folder)
    assert tensors["transformer.h.0.moe.mlp.3.fc2.qweight"].shape == (256 * 8 // 32, 64)
    assert (
        tensors["transformer.h.0.moe.gate.weight"].dtype == torch.float32
    )  # the source's dtype; the router stays float
    cfg = json.loads((folder / "config.json").read_text())
    model = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch")
    assert isinstance(model.h[1].moe.fc2, QuantizedExpertLinear)
    logits = model(IDS)
    torch.testing.assert_close(
        logits, reference_phixtral_forward(dequantize_gptq_tensors(tensors, 8), cfg, IDS), rtol=0, atol=1e-4
    )
    float_model = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", dtype="float32", backend="torch")
    rms = float((logits - float_model(IDS)).pow(2).mean().sqrt())
    assert rms < 0.02, rms  # logits of std 0.8; measured 0.0094 at 8 bits (0.19 at 4 bits)


# quantize_config.json as AutoGPTQ 0.7's BaseQuantizeConfig.to_dict() writes it, for 4 bits, groups of 32, zero points.
AUTOGPTQ_QUANTIZE_CONFIG = {
    "bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": False, "static_groups": False, "sym": False,
    "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model", "quant_method": "gptq",
    "checkpoint_format": "gptq",
}  # fmt: skip


@pytest.mark.parametrize("source_dtype", ["float32", "bfloat16"])
def test_output_read_by_an_independent_reader_is_the_rtn_of_the_float_weights(tmp_path, source_dtype):
    """The files as AutoGPTQ's v1 convention has them (int32 words, fp16 scales whatever the source dtype, g_idx
    k // group_size, AutoGPTQ's quantize_config.json), decoded by helpers_models' reader of the format (no phixtral
    code): each group's grid is the one its float weights' range gives, and each code the nearest point of it."""
    source = msft_moe_checkpoint()
    if source_dtype != "float32":
        source = tmp_path / source_dtype
        model = phixtral.from_pretrained(msft_moe_checkpoint(), dtype=source_dtype, backend="torch")
        model.save_pretrained(source, dtype=source_dtype)
    folder = tmp_path / "q"
    assert main(["quantize", "--model", str(source), "--out", str(folder), "--no-progress", "--bits", "4",
                 "--group-size", "32", "--no-sym"]) == 0  # fmt: skip
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert qc == AUTOGPTQ_QUANTIZE_CONFIG
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == qc
    floats, tensors = read_tensors(source), read_tensors(folder)
    dtype = getattr(torch, source_dtype)
    modules = [n.removesuffix(".qweight") for n in tensors if n.endswith(".qweight")]
    assert len(modules) == 2 * (2 + 2 * 4)  # per layer Wqkv, out_proj and the 4 experts' fc1, fc2
    for m in modules:
        N, K = floats[m + ".weight"].shape
        expected = {
            "qweight": (torch.int32, (K // 8, N)), "qzeros": (torch.int32, (K // 32, N // 8)),
            "scales": (torch.float16, (K // 32, N)), "g_idx": (torch.int32, (K,)), "bias": (dtype, (N,)),
        }  # fmt: skip
        for suffix, (want_dtype, shape) in expected.items():
            t = tensors[f"{m}.{suffix}"]
            assert (t.dtype, tuple(t.shape)) == (want_dtype, shape), f"{m}.{suffix}"
        assert torch.equal(tensors[m + ".g_idx"], torch.arange(K, dtype=torch.int32) // 32)
        assert torch.equal(tensors[m + ".bias"], floats[m + ".bias"])
    assert all(t.dtype == dtype for n, t in tensors.items() if n.endswith(".weight")), "unpacked tensors keep the dtype"
    for m in modules:
        q, zero, scale, g_idx = gptq_codes(tensors, m, 4)  # [K, N], [G, N], [G, N], [K]
        w = floats[m + ".weight"].float().t()  # [K, N]
        groups = w.view(-1, 32, w.shape[1])  # [G, 32, N]
        lo, hi = groups.amin(1).clamp(max=0), groups.amax(1).clamp(min=0)  # each group's range widened to 0
        # The grid: 15 steps over the range (14 when it does not straddle 0), the step rounded to fp16; the zero point
        # the code of 0.0, never 0 (v1 stores zero - 1).
        assert torch.all((scale >= (hi - lo) / 15 * (1 - 2**-10)) & (scale <= (hi - lo) / 14 * (1 + 2**-10))), m
        assert torch.equal(zero, torch.round(-lo / scale).clamp(1, 15).long()), m
        # Each code the nearest point of that grid (clamped to its 16 codes).
        assert torch.equal(q, torch.clamp(torch.round(w / scale[g_idx]) + zero[g_idx], 0, 15).long()), m


@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_halves_the_output_error_of_rtn_on_one_linear(group_size, act_order):
    """One Linear [96, 256] on correlated inputs: || X (W_q - W)^T ||^2, GPTQ against RTN of the same grid.
    Measured: 0.19 vs 0.38 (groups of 32), 0.34 vs 0.70 (per channel); act-order 5-6% lower still."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.3
    w = torch.randn(96, 256, generator=g) * 0.1
    gptq = GPTQConfig(bits=4, group_size=group_size, desc_act=act_order, sym=False)
    q, scale, zero, g_idx, _ = gptq_quantize(w, 2 * X.t() @ X / X.shape[0], gptq)
    assert (g_idx is not None) == act_order  # per channel with act-order: all zeros, as AutoGPTQ writes it
    groups = g_idx.long() if g_idx is not None else torch.arange(256) // (256 // scale.shape[0])
    assert torch.all((q >= 0) & (q <= 15)) and torch.all(zero >= 1)
    w_gptq = (scale[groups] * (q - zero[groups])).t()
    w_rtn = dequantize_experts(quantize_rtn(w, 4, group_size, sym=False), torch.float32)[0]
    error = lambda wq: float(((X @ (wq - w).t()) ** 2).mean())  # noqa: E731
    assert error(w_gptq) < 0.6 * error(w_rtn)


def test_gptq_beats_rtn_on_its_calibration_text(tmp_path):
    """4-bit, groups of 32, act-order, calibrated on a text file: the logits on that kind of text err less than
    RTN's."""
    calib = tmp_path / "calib.txt"
    calib.write_text(_corpus())
    args = [
        "--bits",
        "4",
        "--group-size",
        "32",
        "--no-sym",
        "--calib",
        str(calib),
        "--calib-samples",
        "8",
        "--calib-seq-len",
        "64",
    ]
    assert _quantize(tmp_path / "gptq", *args, "--method", "gptq", "--act-order") == 0
    assert _quantize(tmp_path / "rtn", *args) == 0
    float_model = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", dtype="float32", backend="torch")
    ids = torch.tensor(float_model.tokenizer(_corpus()[-4000:])["input_ids"][:128]).view(2, 64)
    want = float_model(ids)
    errors = {}
    for method in ("gptq", "rtn"):
        model = phixtral.from_pretrained(tmp_path / method, device="cpu", dtype="float32", backend="torch")
        errors[method] = float((model(ids) - want).pow(2).mean())
    assert model.quantization.desc_act is False
    gptq = phixtral.from_pretrained(tmp_path / "gptq", device="cpu", dtype="float32", backend="torch")
    assert gptq.quantization.desc_act and gptq.h[0].moe.fc1.g_idx is not None
    assert errors["gptq"] < errors["rtn"] / 2, errors  # measured: 7-9x lower
    report = json.loads((tmp_path / "gptq" / "quantize_report.json").read_text())
    assert report["method"] == "gptq" and set(report["errors"]) >= {"h.0.mixer.Wqkv", "h.1.moe.fc2"}


def test_refuses_its_source_and_bad_settings(tmp_path, capsys):
    source = msft_moe_checkpoint()
    before = sorted(p.name for p in source.iterdir())
    assert main(["quantize", "--model", str(source), "--bits", "4", "--out", str(source), "--overwrite"]) == 1
    assert "refusing to write" in capsys.readouterr().err
    assert sorted(p.name for p in source.iterdir()) == before
    assert _quantize(tmp_path / "a", "--bits", "4", "--act-order") == 1
    assert "--act-order orders columns by the calibration Hessian: it needs --method gptq" in capsys.readouterr().err
    assert _quantize(tmp_path / "b", "--bits", "4", "--group-size", "48") == 1
    assert "--group-size 48 does not divide" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _quantize(tmp_path / "c", "--bits", "3")
    assert exit_info.value.code == 2
    assert "phixtral quantize: error: argument --bits: invalid choice: 3 (choose from 4, 8)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing written"


def test_int8_perplexity_of_the_bundled_model_within_one_percent():
    """The bundled tiny phixtral (fp16 weights, run in fp32): 8-bit RTN, groups of 128, on 1024 held-out tokens (the
    whole held-out set, 106.7k tokens, gives 76.82 for both: README)."""
    model = phixtral.from_pretrained(phixtral.default_model_path(), device="cpu", dtype="float32", backend="torch")
    texts = slice_texts("asyncio", "heldout")[:4]  # the first 1024 tokens are scored
    before = evaluate(model, texts, max_tokens=1024, seq_len=256, progress=False).perplexity
    quantize_model_rtn(model, GPTQConfig(bits=8, group_size=128))
    after = evaluate(model, texts, max_tokens=1024, seq_len=256, progress=False).perplexity
    assert abs(after / before - 1) < 0.01, (before, after)
