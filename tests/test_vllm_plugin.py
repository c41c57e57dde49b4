"""The vLLM plugin's parts that need no vLLM: tensor-parallel sharding of the experts (ranks simulated in one process),
the checkpoint-name map onto the vLLM model, the q / k / v split, the phi-msft config class and the custom op.
vLLM itself runs in the optional CI leg (scripts/vllm_check.sh)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_models import hf_phi_checkpoint, msft_moe_checkpoint, read_tensors

import phixtral
from phixtral import PhixtralConfig
from phixtral.integrations.vllm.hf_config import ARCHITECTURE, PhiMsftConfig
from phixtral.integrations.vllm.ops import fused_moe_op
from phixtral.integrations.vllm.sharding import (
    EXPERT_TENSORS,
    checkpoint_targets,
    expert_name,
    expert_rows,
    qkv_shards,
    shard_expert_tensor,
    shard_experts,
    vllm_param_name,
    vllm_param_names,
)
from phixtral.weights import checkpoint_map, read_config
from phixtral_kernels import fused_moe

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 2e-5)}


def moe_inputs(T=13, D=32, F=64, E=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    return r(T, D, scale=1.0), r(E, D, scale=1.0), r(E, F, D), r(E, F), r(E, D, F), r(E, D)


def tp_moe(x, gate, w1, b1, w2, b2, top_k, world, backend):
    """The MoE layer on `world` simulated ranks: each runs fused_moe on its shard, the all-reduce is a sum."""
    partials = [fused_moe(x, gate, *shard_experts(w1, b1, w2, b2, r, world), top_k, backend=backend)
                for r in range(world)]  # fmt: skip
    return torch.stack(partials).sum(0), partials


# --- sharded math --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
def test_sharded_moe_equals_the_whole_layer(world, top_k, dtype):
    x, gate, w1, b1, w2, b2 = moe_inputs(dtype=dtype)
    whole = fused_moe(x, gate, w1, b1, w2, b2, top_k, backend="torch")
    summed, _ = tp_moe(x, gate, w1, b1, w2, b2, top_k, world, "torch")
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(summed, whole, atol=atol, rtol=rtol)


def test_sharded_moe_on_the_triton_kernels():
    # The kernels vLLM runs on CUDA (here under the interpreter), fp32, two ranks.
    x, gate, w1, b1, w2, b2 = moe_inputs(T=9, dtype=torch.float32, seed=1)
    whole = fused_moe(x, gate, w1, b1, w2, b2, 2, backend="triton")
    summed, _ = tp_moe(x, gate, w1, b1, w2, b2, 2, 2, "triton")
    torch.testing.assert_close(summed, whole, atol=2e-5, rtol=2e-5)


def test_dense_layer_sharded_is_one_expert_with_top_1():
    x, _, w1, b1, w2, b2 = moe_inputs(E=1)
    gate = torch.zeros(1, x.shape[1], dtype=x.dtype)  # what the vLLM layer passes for a dense model
    mlp = torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, w1[0], b1[0]), approximate="tanh"), w2[0], b2[0]
    )
    summed, _ = tp_moe(x, gate, w1, b1, w2, b2, 1, 4, "torch")
    torch.testing.assert_close(summed, mlp, atol=1e-12, rtol=1e-12)


def test_fc2_bias_joins_on_rank_0_only():
    x, gate, w1, b1, w2, b2 = moe_inputs()
    _, with_bias = tp_moe(x, gate, w1, b1, w2, b2, 2, 2, "torch")
    _, without = tp_moe(x, gate, w1, b1, w2, torch.zeros_like(b2), 2, 2, "torch")
    assert shard_expert_tensor("fc2.bias", b2, 0, 2) is b2
    assert shard_expert_tensor("fc2.bias", b2, 1, 2).count_nonzero() == 0
    torch.testing.assert_close(with_bias[1], without[1], atol=0, rtol=0)  # rank 1 never sees b2
    assert not torch.equal(with_bias[0], without[0])


def test_shard_shapes_and_slices():
    _, _, w1, b1, w2, b2 = moe_inputs(F=64, E=3)
    for r in range(4):
        lw1, lb1, lw2, lb2 = shard_experts(w1, b1, w2, b2, r, 4)
        assert (lw1.shape, lb1.shape, lw2.shape, lb2.shape) == ((3, 16, 32), (3, 16), (3, 32, 16), (3, 32))
        assert torch.equal(lw1, w1[:, 16 * r : 16 * (r + 1)]) and torch.equal(lw2, w2[..., 16 * r : 16 * (r + 1)])
        # Per expert, as the vLLM loader does with each checkpoint tensor, gives the same slices.
        assert torch.equal(shard_expert_tensor("fc1.weight", w1[1], r, 4), lw1[1])
        assert torch.equal(shard_expert_tensor("fc2.weight", w2[2], r, 4), lw2[2])
    assert expert_rows(10240, 3, 8) == slice(3840, 5120)  # phixtral-4x2_8 on 8 GPUs


def test_sharding_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"n_inner=100 must be divisible by the tensor-parallel size 8"):
        expert_rows(100, 0, 8)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        expert_rows(64, 2, 2)
    with pytest.raises(ValueError, match="name must be one of"):
        shard_expert_tensor("gate.weight", torch.zeros(4, 8), 0, 2)


def test_sharded_layer_of_a_real_checkpoint_equals_phixtral():
    # Every rank's weights built the way the vLLM loader builds them (checkpoint tensor by tensor, through the name
    # map), on two simulated ranks: the summed MoE output equals phixtral's own MoE layer.
    folder = msft_moe_checkpoint()
    model = phixtral.from_pretrained(folder, dtype="float32", backend="torch")
    config, tensors, targets = model.config, read_tensors(folder), checkpoint_targets(model.config)
    world, E, D, F = 2, config.num_local_experts, config.n_embd, config.n_inner
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(0))
    for layer in range(config.n_layer):
        partials = []
        for rank in range(world):
            local = {n: torch.empty(E, *shape) for n, shape in
                     zip(EXPERT_TENSORS, ((F // world, D), (F // world,), (D, F // world), (D,)))}  # fmt: skip
            gate = None
            for name, tensor in tensors.items():
                param = vllm_param_name(targets[name].param)
                if not param.startswith(f"model.h.{layer}.moe."):
                    continue
                if (kind := expert_name(param)) is not None:
                    local[kind][targets[name].index[0]] = shard_expert_tensor(kind, tensor, rank, world)
                else:
                    gate = tensor
            partials.append(fused_moe(x, gate, *local.values(), config.num_experts_per_tok, backend="torch"))
        torch.testing.assert_close(sum(partials), model.h[layer].moe(x[None])[0], atol=2e-5, rtol=2e-5)


# --- names ---------------------------------------------------------------------------------------------------------
def expected_vllm_params(n_layer, moe):
    names = {"model.wte.weight", "model.final_ln.weight", "model.final_ln.bias", "lm_head.weight", "lm_head.bias"}
    for i in range(n_layer):
        for m in ("ln", "mixer.Wqkv", "mixer.out_proj", "moe.fc1", "moe.fc2"):
            names |= {f"model.h.{i}.{m}.weight", f"model.h.{i}.{m}.bias"}
        if moe:
            names.add(f"model.h.{i}.moe.gate.weight")
    return names


@pytest.mark.parametrize("layout", ["phi-msft-moe", "phi-msft-dense", "hf"])
def test_every_checkpoint_tensor_has_a_vllm_parameter(layout):
    config = PhixtralConfig(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4,
                            num_local_experts=4 if layout == "phi-msft-moe" else 1,
                            num_experts_per_tok=2 if layout == "phi-msft-moe" else 1)  # fmt: skip
    targets = checkpoint_targets(config)
    names = checkpoint_map(config, layout)
    assert names.keys() <= targets.keys()
    params = {vllm_param_name(targets[n].param) for n in names}
    assert params == vllm_param_names(config) == expected_vllm_params(2, layout == "phi-msft-moe")


def test_moe_config_refuses_dense_names_and_names_are_disjoint():
    config = PhixtralConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64, rotary_dim=4,
                            num_local_experts=2, num_experts_per_tok=1)  # fmt: skip
    assert "transformer.h.0.mlp.fc1.weight" not in checkpoint_targets(config)
    assert "model.layers.0.mlp.fc1.weight" not in checkpoint_targets(config)
    with pytest.raises(ValueError, match="no vLLM parameter"):
        vllm_param_name("rotary.inv_freq")
    assert expert_name("model.h.0.moe.fc2.bias") == "fc2.bias" and expert_name("model.h.0.moe.gate.weight") is None


@pytest.mark.parametrize("n_head_kv", [4, 2], ids=["mha", "gqa"])
def test_qkv_pieces_rebuild_wqkv(n_head_kv):
    config = PhixtralConfig(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_head_kv=n_head_kv, n_positions=64,
                            rotary_dim=4)  # fmt: skip
    hd = config.head_dim
    rows = (4 + 2 * n_head_kv) * hd
    wqkv = torch.randn(rows, 32)
    msft = checkpoint_map(config, "phi-msft-dense")["transformer.h.0.mixer.Wqkv.weight"]
    pieces = qkv_shards(msft, wqkv, config)
    assert [s for s, _ in pieces] == ["q", "k", "v"]
    assert [p.shape[0] for _, p in pieces] == [4 * hd, n_head_kv * hd, n_head_kv * hd]
    assert torch.equal(torch.cat([p for _, p in pieces]), wqkv)
    hf = checkpoint_map(config, "hf")
    for shard in "qkv":
        target = hf[f"model.layers.0.self_attn.{shard}_proj.bias"]
        piece = wqkv[target.index[0], 0]
        assert qkv_shards(target, piece, config) == [(shard, piece)]


# --- config class, custom op, imports --------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["tiny", "random-moe"])
def test_phi_msft_config_class(folder):
    path = phixtral.default_model_path() if folder == "tiny" else msft_moe_checkpoint()  # the latter has an auto_map
    c = PhiMsftConfig.from_pretrained(str(path))
    ours = read_config(path)
    assert c.architectures == [ARCHITECTURE] and "auto_map" not in c.to_dict()
    # The HF names vLLM reads (KV cache size, context length) answer with the phi-msft values.
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers) == (
        ours.n_embd, ours.n_head, ours.n_head_kv, ours.n_layer)  # fmt: skip
    assert (c.max_position_embeddings, c.intermediate_size) == (ours.n_positions, ours.n_inner)
    assert PhixtralConfig.from_dict(c.to_dict()) == ours


def test_hf_phi_config_reads_back_for_the_vllm_model():
    from transformers import AutoConfig

    path = hf_phi_checkpoint(kv_heads=2, partial_rotary_factor=0.5, rope_theta=500.0)  # test_model.py's GQA variant
    assert PhixtralConfig.from_dict(AutoConfig.from_pretrained(path).to_dict()) == read_config(path)


def test_custom_op_equals_fused_moe_and_traces_whole():
    x, gate, w1, b1, w2, b2 = moe_inputs(dtype=torch.float32)
    ref = fused_moe(x, gate, w1, b1, w2, b2, 2, backend="torch")
    assert torch.equal(fused_moe_op(x, gate, w1, b1, w2, b2, 2, "torch"), ref)
    # vLLM compiles the model's forward in one graph: the torch backend's host read must stay inside the op.
    compiled = torch.compile(lambda *a: fused_moe_op(*a, 2, "torch") + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, gate, w1, b1, w2, b2), ref + 1, atol=0, rtol=0)


def test_only_the_vllm_model_module_imports_vllm():
    allowed = {ROOT / "phixtral/integrations/vllm/model.py"}
    offenders = []
    for path in sorted([*ROOT.glob("phixtral/**/*.py"), *ROOT.glob("phixtral_kernels/**/*.py")]):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            if any(m == "vllm" or m.startswith("vllm.") for m in mods) and path not in allowed:
                # register() imports vLLM when vLLM calls it; no module does at import time.
                if not (path.name == "__init__.py" and path.parent.name == "vllm" and node.col_offset > 0):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_end_to_end_check_is_optional_and_parses():
    # The check needs vLLM and minutes: CI runs it only when asked, and it must at least parse and show its options.
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts/vllm_check.sh")]).returncode == 0
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/vllm_check.py"), "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--serve" in out.stdout and "--tp" in out.stdout
    ci = (ROOT / ".ci/run").read_text()
    assert 'if [ "${PHIXTRAL_CI_VLLM:-0}" = "1" ]; then\n  bash scripts/vllm_check.sh\nfi' in ci
