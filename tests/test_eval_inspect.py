"""phixtral eval and inspect print what they promise; the stdlib slices are deterministic and their splits disjoint."""

import json
import math

import pytest
import torch
from phi_checkpoints import make_phi

from phixtral.cli import main as cli_main
from phixtral.commands import evaluate, stdlib_data
from phixtral.commands.merge import merge, parse_recipe
from phixtral.weights import from_pretrained, save_msft_checkpoint
from phixtral_kernels import moe_routing_torch


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return make_phi(tmp_path_factory.mktemp("dense") / "phi", seed=0)


@pytest.fixture(scope="module")
def moe(tmp_path_factory, dense):
    root = tmp_path_factory.mktemp("moe")
    experts = [make_phi(root / f"e{i}", seed=i + 1) for i in range(3)]
    prompts = ["async def main():", "class TestAdd(unittest.TestCase):", "The assert statement"]
    d = {
        "base_model": str(dense),
        "gate_mode": "hidden",
        "experts": [{"source_model": str(e), "positive_prompts": [p]} for e, p in zip(experts, prompts)],
    }
    merge(parse_recipe(d), root / "moe", progress=False)
    return root / "moe"


# --- stdlib slices ---------------------------------------------------------------------------------------------------
def test_slices_are_deterministic_and_splits_disjoint():
    for name in ("asyncio", "docs"):
        pieces = stdlib_data.slice_pieces(name)
        train, held = stdlib_data.slice_texts(name, "train"), stdlib_data.slice_texts(name, "heldout")
        assert len(held) == len(pieces) // 10 and len(train) + len(held) == len(pieces)
        assert held == [p.text for p in pieces[9::10]] and not set(held) & set(train)
        assert stdlib_data.slice_texts(name, "heldout") == held
        assert all(len(p.text) <= 20_100 for p in pieces)
    assert all(
        p.source.startswith(("asyncio/", "concurrent/", "multiprocessing/"))
        for p in stdlib_data.slice_pieces("asyncio")
    )
    assert [p.source for p in stdlib_data.slice_pieces("docs")][0] == "pydoc_data/topics.py"
    general = set(stdlib_data.slice_files("general"))
    for name in stdlib_data.EXPERT_SLICES[:3]:
        assert not general & set(stdlib_data.slice_files(name))
    with pytest.raises(ValueError, match="unknown stdlib slice 'nope'"):
        stdlib_data.slice_files("nope")


# --- eval ------------------------------------------------------------------------------------------------------------
def test_stream_nll_scores_every_token_once(dense):
    model = from_pretrained(dense, device="cpu", backend="torch")
    stream = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(0))
    total, count = evaluate.stream_nll(model, stream, seq_len=64, batch_size=2, progress=False)
    assert count == 149
    # The same windows by hand: [0, 64), [64, 128), [128, 149), each predicting its next tokens.
    expected = 0.0
    for s, n in ((0, 64), (64, 64), (128, 21)):
        logits = model(stream[None, s : s + n])
        expected += float(torch.nn.functional.cross_entropy(logits[0], stream[s + 1 : s + n + 1], reduction="sum"))
    assert math.isclose(total, expected, rel_tol=1e-5)


def test_eval_command_prints_a_table_and_json(dense, moe, tmp_path, capsys):
    data = tmp_path / "snippet.py"
    data.write_text("def add(a, b):\n    return a + b\n" * 20)
    argv = ["eval", "--model", str(dense), "--model", str(moe), "--data", str(data), "--stdlib-slice", "asyncio",
            "--max-tokens", "200", "--backend", "torch", "--markdown"]  # fmt: skip
    assert cli_main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "| model | asyncio | snippet.py | mean |"
    assert lines[2].startswith("| phi | ") and lines[3].startswith("| moe | ")
    results = json.loads(lines[-1])["results"]
    assert len(results) == 4 and {r["data"] for r in results} == {"asyncio", "snippet.py"}
    for r in results:
        assert r["perplexity"] == pytest.approx(math.exp(r["nll"])) and r["tokens"] > 0 and r["bits_per_byte"] > 0
    assert [r["tokens"] for r in results if r["data"] == "asyncio"] == [200, 200]
    assert "phi | asyncio: perplexity" in err and "%" in err  # the per-result line and the tqdm bar


