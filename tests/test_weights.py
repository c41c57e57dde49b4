"""Config layouts, key-name maps, sharded loading, writing in the phi-msft layout, and the errors for bad
checkpoints."""

import json
import shutil

import pytest
import torch
from helpers_models import (
    hf_phi_checkpoint,
    msft_config,
    msft_moe_checkpoint,
    random_msft_tensors,
    read_tensors,
    write_checkpoint,
)

import phixtral
from phixtral import PhixtralConfig
from phixtral.weights import checkpoint_map, detect_layout, read_config, resolve_checkpoint

PHIXTRAL_4X2_8 = msft_config(
    hidden=2560, layers=32, heads=32, vocab=51200, n_positions=2048, rotary_dim=32, experts=4, top_k=2
)
PHIXTRAL_4X2_8["torch_dtype"] = "float16"
HF_PHI_2 = {  # microsoft/phi-2 config.json as transformers 5 writes it
    "architectures": ["PhiForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 50256, "embd_pdrop": 0.0,
    "eos_token_id": 50256, "hidden_act": "gelu_new", "hidden_size": 2560, "initializer_range": 0.02,
    "intermediate_size": 10240, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048, "model_type": "phi",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "qk_layernorm": False,
    "resid_pdrop": 0.1,
    "rope_parameters": {"partial_rotary_factor": 0.4, "rope_theta": 10000.0, "rope_type": "default"},
    "tie_word_embeddings": False, "dtype": "float16", "vocab_size": 51200,
}  # fmt: skip


# --- config ----------------------------------------------------------------------------------------------------------
def test_config_phixtral_4x2_8():
    c = PhixtralConfig.from_dict(PHIXTRAL_4X2_8)
    assert (c.n_embd, c.n_inner, c.n_head, c.n_head_kv, c.head_dim, c.rotary_dim) == (2560, 10240, 32, 32, 80, 32)
    assert (c.num_local_experts, c.num_experts_per_tok, c.rope_theta, c.torch_dtype) == (4, 2, 10000.0, "float16")
    assert PhixtralConfig.from_dict(PHIXTRAL_4X2_8, num_experts_per_tok=1).num_experts_per_tok == 1


def test_config_dense_phi_msft_is_one_expert():
    d = {k: v for k, v in PHIXTRAL_4X2_8.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    c = PhixtralConfig.from_dict(d)
    assert (c.num_local_experts, c.num_experts_per_tok, c.is_moe) == (1, 1, False)


@pytest.mark.parametrize("old_style", [False, True], ids=["rope_parameters", "top-level"])
def test_config_hf_phi_2(old_style):
    d = dict(HF_PHI_2)
    if old_style:  # transformers 4.x: partial_rotary_factor and rope_theta at the top level
        del d["rope_parameters"]
        d.update(partial_rotary_factor=0.4, rope_theta=10000.0)
    c = PhixtralConfig.from_dict(d)
    assert (c.n_embd, c.n_inner, c.rotary_dim, c.rope_theta, c.n_positions) == (2560, 10240, 32, 10000.0, 2048)
    assert (c.num_local_experts, c.eos_token_id, c.torch_dtype, c.model_type) == (1, 50256, "float16", "phi")


def test_config_round_trips_through_msft_dict():
    for d in (PHIXTRAL_4X2_8, HF_PHI_2):
        c = PhixtralConfig.from_dict(d)
        again = PhixtralConfig.from_dict(c.to_msft_dict())
        assert again.to_msft_dict() == c.to_msft_dict()
        fields = [k for k in vars(c) if k != "model_type"]  # model_type records the layout read
        assert [getattr(again, k) for k in fields] == [getattr(c, k) for k in fields]


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "phi3"}, "unknown model_type 'phi3'"),
        ({"model_type": None}, "unknown model_type None"),
        ({"n_embd": None, "n_layer": None}, r"missing required keys \['n_embd', 'n_layer'\]"),
        ({"rotary_dim": 33}, "rotary_dim"),
        ({"n_head": 7}, "not divisible"),
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok must be an int in \[1, num_local_experts=4\]"),
        ({"num_experts_per_tok": None}, "no num_experts_per_tok"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ],
)
def test_config_errors(change, match):
    with pytest.raises(ValueError, match=match):
        PhixtralConfig.from_dict({**PHIXTRAL_4X2_8, **change})


