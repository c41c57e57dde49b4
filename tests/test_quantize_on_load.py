"""Quantize on load: from_pretrained(quantize=...) and --quantize equal `phixtral quantize --method rtn` bit for bit,
and the float weights pass through one tensor at a time."""

import weakref

import pytest
import torch
from helpers_models import hf_phi_checkpoint, msft_moe_checkpoint

import phixtral
from phixtral.cli import main
from phixtral.quant import GPTQConfig, QuantizedExpertLinear, QuantizedLinear, on_load, quantize_spec

IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(3))


def _quantize_command(source, out, bits, group_size, sym) -> None:
    argv = ["quantize", "--model", str(source), "--out", str(out), "--no-progress", "--bits", str(bits),
            "--group-size", str(group_size), "--sym" if sym else "--no-sym"]  # fmt: skip
    assert main(argv) == 0


def assert_same_model(a, b) -> None:
    """Every tensor equal (names, dtypes, values: the packed buffers, scales, biases and float weights), and the
    logits."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    assert a.quantization == b.quantization
    assert torch.equal(a(IDS), b(IDS))


CASES = {  # id: (checkpoint, bits, group_size, sym)
    "msft-int4-g32-sym": (msft_moe_checkpoint, 4, 32, True),
    "msft-int8-g32-asym": (msft_moe_checkpoint, 8, 32, False),
    "msft-int4-channel-asym": (msft_moe_checkpoint, 4, -1, False),
    "hf-int4-g32-asym": (hf_phi_checkpoint, 4, 32, False),  # Wqkv from q_proj, k_proj and v_proj rows
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_the_quantize_command_bit_for_bit(case, tmp_path):
    make, bits, group_size, sym = CASES[case]
    source = make()
    _quantize_command(source, tmp_path / "q", bits, group_size, sym)
    spec = dict(bits=bits, group_size=group_size, sym=sym)
    for dtype in ("float32", "bfloat16"):  # bf16 keeps fp16 scales, and runs the packed CPU kernels
        written = phixtral.from_pretrained(tmp_path / "q", device="cpu", dtype=dtype, backend="torch")
        on_load = phixtral.from_pretrained(source, device="cpu", dtype=dtype, backend="torch", quantize=spec)
        assert isinstance(on_load.h[0].mixer.Wqkv, QuantizedLinear)
        assert isinstance(on_load.h[1].moe.fc2, QuantizedExpertLinear)
        assert_same_model(on_load, written)


def test_the_default_spec_on_the_bundled_fp16_model(tmp_path):
    """Spec "int4": `phixtral quantize --bits 4`'s defaults (groups of 128, symmetric); bf16 by default on the CPU."""
    _quantize_command(phixtral.default_model_path(), tmp_path / "q", 4, 128, True)
    model = phixtral.from_pretrained(quantize="int4", backend="torch")
    assert model.dtype == torch.bfloat16 and model.quantization == GPTQConfig(bits=4, group_size=128)
    assert model.h[0].moe.fc1.qzeros is None and model.h[0].moe.fc1.g_idx is None  # symmetric, contiguous groups
    assert_same_model(model, phixtral.from_pretrained(tmp_path / "q", backend="torch"))


def test_saved_it_is_the_checkpoint_the_command_writes(tmp_path):
    _quantize_command(msft_moe_checkpoint(), tmp_path / "q", 4, 32, False)
    spec = "int4,group_size=32,sym=false"
    model = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", backend="torch", quantize=spec)
    model.save_pretrained(tmp_path / "saved")
    assert_same_model(*(phixtral.from_pretrained(tmp_path / f, device="cpu", backend="torch") for f in ("saved", "q")))


def test_float_weights_pass_one_at_a_time(monkeypatch):
    """The loader hands each float weight to the quantizer and drops it: when a weight arrives, none of the earlier
    ones is alive (no float copy of the model builds up), and the model keeps no float weight of a packed Linear."""
    alive, most = [], []
    real_add = on_load.OnLoadQuantizer.add

    def add(self, target, tensor):
        before = sum(r() is not None for r in alive)
        took = real_add(self, target, tensor)
        if took:
            most.append(before)
            alive.append(weakref.ref(tensor))
        return took

    monkeypatch.setattr(on_load.OnLoadQuantizer, "add", add)
    model = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", quantize="int8,group_size=32")
    assert len(most) == 2 * (2 + 2 * 4) * 2 and max(most) == 0  # 2 layers x (Wqkv, out_proj, 4 x fc1, fc2) x (w, b)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(("Wqkv.weight", "out_proj.weight", "fc1.weight", "fc2.weight")) for n in names)


