"""scripts/router_ceiling.py's parts (slice probes, context routing) on a tiny random phixtral."""

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers_models import msft_moe_checkpoint

import phixtral
from phixtral.commands.router_targets import only_expert

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "router_ceiling.py"
VOCAB = 512


@pytest.fixture(scope="module")
def ceiling():
    spec = importlib.util.spec_from_file_location("router_ceiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_causal_mean_averages_each_windows_rows_up_to_each_position(ceiling):
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    m = ceiling.causal_mean(x)
    for b in range(2):
        for s in range(5):
            torch.testing.assert_close(m[b, s], x[b, : s + 1].mean(0))


def test_probe_separates_separable_classes_and_is_scored_on_other_points(ceiling):
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 8, generator=g) * 4
    y = torch.arange(4).repeat_interleave(50)
    x = centres[y] + torch.randn(200, 8, generator=g)
    probe = ceiling.Probe(x, y, 4)
    x_new = centres[y] + torch.randn(200, 8, generator=g)
    assert probe.accuracy(x_new, y) > 0.95
    assert probe.accuracy(x_new, (y + 1) % 4) < 0.05  # the accuracy counts matches, not anything


class ConstantProbe:
    def __init__(self, e):
        self.e = e

    def predict(self, x):
        return torch.full((x.shape[0],), self.e)


class SignProbe:
    """Expert 1 where the first feature (of the causal mean it is given) is positive, else expert 0."""

    def predict(self, x):
        return (x[:, 0] > 0).long()


@pytest.mark.parametrize("e", [0, 2])
def test_context_routing_to_one_expert_is_that_experts_dense_model(ceiling, e):
    m = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(e))
    routed = m(ids)
    with only_expert(m, e):
        alone = m(ids)
    with ceiling.context_routing(m, [ConstantProbe(e)] * len(m.h)):
        by_probe = m(ids)
    torch.testing.assert_close(by_probe, alone, atol=0, rtol=0)
    torch.testing.assert_close(m(ids), routed, atol=0, rtol=0)  # the model's own routing once the block is left


def test_context_routing_sends_each_token_to_its_own_pick(ceiling):
    """Tokens routed to different experts get each expert's output: the layer's output is expert 0's where the probe
    says 0 and expert 1's where it says 1."""
    m = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    moe = m.h[0].moe
    x = torch.randn(2, 6, m.config.n_embd, generator=torch.Generator().manual_seed(3))
    with ceiling.context_routing(m, [SignProbe()] * len(m.h)):
        y = moe(x)
    pick = (ceiling.causal_mean(x)[..., 0] > 0).long()  # [2, 6]
    assert 0 < int(pick.sum()) < pick.numel()  # both experts are used
    y0, y1 = ceiling.expert_forward(moe, 0, x), ceiling.expert_forward(moe, 1, x)
    torch.testing.assert_close(y, torch.where(pick[..., None].bool(), y1, y0), atol=0, rtol=0)


def test_slice_windows_labels_each_prediction_with_its_slice(ceiling):
    streams = {s: torch.arange(100) + 1000 * i for i, s in enumerate(ceiling.EXPERT_SLICES)}
    windows, labels = ceiling.slice_windows(streams, 2, 9)
    assert windows.shape == (8, 10) and labels.shape == (8 * 9,)
    per_prediction = (windows[:, :-1] // 1000).flatten()  # the slice each predicted position's token came from
    torch.testing.assert_close(per_prediction, labels)
