"""eval's per-token losses and its routing bounds (--oracles) on a tiny random phixtral."""

import json
import math

import pytest
import torch
from helpers_models import msft_moe_checkpoint

import phixtral
from phixtral.cli import main
from phixtral.commands.evaluate import encode_documents, evaluate, expert_oracles, stream_nll, token_nll

TEXTS = ["def f(x):\n    return x + 1\n" * 20, "class A:\n    pass\n" * 15]


def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


def test_token_nll_scores_what_stream_nll_sums():
    m = model()
    stream = encode_documents(m.tokenizer, TEXTS)
    assert (stream.numel() - 1) % 32 != 0  # a short last window as well
    per_token = token_nll(m, stream, seq_len=32, batch_size=3)
    total, count = stream_nll(m, stream, seq_len=32, batch_size=3, progress=False)
    assert per_token.shape == (stream.numel() - 1,) and count == per_token.numel()
    assert float(per_token.double().sum()) == pytest.approx(total, rel=1e-5)
    with pytest.raises(ValueError, match="seq_len must be in"):
        token_nll(m, stream, seq_len=1)


def test_expert_oracles_bound_every_expert():
    m = model()
    rows = expert_oracles(m, TEXTS, name="moe", data="code", seq_len=32)
    names = [r.model for r in rows]
    assert names == [f"moe expert {e} alone" for e in range(4)] + [
        "moe best expert per dataset",
        "moe per-token oracle",
    ]
    alone, best, oracle = rows[:4], rows[4], rows[5]
    assert best.nll == min(r.nll for r in alone)
    assert oracle.nll < best.nll  # random experts: each wins some tokens
    assert len({(r.tokens, r.bytes) for r in rows}) == 1
    with torch.no_grad():  # expert 2 in every slot: the routed model is expert 2's own model
        for block in m.h:
            for linear in (block.moe.fc1, block.moe.fc2):
                linear.weight[:] = linear.weight[2].clone()
                linear.bias[:] = linear.bias[2].clone()
    routed = evaluate(m, TEXTS, seq_len=32, progress=False)
    assert routed.nll == pytest.approx(alone[2].nll, rel=1e-5)


def test_eval_command_prints_the_oracle_rows(capsys):
    argv = ["eval", "--model", str(msft_moe_checkpoint()), "--stdlib-slice", "docs", "--max-tokens", "200",
            "--seq-len", "64", "--oracles", "--backend", "torch", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads(out.strip().splitlines()[-1])["results"]
    by_name = {r["model"].split(" ", 1)[-1] if " " in r["model"] else "routed": r for r in results}
    assert set(by_name) == {"routed", "best expert per dataset", "per-token oracle"} | {
        f"expert {e} alone" for e in range(4)
    }
    assert by_name["per-token oracle"]["perplexity"] == pytest.approx(math.exp(by_name["per-token oracle"]["nll"]))
    assert by_name["per-token oracle"]["nll"] <= by_name["best expert per dataset"]["nll"]
    assert "per-token oracle" in out.splitlines()[-2]  # the last table row, above the JSON line
