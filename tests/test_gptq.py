"""GPTQ checkpoints (AutoGPTQ v1 layout): found by from_pretrained by themselves, loaded into packed modules, run
through the kernels, checked against the model computed from the dequantized tensors, written back in the same layout;
bad tensors and settings give a ValueError naming them."""

import json
from pathlib import Path

import pytest
import torch
from helpers_models import (
    dequantize_gptq_tensors,
    gptq_moe_checkpoint,
    read_tensors,
    reference_phixtral_forward,
    write_checkpoint,
)

import phixtral
from phixtral.model import ExpertLinear
from phixtral.quant import QuantizedExpertLinear, QuantizedLinear
from phixtral_kernels import quantize_rtn
from phixtral_kernels.quant import pack_cols

IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))
SCHEMES = {
    "w4_g32_zeros_act_order": (4, 32, False, True),
    "w8_per_channel_sym": (8, -1, True, False),
    "w4_g16_sym_act_order": (4, 16, True, True),
}


def _reference_logits(folder: Path, bits: int) -> torch.Tensor:
    """The phixtral forward of the checkpoint's tensors dequantized from the format's definition, in fp32."""
    cfg = json.loads((folder / "config.json").read_text())
    return reference_phixtral_forward(dequantize_gptq_tensors(read_tensors(folder), bits), cfg, IDS)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_gptq_checkpoint_logits_match_the_dequantized_model(scheme):
    bits, group_size, sym, act_order = SCHEMES[scheme]
    folder = gptq_moe_checkpoint(bits, group_size, sym, act_order)
    want = _reference_logits(folder, bits)
    model = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch")
    assert model.quantization.bits == bits and model.quantization.desc_act == act_order
    block = model.h[0]
    assert isinstance(block.mixer.Wqkv, QuantizedLinear) and isinstance(block.mixer.out_proj, QuantizedLinear)
    assert isinstance(block.moe.fc1, QuantizedExpertLinear) and isinstance(block.moe.fc2, QuantizedExpertLinear)
    assert block.moe.gate.weight.dtype == torch.float32  # the router stays float
    assert (block.moe.fc1.qzeros is None) == sym, "symmetric zero points are dropped at load"
    assert block.moe.fc2.g_idx is None, "fc2's act-order is absorbed into the hidden units' order (or was trivial)"
    assert (block.moe.fc1.g_idx is not None) == act_order and (block.mixer.Wqkv.g_idx is not None) == act_order
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=1e-4)
    model.set_backend("triton")  # the grouped GEMM dequantizing in its K loop (interpreted on the CPU)
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=1e-4)


def test_generation_runs_on_a_gptq_checkpoint():
    model = phixtral.from_pretrained(gptq_moe_checkpoint(), device="cpu", dtype="float32", backend="torch")
    assert model.generate(IDS[:1, :4], max_new_tokens=3).shape == (1, 7)


def test_gptq_checkpoint_in_fp16_and_bf16():
    folder = gptq_moe_checkpoint(8, -1, True, False)
    want = _reference_logits(folder, 8)
    # Logits of std 0.8, |max| 3.75; measured max errors: fp16 0.0056, bf16 0.084 (CPU, torch 2.13).
    for dtype, atol in ((torch.float16, 0.015), (torch.bfloat16, 0.2)):
        model = phixtral.from_pretrained(folder, device="cpu", dtype=dtype, backend="torch")
        assert model.h[0].moe.fc1.scales.dtype == torch.float16, "GPTQ's fp16 scales stay fp16"
        torch.testing.assert_close(model(IDS), want, rtol=0, atol=atol)