def test_config_errors_hf_layout():
    with pytest.raises(ValueError, match=r"missing required keys \['intermediate_size'\]"):
        PhixtralConfig.from_dict({k: v for k, v in HF_PHI_2.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="qk_layernorm"):
        PhixtralConfig.from_dict({**HF_PHI_2, "qk_layernorm": True})
    with pytest.raises(ValueError, match="default RoPE"):
        PhixtralConfig.from_dict({**HF_PHI_2, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        PhixtralConfig.from_dict(HF_PHI_2, num_experts_per_tok=2)  # a dense model has one expert
    with pytest.raises(TypeError):
        PhixtralConfig.from_dict("phi")


# --- key maps --------------------------------------------------------------------------------------------------------
def test_real_phixtral_key_names_and_counts():
    c4 = PhixtralConfig.from_dict(PHIXTRAL_4X2_8)
    m4 = checkpoint_map(c4, "phi-msft-moe")
    assert len(m4) == 741
    c2 = PhixtralConfig.from_dict({**PHIXTRAL_4X2_8, "num_local_experts": 2})
    assert len(checkpoint_map(c2, "phi-msft-moe")) == 485
    expected = {  # the table in the checkpoint notes
        "transformer.embd.wte.weight": (51200, 2560),
        "transformer.h.31.ln.bias": (2560,),
        "transformer.h.0.mixer.Wqkv.weight": (7680, 2560),
        "transformer.h.0.mixer.Wqkv.bias": (7680,),
        "transformer.h.5.mixer.out_proj.weight": (2560, 2560),
        "transformer.h.5.moe.gate.weight": (4, 2560),
        "transformer.h.7.moe.mlp.3.fc1.weight": (10240, 2560),
        "transformer.h.7.moe.mlp.3.fc2.weight": (2560, 10240),
        "transformer.h.7.moe.mlp.3.fc2.bias": (2560,),
        "lm_head.ln.weight": (2560,),
        "lm_head.linear.weight": (51200, 2560),
        "lm_head.linear.bias": (51200,),
    }
    for name, shape in expected.items():
        assert m4[name].shape == shape, name
    assert m4["transformer.h.7.moe.mlp.3.fc1.weight"].index == (3,)
    dense = checkpoint_map(PhixtralConfig.from_dict(HF_PHI_2), "phi-msft-dense")
    assert len(dense) == 1 + 32 * 10 + 4 and "transformer.h.0.mlp.fc1.weight" in dense
    hf = checkpoint_map(PhixtralConfig.from_dict(HF_PHI_2), "hf")
    assert len(hf) == 1 + 32 * 14 + 4  # 453, as microsoft/phi-2
    assert hf["model.layers.0.self_attn.k_proj.weight"].index == (slice(2560, 5120),)
    assert hf["model.layers.3.self_attn.dense.bias"].param == "h.3.mixer.out_proj.bias"
    assert hf["model.final_layernorm.weight"].param == "lm_head.ln.weight"


def test_detect_layout():
    assert detect_layout(["model.embed_tokens.weight", "lm_head.weight"]) == "hf"
    assert detect_layout(["transformer.h.0.moe.gate.weight"]) == "phi-msft-moe"
    assert detect_layout(["transformer.h.0.mlp.fc1.weight"]) == "phi-msft-dense"
    with pytest.raises(ValueError, match="unrecognized tensor names"):
        detect_layout(["encoder.layer.0.weight"])


# --- loading ---------------------------------------------------------------------------------------------------------
def test_sharded_msft_checkpoint_loads_every_tensor_in_place():
    folder = msft_moe_checkpoint()
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    model = phixtral.from_pretrained(folder, backend="torch")
    t = read_tensors(folder)
    assert torch.equal(model.wte.weight, t["transformer.embd.wte.weight"])
    assert torch.equal(model.h[1].mixer.Wqkv.bias, t["transformer.h.1.mixer.Wqkv.bias"])
    assert torch.equal(model.h[1].moe.gate.weight, t["transformer.h.1.moe.gate.weight"])
    for e in range(4):
        assert torch.equal(model.h[1].moe.fc1.weight[e], t[f"transformer.h.1.moe.mlp.{e}.fc1.weight"])
        assert torch.equal(model.h[0].moe.fc2.bias[e], t[f"transformer.h.0.moe.mlp.{e}.fc2.bias"])
    assert torch.equal(model.lm_head.linear.bias, t["lm_head.linear.bias"])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.tokenizer is not None and model.eos_token_ids == [model.tokenizer.eos_token_id]


def test_without_index_every_safetensors_file_is_read(tmp_path):
    shutil.copytree(msft_moe_checkpoint(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors.index.json").unlink()
    a = phixtral.from_pretrained(tmp_path / "ckpt", backend="torch")
    b = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_dtype_and_aliases():
    folder = msft_moe_checkpoint()
    assert phixtral.from_pretrained(folder, dtype="bf16", backend="torch").dtype == torch.bfloat16
    model = phixtral.from_pretrained(folder, dtype=torch.float16, backend="torch")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert phixtral.from_pretrained(folder, backend="torch").dtype == torch.float32  # CPU default


def _broken_checkpoint(tmp_path, edit):
    tensors = random_msft_tensors(hidden=32, layers=2, heads=2, vocab=64, experts=2)
    config = msft_config(hidden=32, layers=2, heads=2, vocab=64, n_positions=32, rotary_dim=8, experts=2, top_k=2)
    edit(tensors, config)
    return write_checkpoint(tmp_path / "ckpt", tensors, config, n_shards=2, tokenizer=False)


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path):
    def edit(t, c):
        del t["transformer.h.1.moe.mlp.1.fc2.bias"]
        t["transformer.h.1.moe.mlp.2.fc1.weight"] = torch.zeros(128, 32)
        t["transformer.h.0.mixer.Wqkv.weight"] = torch.zeros(90, 32)

    folder = _broken_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError) as info:
        phixtral.from_pretrained(folder)
    msg = str(info.value)
    assert "missing tensors (1): transformer.h.1.moe.mlp.1.fc2.bias" in msg
    assert "unexpected tensors (1): transformer.h.1.moe.mlp.2.fc1.weight" in msg
    assert "transformer.h.0.mixer.Wqkv.weight: expected (96, 32), got (90, 32)" in msg


def test_config_and_tensors_that_disagree(tmp_path):
    def dense(t, c):  # MoE config, dense tensors
        for name in [n for n in t if ".moe." in n]:
            del t[name]
        for i in range(2):
            for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                t[f"transformer.h.{i}.mlp.{p}"] = torch.zeros(1)

    with pytest.raises(ValueError, match="describes 2 experts but the tensors .* are a dense model"):
        phixtral.from_pretrained(_broken_checkpoint(tmp_path, dense))


def test_non_float_tensors_are_rejected(tmp_path):
    def quantize(t, c):
        t["transformer.h.0.mixer.out_proj.weight"] = torch.zeros(32, 32, dtype=torch.int8)

    with pytest.raises(ValueError, match="non-float tensors .*out_proj.weight: I8"):
        phixtral.from_pretrained(_broken_checkpoint(tmp_path, quantize))


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        phixtral.from_pretrained(tmp_path)
    config = msft_config(hidden=32, layers=1, heads=2, vocab=64, n_positions=32, rotary_dim=8)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no \*.safetensors files"):
        phixtral.from_pretrained(tmp_path)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="names shards that are not in"):
        phixtral.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        phixtral.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        phixtral.from_pretrained(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no checkpoint folder './no/such/dir'"):
        phixtral.from_pretrained("./no/such/dir")
    with pytest.raises(TypeError):
        phixtral.from_pretrained(42)
    with pytest.raises(ValueError, match="backend must be one of"):
        phixtral.from_pretrained(msft_moe_checkpoint(), backend="cuda")


def test_devices_and_dtypes_that_are_not_available():
    folder = msft_moe_checkpoint()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            phixtral.from_pretrained(folder, device="cuda")
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        phixtral.from_pretrained(folder, device="gpu0")
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        phixtral.from_pretrained(folder, dtype="int8")
    with pytest.raises(ValueError, match="dtype torch.float64 is not supported"):
        phixtral.from_pretrained(folder, dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype must be"):
        phixtral.from_pretrained(folder, dtype=16)


def test_triton_backend_that_cannot_run_fails_at_load(monkeypatch):
    monkeypatch.setattr(phixtral.runtime, "triton_unavailable_reason", lambda device: "no driver here")  # the one check
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on cpu: no driver here"):
        phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", backend="triton")
    assert phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", backend="torch").backend == "torch"


def test_from_pretrained_without_a_path_loads_the_bundled_model():
    model = phixtral.from_pretrained(backend="torch")
    assert model.config == read_config(phixtral.default_model_path()) and model.tokenizer is not None
    assert phixtral.Phixtral.from_pretrained(backend="torch").config == model.config


# --- hub ids ---------------------------------------------------------------------------------------------------------
def test_hub_id_is_fetched_with_snapshot_download(monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, allow_patterns))
        return str(msft_moe_checkpoint())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = phixtral.from_pretrained("someone/tiny-phixtral", backend="torch")
    assert model.config.num_local_experts == 4
    ((repo_id, patterns),) = calls
    assert repo_id == "someone/tiny-phixtral"
    assert {"*.json", "*.safetensors"} <= set(patterns) and "*.bin" not in patterns and "tokenizer*" in patterns


def test_hub_id_offline_names_the_model_and_the_cause(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        resolve_checkpoint("mlabonne/phixtral-2x2_8")
    msg = str(info.value)
    assert "'mlabonne/phixtral-2x2_8'" in msg and "Hugging Face hub failed" in msg
    assert "LocalEntryNotFoundError" in msg  # the cause, as huggingface_hub words it


# --- writing ---------------------------------------------------------------------------------------------------------
def test_save_moe_model_writes_the_same_phi_msft_files(tmp_path):
    folder = msft_moe_checkpoint()
    model = phixtral.from_pretrained(folder, backend="torch")
    paths = model.save_pretrained(tmp_path, max_shard_bytes=400_000)
    assert len(paths) > 1 and paths[0].name == f"model-00001-of-{len(paths):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in paths}
    original, written = read_tensors(folder), read_tensors(tmp_path)
    assert original.keys() == written.keys() and all(torch.equal(original[n], written[n]) for n in original)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["model_type"] == "phi-msft" and config["num_local_experts"] == 4 and config["num_experts_per_tok"] == 2
    )
    assert (tmp_path / "tokenizer.json").is_file()


def test_hf_model_saved_as_dense_phi_msft_gives_the_same_logits(tmp_path):
    hf_folder = hf_phi_checkpoint()
    model = phixtral.from_pretrained(hf_folder, backend="torch")
    model.save_pretrained(tmp_path, dtype=torch.float32)
    names = set(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"])
    assert "transformer.h.1.mlp.fc2.bias" in names and "transformer.h.0.mixer.Wqkv.weight" in names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "phi-msft" and "num_local_experts" not in config and config["rotary_dim"] == 6
    again = phixtral.from_pretrained(tmp_path, backend="torch")
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(ids), model(ids))