def test_eval_errors(dense, capsys):
    assert cli_main(["eval", "--model", str(dense)]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(dense), "--stdlib-slice", "nope"]) == 1
    assert "unknown stdlib slice 'nope'" in capsys.readouterr().err
    assert cli_main(["eval", "--model", str(dense), "--data", "/no/such/file"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_format_table():
    rs = [evaluate.EvalResult("m", d, 10, 40, math.log(v)) for d, v in (("a", 2.0), ("b", 4.0))]
    assert evaluate.format_table(rs).splitlines()[2] == "| m | 2.00 | 4.00 | 3.00 |"
    assert evaluate.format_table(rs, markdown=False).splitlines()[1].split() == ["m", "2.00", "4.00", "3.00"]


# --- inspect ---------------------------------------------------------------------------------------------------------
def test_inspect_counts_parameters_and_routed_tokens(moe, capsys):
    prompt = "async def main():\n    await asyncio.sleep(1)\n"
    assert cli_main(["inspect", "--model", str(moe), "--prompt", prompt, "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    D, F, L, V, E = 32, 128, 2, 320, 3
    expert = L * (2 * D * F + F + D)
    shared = 2 * V * D + V + L * (3 * D * D + 3 * D + D * D + D + 2 * D + E * D) + 2 * D
    assert (
        f"parameters  {(shared + E * expert) / 1e6:.2f} M total, {(shared + 2 * expert) / 1e6:.2f} M active per token"
        in out
    )
    assert "dtype       F16" in out and "layer   0  max cosine" in out and "IDENTICAL experts" not in out
    assert "tokens per expert on the prompt" in out and "first pick" in out
    assert cli_main(["inspect", "--model", str(moe), "--prompt", prompt, "--backend", "torch", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    n_tokens = len(from_pretrained(moe, device="cpu", backend="torch").tokenizer(prompt)["input_ids"])
    assert report["params_total"] == shared + E * expert and report["params_active"] == shared + 2 * expert
    assert [sum(c) for c in report["expert_tokens"]] == [2 * n_tokens] * L
    # The same numbers from the MoE layers' own inputs, routed by the kernels' reference.
    model = from_pretrained(moe, device="cpu", backend="torch")
    seen = []
    hooks = [
        b.moe.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].reshape(-1, inp[0].shape[-1])))
        for b in model.h
    ]
    model(model.tokenizer(prompt, return_tensors="pt")["input_ids"])
    for h in hooks:
        h.remove()
    for layer, (block, x) in enumerate(zip(model.h, seen)):
        r = moe_routing_torch(x @ block.moe.gate.weight.T, 2, 16)
        assert report["expert_tokens"][layer] == torch.bincount(r.topk_ids.flatten().long(), minlength=E).tolist()
        assert report["first_pick_weight"][layer] == pytest.approx(r.topk_weights[:, 0].mean().item(), rel=1e-6)
    assert report["config"]["num_local_experts"] == 3 and len(report["router"]) == L


def test_inspect_flags_identical_and_near_identical_gates(moe, tmp_path, capsys):
    model = from_pretrained(moe, device="cpu", dtype=torch.float32, backend="torch")
    state = model.state_dict()
    g = state["h.0.moe.gate.weight"]
    g[1] = g[0]  # layer 0: experts 0 and 1 identical
    g2 = state["h.1.moe.gate.weight"]
    g2[2] = g2[1] + 0.01 * g2[1].norm() * torch.nn.functional.normalize(
        torch.randn_like(g2[1]), dim=0
    )  # near-identical
    save_msft_checkpoint(tmp_path, state, model.config)
    assert cli_main(["inspect", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "layer   0  max cosine 1.0000" in out and "IDENTICAL experts 0 and 1" in out
    assert "near-identical experts 1 and 2" in out
    assert "WARNING: 1 of 2 layers have identical gate rows" in out


def test_inspect_dense_model(dense, capsys):
    assert cli_main(["inspect", "--model", str(dense), "--prompt", "x"]) == 0
    out = capsys.readouterr().out
    assert "(hf layout)" in out and "router      none: a dense model" in out