def test_saved_again_it_is_still_a_gptq_checkpoint(tmp_path):
    """A loaded model (fc2's act-order absorbed, symmetric zeros dropped) writes a v1 layout again: every module with
    qzeros and g_idx, the same function."""
    folder = gptq_moe_checkpoint(4, 32, False, True)
    model = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch")
    model.save_pretrained(tmp_path / "again", dtype="float16")
    again = read_tensors(tmp_path / "again")
    assert again["transformer.h.1.moe.mlp.2.fc2.g_idx"].dtype == torch.int32
    assert again["transformer.h.1.moe.mlp.2.fc2.qzeros"].shape == (8, 64 * 4 // 32)
    assert json.loads((tmp_path / "again" / "quantize_config.json").read_text())["bits"] == 4
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    torch.testing.assert_close(
        _reference_logits(tmp_path / "again", 4), _reference_logits(folder, 4), rtol=0, atol=1e-4
    )
    reloaded = phixtral.from_pretrained(tmp_path / "again", device="cpu", dtype="float32", backend="torch")
    torch.testing.assert_close(reloaded(IDS), model(IDS), rtol=0, atol=1e-5)


def _copy(folder: Path, dst: Path, *, drop=(), replace=None, config=None, quantize_config=None) -> Path:
    """A copy of a checkpoint with tensors dropped or replaced and settings changed (quantize_config in both files;
    config overrides config.json's keys last), in one shard with an index."""
    tensors = {n: t for n, t in read_tensors(folder).items() if n not in drop}
    tensors.update(replace or {})
    cfg = json.loads((folder / "config.json").read_text())
    qc = json.loads((folder / "quantize_config.json").read_text())
    qc.update(quantize_config or {})
    cfg["quantization_config"] = qc  # both files agree unless `config` says otherwise
    cfg.update(config or {})
    write_checkpoint(dst, tensors, cfg, n_shards=1, tokenizer=False)
    (dst / "quantize_config.json").write_text(json.dumps(qc))
    return dst


def test_mixed_checkpoint_loads_quantized_where_it_can(tmp_path):
    """A quantized router (8-bit) and a layer whose experts are only partly quantized (expert 1's fc1 plain): both load
    as float weights, dequantized once; the rest stays packed."""
    folder = gptq_moe_checkpoint(8, -1, True, False)
    tensors = dequantize_gptq_tensors(read_tensors(folder), 8)
    p = "transformer.h.0."
    gate = quantize_rtn(tensors[p + "moe.gate.weight"], 8, -1, sym=False)
    zeros = pack_cols((gate.zero_points() - 1)[0], 8)
    replace = {
        p + "moe.gate.qweight": gate.qweight[0],
        p + "moe.gate.qzeros": zeros,
        p + "moe.gate.scales": gate.scales[0],
    }
    replace[p + "moe.mlp.1.fc1.weight"] = tensors[p + "moe.mlp.1.fc1.weight"].half()
    drop = [p + "moe.gate.weight"] + [p + f"moe.mlp.1.fc1.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")]
    mixed = _copy(folder, tmp_path / "mixed", drop=drop, replace=replace)
    model = phixtral.from_pretrained(mixed, device="cpu", dtype="float32", backend="torch")
    assert isinstance(model.h[0].moe.fc1, ExpertLinear) and isinstance(model.h[0].moe.fc2, QuantizedExpertLinear)
    assert isinstance(model.h[1].moe.fc1, QuantizedExpertLinear)
    torch.testing.assert_close(model(IDS), _reference_logits(mixed, 8), rtol=0, atol=1e-4)


def test_settings_from_config_json_alone(tmp_path):
    folder = gptq_moe_checkpoint(8, -1, True, False)
    qc = json.loads((folder / "quantize_config.json").read_text())
    only = _copy(folder, tmp_path / "only", config={"quantization_config": qc})
    (only / "quantize_config.json").unlink()
    assert phixtral.from_pretrained(only, device="cpu", dtype="float32", backend="torch").quantization.bits == 8


M = "transformer.h.1.moe.mlp.2.fc1"


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(drop=[M + ".qzeros"]), f"missing tensors \\(1\\): {M}.qzeros"),
        (
            dict(replace={M + ".qweight": torch.zeros(9, 256, dtype=torch.int32)}),
            f"{M}.qweight: expected \\(8, 256\\), got \\(9, 256\\)",
        ),
        (
            dict(replace={M + ".qweight": torch.zeros(8, 256)}),
            f"GPTQ tensors that are not int32 \\(1\\): {M}.qweight: F32",
        ),
        (
            dict(replace={M + ".g_idx": torch.full((64,), 7, dtype=torch.int32)}),
            f"{M}.g_idx: holds groups in \\[7, 7\\], outside \\[0, G=2\\)",
        ),
        (dict(drop=[M + ".g_idx"]), f"missing tensors \\(1\\): {M}.g_idx"),  # desc_act needs it
        (dict(quantize_config={"bits": 3}), "bits=3 is not supported"),
        (dict(quantize_config={"group_size": 48}), "group_size 48 does not divide its K=64"),
        (dict(quantize_config={"checkpoint_format": "gptq_v2"}), "checkpoint_format 'gptq_v2' is not supported"),
        (dict(config={"quantization_config": {"bits": 8, "group_size": 32, "quant_method": "gptq"}}), "disagree"),
    ],
)
def test_bad_gptq_checkpoints_name_the_tensor(tmp_path, change, words):
    bad = _copy(gptq_moe_checkpoint(4, 32, False, True), tmp_path / "bad", **change)
    with pytest.raises(ValueError, match=words):
        phixtral.from_pretrained(bad, device="cpu", dtype="float32", backend="torch")


def test_packed_tensors_without_settings(tmp_path):
    bad = _copy(gptq_moe_checkpoint(), tmp_path / "bad")
    (bad / "quantize_config.json").unlink()
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="qweight is GPTQ-packed but the checkpoint has neither quantize_config.json"):
        phixtral.from_pretrained(bad, device="cpu", dtype="float32", backend="torch")


def test_inspect_counts_packed_weights_and_merge_refuses_them():
    from helpers_models import msft_moe_checkpoint

    from phixtral.commands.inspect_model import checkpoint_summary
    from phixtral.commands.merge import RecipeError, check_source

    packed, plain = checkpoint_summary(gptq_moe_checkpoint()), checkpoint_summary(msft_moe_checkpoint())
    assert (packed["params_total"], packed["params_active"]) == (plain["params_total"], plain["params_active"])
    assert "GPTQ-4bit" in packed["dtypes"] and len(packed["gates"]) == 2
    with pytest.raises(RecipeError, match="is a GPTQ checkpoint"):
        check_source(gptq_moe_checkpoint(), "base_model")