def test_a_weight_read_in_parts_is_gathered_then_freed():
    """HF's q_proj, k_proj, v_proj rows wait for each other in one float32 weight, which goes once quantized."""
    model = phixtral.from_pretrained(hf_phi_checkpoint(), device="cpu", backend="torch", quantize="int4,group_size=32")
    assert isinstance(model.h[0].mixer.Wqkv, QuantizedLinear) and model.h[0].mixer.Wqkv.qweight.shape == (1, 8, 192)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("int4", GPTQConfig(bits=4, group_size=128)),
        ("int8", GPTQConfig(bits=8, group_size=128)),
        ("int4, group_size=64, sym=False", GPTQConfig(bits=4, group_size=64, sym=False)),
        ("int8,group_size=-1", GPTQConfig(bits=8, group_size=-1)),
        ({"bits": 4, "group_size": 32, "sym": False}, GPTQConfig(bits=4, group_size=32, sym=False)),
        (GPTQConfig(bits=8, group_size=64), GPTQConfig(bits=8, group_size=64)),
    ],
)
def test_specs(value, expected):
    assert quantize_spec(value) == expected


@pytest.mark.parametrize(
    "value,words",
    [
        ("int3", "'int3' is not a spec: use int4 or int8"),
        ("int4,groups=64", "'groups=64' in 'int4,groups=64' is not an option"),
        ("int4,group_size=64,group_size=32", "is not an option"),
        ("int4,group_size=x", "group_size must be an int"),
        ("int4,group_size=0", "group_size must be -1 (per channel) or a positive int"),
        ("int4,sym=maybe", "sym must be true or false"),
        ({"bits": 3}, "bits=3 is not supported"),
        ({"group_size": 64}, "a dict takes bits (4 or 8), group_size and sym"),
        (GPTQConfig(bits=4, group_size=32, desc_act=True), "act-order (desc_act) needs calibration data"),
    ],
)
def test_bad_specs_say_what_is_accepted(value, words):
    with pytest.raises(ValueError, match="^quantize: ") as info:
        quantize_spec(value)
    assert words in str(info.value)


def test_refused_before_anything_is_read(tmp_path, monkeypatch):
    from phixtral import weights

    _quantize_command(msft_moe_checkpoint(), tmp_path / "q", 8, 32, True)
    monkeypatch.setattr(weights, "load_weights", lambda *a, **k: pytest.fail("nothing may be read"))
    with pytest.raises(ValueError, match="group_size 128 does not divide the 64 in features of mixer.Wqkv"):
        phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="is already quantized \\(GPTQ\\): load it without quantize"):
        phixtral.from_pretrained(tmp_path / "q", device="cpu", quantize="int8,group_size=32")
    with pytest.raises(TypeError, match="quantize must be a string"):
        phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", quantize=4)


def test_generate_with_the_flag(capsys):
    argv = ["generate", "--model", str(msft_moe_checkpoint()), "--prompt", "def f(x):", "--max-new-tokens", "3",
            "--backend", "torch", "--quantize", "int8,group_size=32", "--temperature", "0"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_below_sm80_auto_runs_int4_on_the_torch_path_one_expert_at_a_time(monkeypatch):
    """The model card's T4 (sm_75): the capability check (phixtral_kernels._triton, MIN_CAPABILITY) refuses Triton, so
    backend "auto" runs an int4 model on the torch path, which dequantizes one expert's weight (or one dense Linear's)
    per call and drops it after its GEMM: at most one float weight exists at a time. Checked on the CPU with the device
    check answering as on a T4, in fp32 (the CPU's bf16 would take torch's packed kernels instead)."""
    import phixtral_kernels._triton as kt
    import phixtral_kernels.moe as kmoe

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Tesla T4")
    reason = kt._cuda_reason.__wrapped__(0)  # the real check, uncached
    assert "sm_75" in reason and "backend='torch'" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: kt.MIN_CAPABILITY)
    assert kt._cuda_reason.__wrapped__(0) is None
    monkeypatch.setattr(kmoe, "triton_unavailable_reason", lambda device: reason)
    for launcher in ("triton_moe_forward", "launch_grouped_gemm"):
        monkeypatch.setattr(kmoe, launcher, lambda *a, **k: pytest.fail("a Triton kernel on sm_75"))
    calls, alive, most = [], [], []
    real = kmoe.dequantize_experts

    def dequantize(w, dtype=None):
        calls.append(w.num_experts)
        most.append(sum(r() is not None for r in alive))  # earlier weights still held when this one is made
        out = real(w, dtype)
        alive.append(weakref.ref(out))  # a view of it keeps it alive, so this tracks the memory
        return out

    monkeypatch.setattr(kmoe, "dequantize_experts", dequantize)
    spec = "int4,group_size=32"
    model = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", dtype="float32", quantize=spec)
    assert model.backend == "auto"
    logits = model(IDS)
    assert calls and set(calls) == {1} and max(most) == 0
    model.set_backend("torch")
    assert torch.equal(logits, model(IDS))
