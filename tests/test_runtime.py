"""backend, attention_upcast and cuda_graph: one RuntimeSettings per model, checked where it is set, read by every layer
when it runs (packed modules swapped in included), copied with the model and never shared with another."""

import copy

import pytest
import torch
from helpers_models import msft_moe_checkpoint

import phixtral
from phixtral import decode_graph
from phixtral.model import Attention, Block, MoE, Phixtral
from phixtral.quant import GPTQConfig, QuantizedLinear, quantize_model_rtn
from phixtral.runtime import RuntimeSettings
from phixtral_kernels import triton_unavailable_reason

IDS = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(4))


def readers(model: Phixtral) -> list:
    """Every layer that reads a runtime setting."""
    return [m for m in model.modules() if isinstance(m, (Attention, MoE, QuantizedLinear))]


@pytest.fixture
def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", backend="torch")


def test_every_layer_reads_the_one_object(model):
    assert readers(model) and all(m.runtime is model.runtime for m in readers(model))
    model.set_backend("naive")
    model.attention_upcast = "scores"
    assert {m.backend for m in model.modules() if isinstance(m, MoE)} == {"naive"}
    assert {m.upcast for m in model.modules() if isinstance(m, Attention)} == {"scores"}
    assert (model.backend, model.attention_upcast, model.cuda_graph) == ("naive", "scores", "auto")


def test_modules_swapped_in_read_the_setting_without_a_second_push(model):
    quantize_model_rtn(model, GPTQConfig(bits=8, group_size=32))
    packed = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(packed) == 2 * len(model.h) and all(m.runtime is model.runtime for m in packed)
    model.set_backend("naive")
    assert {m.backend for m in packed} == {"naive"}


def test_refused_values_leave_the_settings_as_they_were(model):
    with pytest.raises(ValueError, match="backend must be one of"):
        model.set_backend("cuda")
    with pytest.raises(ValueError, match="attention_upcast must be one of"):
        model.attention_upcast = "bf16"
    with pytest.raises(ValueError, match="model.cuda_graph must be 'auto', True or False"):
        model.cuda_graph = 1
    if triton_unavailable_reason(model.device) is not None:
        with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu"):
            model.set_backend("triton")
    assert (model.backend, model.attention_upcast, model.cuda_graph) == ("torch", "fp32", "auto")
    with pytest.raises(ValueError, match="backend must be one of"):
        Phixtral(model.config, backend="fast")
    with pytest.raises(ValueError, match="pass backend or runtime, not both"):
        Phixtral(model.config, backend="torch", runtime=RuntimeSettings())


def test_a_change_drops_the_captured_decode_graphs(model):
    for change in (lambda: model.set_backend("naive"), lambda: setattr(model, "attention_upcast", "scores")):
        model.decode_graphs = object()
        change()
        assert model.decode_graphs is None
    before = decode_graph.model_state(model)
    model.runtime.backend = "torch"  # past the model's setters: the graphs' state check still sees it
    assert decode_graph.model_state(model) != before


def test_a_copy_has_its_own_settings_and_state_dict_has_none(model):
    twin = copy.deepcopy(model)
    assert twin.runtime is not model.runtime and all(m.runtime is twin.runtime for m in readers(twin))
    twin.set_backend("naive")
    assert model.backend == "torch" and {m.backend for m in readers(model) if isinstance(m, MoE)} == {"torch"}
    assert not any("runtime" in k for k in model.state_dict())
    other = Phixtral(model.config, backend="naive")
    other.load_state_dict(model.state_dict())
    assert other.backend == "naive"
    torch.testing.assert_close(other(IDS), twin(IDS), rtol=0, atol=1e-6)


def test_a_module_moved_to_another_model_reads_that_models_settings(model):
    other = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", backend="naive")
    moe = model.h[0].moe
    other.decode_graphs = object()
    other.set_submodule("h.0.moe", moe)
    assert other.decode_graphs is None
    assert other.h[0].moe is moe and moe.runtime is other.runtime and moe.backend == "naive"
    with pytest.raises(AttributeError, match="has no attribute 'mo'"):
        other.set_submodule("h.0.mo", moe, strict=True)
    alone = MoE(model.config)
    assert alone.backend == "auto" and Attention(model.config).upcast == "fp32"
    block = Block(model.config)
    assert block.mixer.runtime is block.moe.runtime
