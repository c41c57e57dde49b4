"""phixtral.quant's registry: a format defined here, in the test, loads and saves through phixtral/weights.py unchanged;
the old import paths of the moved names still work."""

import importlib
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers_models import msft_moe_checkpoint, read_tensors, reference_phixtral_forward, write_checkpoint

import phixtral
from phixtral import layouts, quant
from phixtral.layouts import Target
from phixtral.model import ExpertLinear

IDS = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(3))
DENSE = (".mixer.Wqkv.weight", ".mixer.out_proj.weight")  # the Linears the toy format runs packed


class ToyInt8Linear(nn.Module):
    """int8 rows and one scale per row: y = x @ (q * scale)^T + b."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.register_buffer("qweight8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("wscale", torch.zeros(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return F.linear(x, self.qweight8.to(x.dtype) * self.wscale[:, None].to(x.dtype), self.bias)


@dataclass(frozen=True)
class ToyInt8(quant.QuantFormat):
    """A second format: `<module>.qweight8` int8 [N, K] and `<module>.wscale` [N] per quantized Linear, named by
    config.json's quantization_config alone. Wqkv and out_proj run packed; the experts load dequantized."""

    method = "toy_int8"
    label = "toy"
    int_dtype_name = "int8"

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ToyInt8":
        return cls()

    def to_dict(self) -> dict:
        return {"quant_method": self.method}

    @classmethod
    def missing_settings_error(cls, mapping, present):
        packed = sorted(n for n in present if n.endswith(".qweight8"))
        return f"{packed[0]} is toy-packed but config.json has no quantization_config" if packed else None

    def checkpoint_map(self, mapping, present):
        out, packed = {}, {}
        for name, t in mapping.items():
            module = name.removesuffix(".weight")
            if module == name or module + ".qweight8" not in present:
                out[name] = t
                continue
            N, K = t.shape
            dst = t.param.removesuffix(".weight")
            if t.param.endswith(DENSE) and not t.index:
                packed[dst] = (1, N, K)
                out[module + ".qweight8"] = Target(dst + ".qweight8", (), (N, K), kind="int")
                out[module + ".wscale"] = Target(dst + ".wscale", (), (N,))
            else:
                out[module + ".qweight8"] = Target(t.param, t.index, (N, K), kind="int", stage=module)
                out[module + ".wscale"] = Target(t.param, t.index, (N,), stage=module)
        return out, packed

    def int_dtypes(self, name: str) -> tuple:
        return ("I8",)

    def prepare(self, model, packed):
        for name, (_, N, K) in packed.items():
            with torch.device(model.device):
                model.set_submodule(name, ToyInt8Linear(N, K).to(model.dtype))
        model.quantization = self if packed else None

    def check_tensor(self, name, tensor, mapping):
        if name.endswith(".wscale") and bool((tensor <= 0).any()):
            raise ValueError(f"{name}: scales must be positive")

    def dequantize(self, module, tensors, dtype):
        return (tensors["qweight8"].float() * tensors["wscale"].float()[:, None]).to(dtype)

    def save_map(self, mapping, state):
        present = {n.removesuffix(".weight") + ".qweight8" for n, t in mapping.items()
                   if t.param.removesuffix(".weight") + ".qweight8" in state}  # fmt: skip
        return self.checkpoint_map(mapping, present)[0]


@pytest.fixture
def toy_format():
    quant.register_format(ToyInt8)
    yield ToyInt8
    quant.unregister_format(ToyInt8.method)


