"""Per-token router targets and ridge gates (phixtral/commands/router_targets.py) on a tiny random phixtral."""

import pytest
import torch
import torch.nn.functional as F
from helpers_models import msft_config, msft_moe_checkpoint, read_tensors, reference_phixtral_forward

import phixtral
from phixtral.commands.router_targets import (
    expert_token_losses,
    moe_inputs,
    only_expert,
    ridge_gates,
    ridge_init,
    ridge_solve,
    spaced_windows,
    token_target_logits,
    token_target_loss,
    token_targets,
)

SHAPE = dict(hidden=64, layers=2, heads=4, vocab=512, n_positions=128, rotary_dim=8)


def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


def dense_tensors(tensors: dict, e: int) -> dict:
    """The dense phi-2 (one MLP per layer) made of expert e's fc1 / fc2 and the shared weights."""
    out = {}
    for name, t in tensors.items():
        if ".moe.gate." in name:
            continue
        if ".moe.mlp." in name:
            prefix, rest = name.split(".moe.mlp.")
            index, param = rest.split(".", 1)
            if int(index) == e:
                out[f"{prefix}.mlp.{param}"] = t
            continue
        out[name] = t
    return out


@pytest.mark.parametrize("e", [0, 3])
def test_only_expert_is_that_experts_dense_model(e):
    m = model()
    ids = torch.randint(0, SHAPE["vocab"], (2, 24), generator=torch.Generator().manual_seed(e))
    cfg = msft_config(**SHAPE)  # dense: no num_local_experts
    expected = reference_phixtral_forward(dense_tensors(read_tensors(msft_moe_checkpoint()), e), cfg, ids)
    routed = m(ids)
    with only_expert(m, e):
        alone = m(ids)
    torch.testing.assert_close(alone, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(routed, alone, atol=1e-3)
    torch.testing.assert_close(m(ids), routed, atol=0, rtol=0)  # routed again once the block is left


def test_only_expert_refuses_an_expert_out_of_range():
    with pytest.raises(ValueError, match=r"expert must be in \[0, 4\), got 4"):
        with only_expert(model(), 4):
            pass


def test_expert_token_losses_are_each_experts_cross_entropy():
    m = model()
    windows = torch.randint(0, SHAPE["vocab"], (3, 17), generator=torch.Generator().manual_seed(1))
    losses = expert_token_losses(m, windows)
    assert losses.shape == (4, 3, 16)
    with only_expert(m, 2):
        logits = m(windows[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none").view(3, 16)
    torch.testing.assert_close(losses[2], expected)


def test_token_targets_favour_the_expert_with_the_lowest_loss():
    losses = torch.tensor([[1.0, 3.0], [2.0, 1.0], [4.0, 1.0 + 1e-3]])  # [E=3, T=2]
    q = token_targets(losses, tau=1.0)
    assert q.shape == (2, 3)
    torch.testing.assert_close(q.sum(-1), torch.ones(2))
    torch.testing.assert_close(q[0], torch.tensor([1.0, 2.0, 4.0]).neg().softmax(0))
    assert q.argmax(-1).tolist() == [0, 1]
    sharp = token_targets(losses, tau=1e-4)  # tau -> 0: the per-token oracle's one-hot choice
    torch.testing.assert_close(sharp[0], torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="tau must be > 0"):
        token_targets(losses, tau=0.0)


def test_token_target_loss_is_a_soft_cross_entropy():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(token_target_loss(logits, one_hot), F.cross_entropy(logits, torch.tensor([0, 2])))
    soft = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    expected = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(token_target_loss(logits, soft), expected)
    assert token_target_loss(logits.log_softmax(-1).exp().log(), logits.softmax(-1)) < token_target_loss(logits, soft)


def test_ridge_solve_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g)
    w = torch.randn(3, 16, generator=g)
    torch.testing.assert_close(ridge_solve(x, x @ w.t(), lam=1e-8).float(), w, atol=1e-4, rtol=1e-4)
    shrunk = ridge_solve(x, x @ w.t(), lam=10.0)
    assert shrunk.norm() < 0.2 * w.norm()  # the penalty pulls toward zero


def test_ridge_gates_fit_every_layer_to_its_own_inputs():
    m = model()
    g = torch.Generator().manual_seed(2)
    # Two "datasets" of 8 tokens each: few enough distinct inputs that a linear gate can tell them apart.
    windows = torch.cat([torch.randint(1, 9, (3, 33), generator=g), torch.randint(300, 308, (3, 33), generator=g)])
    wanted = torch.zeros(6 * 32, 4)
    wanted[:96, 1] = 4.0  # the first three windows to expert 1, the others to expert 3
    wanted[96:, 3] = 4.0
    ridge_gates(m, windows, wanted, lam=1e-3, batch_size=4)
    for i, x in enumerate(moe_inputs(m, windows, batch_size=4)):  # the inputs the fitted gates below produce
        gate = m.h[i].moe.gate.weight
        torch.testing.assert_close(gate.double(), ridge_solve(x, wanted, lam=1e-3), atol=1e-5, rtol=1e-4)
        picks = (x @ gate.t()).argmax(-1)
        assert (picks[:96] == 1).float().mean() > 0.9 and (picks[96:] == 3).float().mean() > 0.9
    with pytest.raises(ValueError, match="lam must be > 0"):
        ridge_gates(m, windows, wanted, lam=0.0, batch_size=4)


def test_spaced_windows_cover_the_stream_evenly():
    stream = torch.arange(100)
    w = spaced_windows(stream, 4, 9)  # offsets 0, 30, 60, 90
    assert w.shape == (4, 10) and w[:, 0].tolist() == [0, 30, 60, 90] and w[-1, -1] == 99
    assert spaced_windows(stream, 1, 9)[0, 0] == 0
    with pytest.raises(ValueError, match="no window of 101"):
        spaced_windows(stream, 2, 100)


def test_token_target_logits_are_the_targets_log_centred():
    losses = torch.tensor([[1.0, 3.0], [2.0, 1.0], [4.0, 1.5]])  # [E=3, T=2]
    z = token_target_logits(losses, tau=0.5)
    torch.testing.assert_close(z.softmax(-1), token_targets(losses, tau=0.5))
    torch.testing.assert_close(z.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)


def test_ridge_init_ignores_the_gates_it_starts_from():
    windows = torch.randint(0, SHAPE["vocab"], (5, 65), generator=torch.Generator().manual_seed(3)).flatten()
    streams = {"a": windows[:160], "b": windows[160:]}
    gates = []
    for scramble in (False, True):
        m = model()
        if scramble:
            with torch.no_grad():
                for block in m.h:
                    block.moe.gate.weight.mul_(-3.0)
        ridge_init(m, streams, windows=3, seq_len=16, tau=1.0, lam=1e-2, batch_size=2)
        gates.append(torch.stack([b.moe.gate.weight for b in m.h]))
    assert torch.equal(gates[0], gates[1])
