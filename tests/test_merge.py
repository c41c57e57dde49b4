"""phixtral merge on tiny random phi-2 checkpoints: the output layout, every gate mode, exactness, and bad recipes."""

import json

import pytest
import torch
import yaml
from helpers_models import hf_to_msft, msft_config, read_tensors, reference_phixtral_forward
from phi_checkpoints import EOS, hf_model, make_phi, tokenizer
from safetensors import safe_open

from phixtral.cli import main as cli_main
from phixtral.commands.merge import RecipeError, load_recipe, merge, parse_recipe
from phixtral.weights import from_pretrained

PROMPTS = [
    ["async def main():\n    await asyncio.sleep(1)\n"],
    ["class TestAdd(unittest.TestCase):\n    def test_add(self):\n", "self.assertEqual(add(1, 2), 3)"],
    ["The assert statement is a convenient way to insert debugging assertions"],
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A base and three experts, of both key layouts (expert 1 is phi-msft dense)."""
    root = tmp_path_factory.mktemp("sources")
    base = make_phi(root / "base", seed=0)
    experts = [make_phi(root / "e0", 1), make_phi(root / "e1", 2, layout="msft"), make_phi(root / "e2", 3)]
    return base, experts


def recipe_dict(base, experts, gate_mode="hidden", **extra):
    d = {
        "base_model": str(base),
        "gate_mode": gate_mode,
        "dtype": "float16",
        "experts": [{"source_model": str(e), "positive_prompts": p} for e, p in zip(experts, PROMPTS)],
    }
    d.update(extra)
    return d


def tensors(folder):
    out = {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(folder / shard, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def hf_tensors(folder):
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# --- the output ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed", "random"])
def test_merge_writes_a_phixtral_checkpoint(sources, tmp_path, gate_mode):
    base, experts = sources
    out = tmp_path / "moe"
    report = merge(parse_recipe(recipe_dict(base, experts, gate_mode)), out, max_shard_bytes=20_000, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "phi-msft" and cfg["architectures"] == ["PhiForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["torch_dtype"]) == (3, 2, "float16")
    assert (cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["rotary_dim"], cfg["vocab_size"]) == (32, 2, 4, 4, 320)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5 and cfg["n_positions"] == 64
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values()) == set(shards)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert len(report.files) == len(shards) and not report.identical_gates

    t = tensors(out)
    assert len(t) == 1 + 2 * (6 + 1 + 3 * 4) + 4  # wte, per layer (ln, Wqkv, out_proj: 6; gate; 3 experts x 4), head
    assert all(v.dtype == torch.float16 for v in t.values())
    b = hf_tensors(base)
    assert torch.equal(t["transformer.embd.wte.weight"], b["model.embed_tokens.weight"].half())
    wqkv = torch.cat([b[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(t["transformer.h.1.mixer.Wqkv.weight"], wqkv.half())
    assert torch.equal(t["lm_head.linear.bias"], b["lm_head.bias"].half())
    for e in (0, 2):  # HF-layout experts
        src = hf_tensors(experts[e])
        assert torch.equal(t[f"transformer.h.1.moe.mlp.{e}.fc2.weight"], src["model.layers.1.mlp.fc2.weight"].half())
    with safe_open(next(experts[1].glob("*.safetensors")), framework="pt") as f:  # the phi-msft expert
        assert torch.equal(t["transformer.h.0.moe.mlp.1.fc1.bias"], f.get_tensor("transformer.h.0.mlp.fc1.bias").half())
    assert t["transformer.h.0.moe.gate.weight"].shape == (3, 32)

    model = from_pretrained(out, device="cpu", dtype="float32", backend="torch")
    assert model.config.num_local_experts == 3 and model.tokenizer is not None
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0))
    # Logits of std 0.15; measured 6e-8 (the same fp32 ops in another order).
    torch.testing.assert_close(model(ids), expected_moe_logits(base, experts, t, ids), rtol=0, atol=3e-7)


def expected_moe_logits(base, experts, merged, ids):
    """Logits [B, S, V] of the MoE the recipe describes, built from the sources' own files (fp16-rounded, as merged)
    and the gates as written, by the plain phixtral forward of helpers_models: none of phixtral's code reads them."""
    cfg = msft_config(hidden=32, layers=2, heads=4, vocab=320, n_positions=64, rotary_dim=4, experts=3, top_k=2)
    dense = hf_to_msft(hf_tensors(base), layers=2)  # attention, LayerNorms, embedding and head from the base
    t = {n: v for n, v in dense.items() if ".mlp." not in n}
    for e, folder in enumerate(experts):
        own = hf_to_msft(hf_tensors(folder), layers=2) if e != 1 else read_tensors(folder)  # expert 1 is phi-msft
        for i in range(2):
            for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                t[f"transformer.h.{i}.moe.mlp.{e}.{p}"] = own[f"transformer.h.{i}.mlp.{p}"]
    for i in range(2):
        t[f"transformer.h.{i}.moe.gate.weight"] = merged[f"transformer.h.{i}.moe.gate.weight"]
    t = {n: v.half().float() for n, v in t.items()}
    return reference_phixtral_forward(t, cfg, ids)


def test_hidden_gates_are_the_mean_moe_input(sources, tmp_path):
    """hidden: per layer, input_layernorm(hidden_states[i]) of transformers' Phi, averaged over tokens then prompts,
    minus the negatives' mean, normalized (bos prepended as mergekit does)."""
    base, experts = sources
    negatives = ["def add(a, b):\n    return a + b\n"]
    d = recipe_dict(base, experts, "hidden", dtype="float32")
    d["experts"][0]["negative_prompts"] = negatives
    merge(parse_recipe(d), tmp_path / "moe", progress=False)
    t = tensors(tmp_path / "moe")
    hf = hf_model(base)
    tok = tokenizer()

    def mean_input(prompts):
        per_prompt = []
        for p in prompts:
            ids = torch.tensor([tok(EOS + p, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                hs = hf(ids, output_hidden_states=True).hidden_states
                per_prompt.append(torch.stack([hf.model.layers[i].input_layernorm(hs[i])[0].mean(0) for i in range(2)]))
        return torch.stack(per_prompt).mean(0)  # [L, D]

    for e, prompts in enumerate(PROMPTS):
        v = mean_input(prompts) - (mean_input(negatives) if e == 0 else 0)
        v = v / v.norm(dim=-1, keepdim=True)
        for layer in range(2):
            torch.testing.assert_close(t[f"transformer.h.{layer}.moe.gate.weight"][e], v[layer], atol=1e-5, rtol=1e-5)


def test_cheap_embed_gates_are_the_mean_embedding_in_every_layer(sources, tmp_path):
    base, experts = sources
    merge(parse_recipe(recipe_dict(base, experts, "cheap_embed", dtype="float32")), tmp_path / "moe", progress=False)
    t = tensors(tmp_path / "moe")
    wte = hf_tensors(base)["model.embed_tokens.weight"]
    tok = tokenizer()
    for e, prompts in enumerate(PROMPTS):
        v = torch.stack([wte[tok(EOS + p, add_special_tokens=False)["input_ids"]].mean(0) for p in prompts]).mean(0)
        v = v / v.norm()
        for layer in range(2):
            torch.testing.assert_close(t[f"transformer.h.{layer}.moe.gate.weight"][e], v, atol=1e-6, rtol=1e-6)


def test_random_gates_follow_the_seed(sources, tmp_path):
    base, experts = sources
    recipe = parse_recipe(recipe_dict(base, experts, "random"))
    gates = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        merge(recipe, tmp_path / name, seed=seed, progress=False)
        gates[name] = tensors(tmp_path / name)["transformer.h.1.moe.gate.weight"]
    assert torch.equal(gates["a"], gates["b"]) and not torch.equal(gates["a"], gates["c"])


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_identical_experts_equal_the_dense_model(sources, tmp_path, top_k):
    """Three copies of the base: whatever the router does, the weights of the k picks sum to one."""
    base, _ = sources
    d = recipe_dict(base, [base] * 3, "random", dtype="float32", experts_per_token=top_k)
    merge(parse_recipe(d), tmp_path / "moe", progress=False)
    moe = from_pretrained(tmp_path / "moe", device="cpu", dtype=torch.float32, backend="torch")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf_model(base)(ids).logits
    torch.testing.assert_close(moe(ids), expected, atol=2e-5, rtol=1e-5)


def test_identical_gate_rows_warn_loudly(sources, tmp_path, capsys):
    """phixtral-4x2_8's recipe: cheap_embed with empty prompts gives every expert the bos embedding."""
    base, experts = sources
    d = recipe_dict(base, experts, "cheap_embed")
    for e in d["experts"]:
        e["positive_prompts"] = [""]
    with pytest.warns(UserWarning, match="CANNOT ROUTE: experts 0 and 1 have the same gate vector in every layer"):
        report = merge(parse_recipe(d), tmp_path / "moe", progress=False)
    assert report.identical_gates == {(0, 1): [0, 1], (0, 2): [0, 1], (1, 2): [0, 1]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    assert cli_main(["merge", str(path), "--out", str(tmp_path / "moe2")]) == 0
    err = capsys.readouterr().err
    assert "WARNING: THE ROUTER CANNOT ROUTE" in err and "!!!!" in err


def test_command_line_and_relative_paths(sources, tmp_path, capsys, monkeypatch):
    """Model paths are tried from the working directory, then from the recipe's folder."""
    base, experts = sources
    d = recipe_dict(base, experts, "hidden")
    d["base_model"] = base.name  # relative to the recipe's folder
    path = base.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["merge", str(path), "--out", "moe"]) == 0
    out = capsys.readouterr().out
    assert "wrote moe: 3 experts, top-2, 2 layers" in out and "largest cosine" in out
    assert (tmp_path / "moe" / "config.json").is_file()


# --- bad recipes fail before anything is written ---------------------------------------------------------------------
def _fails(d, tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=match):
        merge(parse_recipe(d), out, progress=False, **kwargs)
    assert not out.exists()


def test_missing_model(sources, tmp_path):
    base, experts = sources
    d = recipe_dict(base, experts)
    d["experts"][2]["source_model"] = str(tmp_path / "nope")
    _fails(d, tmp_path, r"experts\[2\] '.*nope': no such checkpoint folder")
    d = recipe_dict(tmp_path / "no-base", experts)
    _fails(d, tmp_path, "base_model .*no such checkpoint folder")


def test_mismatched_expert_shapes(sources, tmp_path):
    base, experts = sources
    wide = make_phi(tmp_path / "wide", 4, n_embd=48)
    deep = make_phi(tmp_path / "deep", 5, n_layer=3)
    d = recipe_dict(base, [experts[0], wide, deep])
    _fails(
        d,
        tmp_path,
        r"(?s)do not fit the base.*experts\[1\].*n_embd = 48, but the base model has n_embd = 32"
        r".*experts\[2\].*n_layer = 3",
    )


def test_broken_source_checkpoint(sources, tmp_path):
    base, experts = sources
    broken = make_phi(tmp_path / "broken", 6)
    (broken / "config.json").write_text(
        json.dumps({**json.loads((broken / "config.json").read_text()), "hidden_size": 64})
    )
    _fails(recipe_dict(base, [experts[0], broken]), tmp_path, r"experts\[1\] .*does not match its config.json")


def test_moe_source_is_rejected(sources, tmp_path):
    base, experts = sources
    merge(parse_recipe(recipe_dict(base, experts, "random")), tmp_path / "moe", progress=False)
    _fails(recipe_dict(base, [experts[0], tmp_path / "moe"]), tmp_path, r"already a MoE \(3 experts\)")


@pytest.mark.parametrize(
    "change, match",
    [
        ({"gate_mode": "hiddn"}, r"unknown gate_mode 'hiddn'; choose one of \('hidden', 'cheap_embed', 'random'\)"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"experts_per_token": 4}, r"experts_per_token must be an int in \[1, 3\]"),
        ({"mergekit_extra": 1}, r"unknown recipe keys \['mergekit_extra'\]"),
        ({"base_model": None}, "recipe has no 'base_model'"),
        ({"experts": [{"source_model": "x", "positive_prompts": ["a"]}]}, "at least 2"),
        ({"experts": [{"source_model": "x"}, {"source_model": "y"}]}, r"experts\[0\] has no positive_prompts"),
        ({"experts": [{"source_model": "x", "positive_prompts": [1]}, {"source_model": "y"}]}, "list of strings"),
    ],
)
def test_invalid_recipes(sources, change, match):
    base, experts = sources
    with pytest.raises(RecipeError, match=match):
        parse_recipe({**recipe_dict(base, experts), **change})


def test_bad_recipe_on_the_command_line(sources, tmp_path, capsys):
    base, experts = sources
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(base, experts, "nearest")))
    assert cli_main(["merge", str(path), "--out", str(tmp_path / "out")]) == 1
    assert "phixtral merge: error: unknown gate_mode 'nearest'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    path.write_text("base_model: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


def test_non_empty_out_needs_overwrite(sources, tmp_path):
    base, experts = sources
    recipe = parse_recipe(recipe_dict(base, experts, "random"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(RecipeError, match="not empty; pass --overwrite"):
        merge(recipe, out, progress=False)
    # --overwrite replaces a folder whole, so it only replaces a checkpoint: notes, a .git, ... are never deleted.
    with pytest.raises(RecipeError, match=r"does not look like a checkpoint folder \(it has no config.json\)"):
        merge(recipe, out, overwrite=True, progress=False)
    (out / "config.json").write_text("{}")
    (out / ".git").mkdir()
    with pytest.raises(RecipeError, match="it holds the subfolder '.git'"):
        merge(recipe, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".git", "config.json", "keep.txt"]
    (out / ".git").rmdir()
    merge(recipe, out, overwrite=True, progress=False)
    assert (out / "model.safetensors.index.json").is_file() and not (out / "keep.txt").exists()