def toy_checkpoint(folder: Path, *, negative_scale: bool = False) -> tuple[Path, dict]:
    """msft_moe_checkpoint with every Linear but the router and lm_head quantized to int8 rows; returns the folder and
    the float tensors it means (dequantized)."""
    source = msft_moe_checkpoint()
    tensors, meant = {}, {}
    for name, t in read_tensors(source).items():
        if name.endswith((".fc1.weight", ".fc2.weight") + DENSE):
            scale = t.float().abs().amax(1) / 127
            q = torch.round(t.float() / scale[:, None]).to(torch.int8)
            module = name.removesuffix(".weight")
            tensors[module + ".qweight8"], tensors[module + ".wscale"] = q, scale
            meant[name] = q.float() * scale[:, None]
        else:
            tensors[name] = meant[name] = t
    if negative_scale:
        tensors["transformer.h.1.mixer.out_proj.wscale"][3] = -1.0
    cfg = json.loads((source / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "toy_int8"}
    write_checkpoint(folder, tensors, cfg, n_shards=2, tokenizer=False)
    return folder, meant


def test_a_format_defined_outside_the_package_loads_and_saves(tmp_path, toy_format):
    folder, meant = toy_checkpoint(tmp_path / "toy")
    cfg = json.loads((folder / "config.json").read_text())
    model = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch")
    assert isinstance(model.quantization, ToyInt8)
    assert isinstance(model.h[0].mixer.Wqkv, ToyInt8Linear) and model.h[0].mixer.Wqkv.qweight8.dtype == torch.int8
    assert isinstance(model.h[0].moe.fc1, ExpertLinear), "staged: dequantized into the stacked float weight"
    want = reference_phixtral_forward(meant, cfg, IDS)
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=1e-4)

    model.save_pretrained(tmp_path / "again")
    again = read_tensors(tmp_path / "again")
    assert again["transformer.h.1.mixer.Wqkv.qweight8"].dtype == torch.int8
    assert "transformer.h.1.mixer.Wqkv.weight" not in again and "transformer.h.1.moe.mlp.2.fc1.weight" in again
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == {
        "quant_method": "toy_int8"
    }
    reloaded = phixtral.from_pretrained(tmp_path / "again", device="cpu", dtype="float32", backend="torch")
    torch.testing.assert_close(reloaded(IDS), model(IDS), rtol=0, atol=1e-6)


def test_a_format_checks_its_tensors_and_its_settings(tmp_path, toy_format):
    bad, _ = toy_checkpoint(tmp_path / "bad", negative_scale=True)
    with pytest.raises(ValueError, match="transformer.h.1.mixer.out_proj.wscale: scales must be positive"):
        phixtral.from_pretrained(bad, device="cpu", dtype="float32", backend="torch")
    cfg = json.loads((bad / "config.json").read_text())
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"qweight8 is toy-packed but config.json has no quantization_config"):
        phixtral.from_pretrained(bad, device="cpu", dtype="float32", backend="torch")


def test_an_unregistered_format_is_refused_by_name(tmp_path):
    folder, _ = toy_checkpoint(tmp_path / "toy")
    with pytest.raises(ValueError, match=r"quant_method 'toy_int8' is not supported \(only 'gptq'\)"):
        phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch")
    with pytest.raises(TypeError, match="a format is a QuantFormat subclass"):
        quant.register_format(ToyInt8Linear)


def test_weights_reaches_formats_through_the_registry_only():
    weights = importlib.import_module("phixtral.weights")
    names = set(vars(weights))
    assert "gptq" not in names and not names & {"GPTQConfig", "quantized_map", "check_g_idx", "finish_quantized"}


# --- old homes --------------------------------------------------------------------------------------------------------
def test_moved_names_stay_importable_from_their_old_homes():
    sys.modules.pop("phixtral.gptq", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gptq = importlib.import_module("phixtral.gptq")
    assert any(issubclass(w.category, DeprecationWarning) and "phixtral.quant" in str(w.message) for w in caught)
    assert gptq.GPTQConfig is quant.GPTQConfig and gptq.quantize_model_rtn is quant.quantize_model_rtn
    assert gptq.read_quantization_config is quant.read_quantization_config
    from phixtral.commands.quantize import gptq_quantize, quantize_model_gptq
    from phixtral.model import ATTENTION_UPCAST, QuantizedExpertLinear, QuantizedLinear, quantized_module
    from phixtral.weights import INDEX_FILE, LAYOUTS, Target, checkpoint_map, detect_layout, read_json

    assert (QuantizedLinear, QuantizedExpertLinear, quantized_module) == (
        quant.QuantizedLinear, quant.QuantizedExpertLinear, quant.quantized_module)  # fmt: skip
    assert (gptq_quantize, quantize_model_gptq) == (quant.gptq_quantize, quant.quantize_model_gptq)
    assert (INDEX_FILE, LAYOUTS, Target, checkpoint_map, detect_layout, read_json) == (
        layouts.INDEX_FILE, layouts.LAYOUTS, layouts.Target, layouts.checkpoint_map, layouts.detect_layout,
        layouts.read_json)  # fmt: skip
    assert ATTENTION_UPCAST == ("fp32", "scores")
