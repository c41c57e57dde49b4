"""Files and tensors that would corrupt silently are refused with one clear error: a save over the model's own source,
out-of-range group indices and non-finite scales in quantized Linears (from files, load_state_dict, set_weight or an
in-place write), and shard index entries that point outside the checkpoint folder."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers_models import gptq_moe_checkpoint, msft_moe_checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

import phixtral
from phixtral.quant.gptq_format import GPTQConfig, dequantize_staged

IDS = torch.tensor([[1, 2, 3, 4]])


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- save_pretrained and the model's own source ---------------------------------------------------------------------
def test_a_save_over_the_folder_the_model_came_from_is_refused(tmp_path):
    folder = tmp_path / "c"
    shutil.copytree(phixtral.default_model_path(), folder)
    before = snapshot(folder)
    model = phixtral.from_pretrained(folder, backend="torch")
    for target in (folder, str(folder) + "/", folder / "sub", tmp_path):
        with pytest.raises(ValueError, match="the source model folder"):
            model.save_pretrained(target)
    assert snapshot(folder) == before  # BUILD_LOG.md, EVAL.md, the recipe and the router log are all still there


def test_a_save_keeps_the_dtype_of_the_files_unless_asked(tmp_path):
    source = phixtral.default_model_path()
    model = phixtral.from_pretrained(source, backend="torch")  # float32 on the CPU; the files are float16
    assert model.dtype == torch.float32
    model.save_pretrained(tmp_path / "same")
    model.save_pretrained(tmp_path / "fp32", dtype="float32")

    def stored(folder):
        with safe_open(next(folder.glob("*.safetensors")), "pt") as f:
            return {f.get_slice(n).get_dtype() for n in f.keys()}

    assert stored(tmp_path / "same") == {"F16"} and stored(tmp_path / "fp32") == {"F32"}
    size = lambda folder: sum(p.stat().st_size for p in folder.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "same") == size(source)
    again = phixtral.from_pretrained(tmp_path / "same", backend="torch")
    assert torch.equal(again(IDS), model(IDS))  # fp16 -> fp32 -> fp16 is exact


# --- quantized tensors ----------------------------------------------------------------------------------------------
def copy_with(tmp_path: Path, change) -> Path:
    """The 4-bit act-order GPTQ checkpoint copied, with change(tensors) applied to the shard that holds fc1's g_idx."""
    folder = tmp_path / "gptq"
    shutil.copytree(gptq_moe_checkpoint(), folder)
    name = "transformer.h.0.moe.mlp.1.fc1"
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index[f"{name}.g_idx"]
    with safe_open(shard, "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    change(tensors, name)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder, shard


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda t, n: t[f"{n}.g_idx"].__setitem__(0, 10**6), r"fc1\.g_idx: holds groups in \[0, 1000000\], outside"),
        (lambda t, n: t[f"{n}.g_idx"].__setitem__(3, -1), r"fc1\.g_idx: holds groups in \[-1, "),
        (
            lambda t, n: t[f"{n}.scales"].__setitem__((0, 0), float("nan")),
            r"fc1\.scales: 1 of \d+ scales are NaN or Inf",
        ),
        (
            lambda t, n: t[f"{n}.scales"].__setitem__((1, 2), float("inf")),
            r"fc1\.scales: 1 of \d+ scales are NaN or Inf",
        ),
    ],
    ids=["g_idx-huge", "g_idx-negative", "scales-nan", "scales-inf"],
)
def test_bad_quantized_tensors_in_the_files_name_the_tensor_and_the_file(tmp_path, change, match):
    folder, shard = copy_with(tmp_path, change)
    with pytest.raises(ValueError, match=match) as info:
        phixtral.from_pretrained(folder, backend="torch")
    assert str(shard) in str(info.value) and "\n" not in str(info.value)


def test_staged_linears_check_their_scales_too():
    tensors = {
        "qweight": torch.zeros(4, 8, dtype=torch.int32),
        "qzeros": torch.zeros(1, 1, dtype=torch.int32),
        "scales": torch.tensor([[1.0, float("nan"), 1.0, 1.0, 1, 1, 1, 1]]),
    }
    with pytest.raises(ValueError, match=r"h\.0\.Wqkv\.scales: 1 of 8 scales are NaN or Inf"):
        dequantize_staged(
            "h.0.Wqkv", tensors, GPTQConfig(bits=4, group_size=-1, desc_act=False, sym=True), torch.float32
        )


@pytest.fixture
def gptq_model():
    model = phixtral.from_pretrained(gptq_moe_checkpoint(), dtype="float32", backend="torch")
    return model, model(IDS)


def test_load_state_dict_refuses_an_out_of_range_g_idx(gptq_model):
    model, logits = gptq_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k in state if k.endswith("fc1.g_idx"))
    state[name][0, 0] = 10**6
    with pytest.raises(
        ValueError, match=r"QuantizedExpertLinear \(4-bit, group 32\): g_idx holds groups in \[0, 1000000\]"
    ):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match="g_idx holds groups"):  # and nothing runs on it afterwards either
        model(IDS)


def test_set_weight_refuses_bad_tensors_and_keeps_the_old_ones(gptq_model):
    model, logits = gptq_model
    fc1 = model.h[0].moe.fc1
    good = fc1.weight
    for g_idx, scales, match in [
        (good.g_idx.clone().fill_(good.num_groups), good.scales, "g_idx holds groups"),
        (good.g_idx, good.scales.clone().fill_(float("inf")), "scales hold NaN or Inf"),
    ]:
        bad = type(good)(good.qweight, good.qzeros, scales, g_idx, good.bits, good.group_size, check=False)
        with pytest.raises(ValueError, match=match):
            fc1.set_weight(bad)
        assert fc1.g_idx is good.g_idx and fc1.scales is good.scales
    assert torch.equal(model(IDS), logits)


@pytest.mark.parametrize(
    "tensor,value,match", [("g_idx", 10**6, "g_idx holds groups"), ("scales", float("nan"), "NaN")]
)
def test_an_in_place_write_is_checked_before_the_next_forward(gptq_model, tensor, value, match):
    model, _ = gptq_model
    getattr(model.h[1].moe.fc1, tensor).view(-1)[5] = value  # fc1: act-order kept (fc2's moves into a permutation)
    with pytest.raises(ValueError, match=match):
        model(IDS)


# --- shard index ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/x.safetensors", ".."])
def test_index_entries_outside_the_folder_are_refused(tmp_path, entry):
    folder = tmp_path / "ckpt"
    shutil.copytree(msft_moe_checkpoint(), folder)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = entry
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"names shards outside .* \(only plain file names are allowed\)"):
        phixtral.from_pretrained(folder, backend="torch")
