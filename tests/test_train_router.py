"""phixtral train-router on tiny checkpoints: only the gates move, the loss falls, runs repeat, the output loads."""

import json
import shutil

import pytest
import torch
from helpers_models import msft_moe_checkpoint, read_tensors
from phi_checkpoints import make_phi

import phixtral
from phixtral.cli import main
from phixtral.commands.train_router import (
    LOG_FILE,
    RouterTrainingSettings,
    append_base_expert,
    load_balancing_loss,
    load_token_data,
    train_router,
)

SETTINGS = dict(steps=12, lr=0.05, seq_len=32, batch_size=4, eval_every=6, eval_tokens=256)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """About 60 KB of Python: the bodies of two standard library modules."""
    import inspect
    import json as json_module
    import textwrap

    path = tmp_path_factory.mktemp("data") / "code.py"
    path.write_text(inspect.getsource(json_module.decoder) + inspect.getsource(textwrap))
    return path


def model():
    return phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")


def test_load_balancing_loss_is_one_when_even_and_e_when_collapsed():
    E = 4
    even = torch.zeros(8, E)
    even[torch.arange(8), torch.arange(8) % E] = 5.0  # each expert first for 2 tokens, probabilities spread evenly
    assert load_balancing_loss(torch.zeros(8, E) + torch.arange(E) * 0, 2).item() == pytest.approx(1.0)
    assert load_balancing_loss(even, 1).item() == pytest.approx(1.0, abs=1e-6)
    collapsed = torch.zeros(8, E)
    collapsed[:, 0] = 50.0
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(E, rel=1e-4)


def test_only_the_gates_train_and_the_loss_falls(text_file):
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
    record = train_router(m, data, RouterTrainingSettings(**SETTINGS), progress=False, log=lambda s: None)
    after = m.state_dict()
    for name, t in before.items():
        if name.endswith("moe.gate.weight"):
            assert not torch.equal(t, after[name]), f"{name} did not train"
        else:
            assert torch.equal(t, after[name]), f"{name} changed but should be frozen"
    assert record["heldout_after"]["mean"] < record["heldout_before"]["mean"]
    assert [e["step"] for e in record["log"]] == list(range(1, 13)) and "heldout" in record["log"][5]
    assert not any(p.requires_grad for p in m.parameters())  # frozen again, ready for inference


def test_same_seed_same_gates_other_seed_other_gates(text_file):
    def gates(seed):
        m = model()
        data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
        train_router(
            m,
            data,
            RouterTrainingSettings(**{**SETTINGS, "steps": 4, "seed": seed}),
            progress=False,
            log=lambda s: None,
        )
        return torch.stack([b.moe.gate.weight for b in m.h])

    a = gates(0)
    assert torch.equal(a, gates(0))
    assert not torch.equal(a, gates(1))


def test_aux_loss_spreads_a_collapsed_router(text_file):
    m = model()
    data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
    inputs = []
    handles = [
        b.moe.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].flatten(0, 1).mean(0))) for b in m.h
    ]
    m(data.train[text_file.name][None, :64])
    for h in handles:
        h.remove()
    with torch.no_grad():  # gate row 0 = the mean MoE input, scaled up: (nearly) every token picks expert 0 first
        for block, mean in zip(m.h, inputs):
            block.moe.gate.weight.zero_()
            block.moe.gate.weight[0] = 50 * mean / mean.norm() ** 2
    settings = RouterTrainingSettings(**{**SETTINGS, "aux_loss_coef": 10.0, "steps": 20, "lr": 0.1})
    record = train_router(m, data, settings, progress=False, log=lambda s: None)
    first, last = record["log"][0]["aux_loss"], record["log"][-1]["aux_loss"]
    assert first > 1.5 and last < first - 0.3


def test_command_writes_a_checkpoint_that_loads_with_its_log(tmp_path, text_file, capsys):
    out = tmp_path / "trained"
    argv = ["train-router", "--model", str(msft_moe_checkpoint()), "--data", str(text_file), "--steps", "6",
            "--lr", "0.05", "--seq-len", "32", "--batch-size", "4", "--eval-every", "3", "--eval-tokens", "256",
            "--backend", "torch", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "held-out loss" in capsys.readouterr().out
    record = json.loads((out / LOG_FILE).read_text())
    assert (
        record["settings"]["steps"] == 6 and record["heldout_after"]["mean"] <= record["heldout_before"]["mean"] + 1e-3
    )
    # Every tensor on disk: the same names and dtypes as the source, each gate the one train_router gives for the
    # flags' settings (seeded), everything else the source's bits.
    m = model()
    data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
    settings = RouterTrainingSettings(steps=6, lr=0.05, seq_len=32, batch_size=4, eval_every=3, eval_tokens=256)
    train_router(m, data, settings, progress=False, log=lambda s: None)
    written, source = read_tensors(out), read_tensors(msft_moe_checkpoint())
    assert sorted(written) == sorted(source)
    for name, t in written.items():
        assert t.dtype == source[name].dtype, name
        if name.endswith("moe.gate.weight"):
            assert torch.equal(t, m.h[int(name.split(".")[2])].moe.gate.weight), f"{name} is not the trained gate"
            assert not torch.equal(t, source[name]), f"{name} did not train"
        else:
            assert torch.equal(t, source[name]), f"{name} differs from the source"
    config, source_config = (json.loads((f / "config.json").read_text()) for f in (out, msft_moe_checkpoint()))
    assert {k: source_config.get(k) for k in config} == config
    trained = phixtral.from_pretrained(out, backend="torch")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(trained(ids), m(ids), rtol=0, atol=0)
    assert main(argv) == 1  # --out is not empty now
    err = capsys.readouterr().err
    assert "is not empty; pass --overwrite to replace it" in err and "overwrite=True" not in err


def test_command_refuses_to_write_over_its_source(tmp_path, text_file, capsys):
    src = tmp_path / "moe"
    shutil.copytree(msft_moe_checkpoint(), src)
    argv = ["train-router", "--model", str(src), "--data", str(text_file), "--steps", "2", "--out", str(src),
            "--overwrite", "--backend", "torch", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    assert "refusing to write" in capsys.readouterr().err


def test_add_base_expert_appends_the_dense_mlp(tmp_path):
    m = model()
    E = m.config.num_local_experts
    base = make_phi(tmp_path / "base", seed=0, layout="msft", n_embd=64, n_layer=2, n_head=4)  # MLP shapes as the MoE
    dense = phixtral.from_pretrained(base, backend="torch")
    append_base_expert(m, base)
    assert m.config.num_local_experts == E + 1
    for mine, theirs in zip(m.h, dense.h):
        assert mine.moe.gate.weight.shape[0] == E + 1 and not mine.moe.gate.weight[E].any()
        assert torch.equal(mine.moe.fc1.weight[E], theirs.moe.fc1.weight[0])
        assert torch.equal(mine.moe.fc2.bias[E], theirs.moe.fc2.bias[0])
    m.save_pretrained(tmp_path / "five")
    reloaded = phixtral.from_pretrained(tmp_path / "five", backend="torch")
    assert reloaded.config.num_local_experts == E + 1
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch.testing.assert_close(reloaded(ids), m(ids))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(steps=0), "steps must be a positive int"),
        (dict(lr=0.0), "lr must be"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    ],
)
def test_bad_settings_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        RouterTrainingSettings(**{**SETTINGS, **change}).validate()


def test_dense_model_has_no_router_to_train(tmp_path, text_file):
    base = make_phi(tmp_path / "base", seed=0, layout="msft")
    dense = phixtral.from_pretrained(base, backend="torch")
    data = load_token_data(dense.tokenizer, [str(text_file)], min_tokens=32)
    with pytest.raises(ValueError, match="no router to train"):
        train_router(dense, data, RouterTrainingSettings(**SETTINGS), progress=False)


def test_triton_backend_trains_the_same_gates_as_torch(text_file):
    """The CUDA path (the fused kernels' backward), run here under the Triton interpreter."""

    def gates(backend):
        m = model()
        m.set_backend(backend)
        data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
        settings = RouterTrainingSettings(**{**SETTINGS, "steps": 3, "eval_every": 3})
        train_router(m, data, settings, progress=False, log=lambda s: None)
        return torch.stack([b.moe.gate.weight for b in m.h])

    torch.testing.assert_close(gates("triton"), gates("torch"), atol=1e-4, rtol=1e-3)


def test_domain_loss_pulls_each_dataset_to_its_own_expert(tmp_path, text_file):
    """Two datasets, experts 0 and 1: with the domain loss the router's first pick follows the dataset."""
    import codecs
    import this  # noqa: F401 - the Zen of Python, as prose far from the code of text_file

    other = tmp_path / "prose.txt"
    other.write_text((codecs.decode(this.s, "rot13") + "\n") * 40)
    m = model()
    data = load_token_data(m.tokenizer, [str(text_file), str(other)], min_tokens=32)
    names = [text_file.name, other.name]

    def first_pick_share():
        from phixtral.commands.train_router import RouterLogits

        shares = []
        with torch.no_grad():
            for e, name in enumerate(names):
                collector = RouterLogits(m)
                m(data.heldout[name][None, :128])
                logits = collector.take()
                collector.remove()
                shares.append(sum(float((lg.argmax(-1) == e).float().mean()) for lg in logits) / len(logits))
        return shares

    before = first_pick_share()
    settings = RouterTrainingSettings(
        **{**SETTINGS, "steps": 40, "lr": 0.1, "domain_loss_coef": 1.0, "expert_data": names}
    )
    record = train_router(m, data, settings, progress=False, log=lambda s: None)
    after = first_pick_share()
    assert record["log"][-1]["domain_loss"] < record["log"][0]["domain_loss"]
    assert all(a > b + 0.15 for a, b in zip(after, before)), (before, after)  # 4 experts: 0.25 is chance


def test_domain_loss_needs_known_datasets(text_file):
    m = model()
    data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
    with pytest.raises(ValueError, match="domain_loss_coef needs expert_data"):
        train_router(m, data, RouterTrainingSettings(**{**SETTINGS, "domain_loss_coef": 1.0}), progress=False)
    with pytest.raises(ValueError, match=r"expert_data names \['nope'\]"):
        train_router(m, data, RouterTrainingSettings(**{**SETTINGS, "expert_data": ["nope"]}), progress=False)


def test_token_loss_distills_the_per_token_targets_into_every_gate(text_file, monkeypatch):
    """The per-token targets reach every layer's gate: with experts whose own losses say "expert 3" on every token,
    the router's first pick becomes expert 3. (The losses themselves: test_router_targets.)"""
    import phixtral.commands.train_router as train_router_module
    from phixtral.commands.router_targets import expert_token_losses
    from phixtral.commands.train_router import RouterLogits

    calls = []

    def losses(model, windows):
        real = expert_token_losses(model, windows)  # [E, B, S]
        calls.append(real.shape)
        return torch.where(torch.arange(4)[:, None, None] == 3, 0.0, 5.0).expand_as(real)

    monkeypatch.setattr(train_router_module, "expert_token_losses", losses)
    m = model()
    data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
    held = data.heldout[text_file.name][:128][None]

    def share_of_expert_3():
        collector = RouterLogits(m)
        with torch.no_grad():
            m(held)
        logits = collector.take()
        collector.remove()
        return [float((lg.argmax(-1) == 3).float().mean()) for lg in logits]

    before = share_of_expert_3()
    settings = RouterTrainingSettings(**{**SETTINGS, "steps": 30, "lr": 0.1, "token_loss_coef": 1.0})
    record = train_router(m, data, settings, progress=False, log=lambda s: None)
    assert calls == [(4, 4, 32)] * 30  # the step's own windows, once a step
    assert record["log"][-1]["token_loss"] < record["log"][0]["token_loss"]
    assert all(after > 0.9 for after in share_of_expert_3()), (before, share_of_expert_3())
    assert min(before) < 0.5


def test_ridge_init_forgets_the_checkpoints_gates_and_runs_repeat_bit_for_bit(text_file):
    """--init ridge: the gates are solved before training, so two checkpoints that differ only in their gates train to
    the same gates; and a run repeats bit for bit for a seed."""

    def trained(scramble: bool, seed: int = 0):
        m = model()
        if scramble:
            with torch.no_grad():
                for block in m.h:
                    block.moe.gate.weight.copy_(torch.randn_like(block.moe.gate.weight))
        data = load_token_data(m.tokenizer, [str(text_file)], min_tokens=32)
        settings = RouterTrainingSettings(
            **{**SETTINGS, "steps": 4, "eval_every": 4, "seed": seed, "init": "ridge", "ridge_windows": 4,
               "token_loss_coef": 1.0}
        )  # fmt: skip
        record = train_router(m, data, settings, progress=False, log=lambda s: None)
        return torch.stack([b.moe.gate.weight for b in m.h]), record

    a, record = trained(False)
    assert set(record["heldout_after_init"]) == {text_file.name, "mean"} and record["init_seconds"] >= 0
    assert record["heldout_after_init"] != record["heldout_before"]
    assert torch.equal(a, trained(False)[0])
    assert torch.equal(a, trained(True)[0])
    assert not torch.equal(a, trained(False, seed=1)[0])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(token_loss_coef=-0.5), "token_loss_coef must be"),
        (dict(token_tau=0.0), "token_tau must be a finite number > 0"),
        (dict(ridge_lambda=float("nan")), "ridge_lambda must be"),
        (dict(ridge_windows=0), "ridge_windows must be a positive int"),
        (dict(init="zeros"), r"init must be one of \('checkpoint', 'ridge'\)"),
    ],
)
def test_bad_token_and_ridge_settings_name_the_field(change, match):
    with pytest.raises(ValueError, match=match):
        RouterTrainingSettings(**{**SETTINGS, **change}).validate()


def test_command_takes_the_token_and_ridge_flags(tmp_path, text_file, capsys):
    out = tmp_path / "trained"
    argv = ["train-router", "--model", str(msft_moe_checkpoint()), "--data", str(text_file), "--steps", "2",
            "--seq-len", "32", "--batch-size", "4", "--eval-every", "2", "--eval-tokens", "128", "--backend", "torch",
            "--token-loss-coef", "0.5", "--token-tau", "2", "--init", "ridge", "--ridge-windows", "3",
            "--ridge-lambda", "0.01", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "held-out loss after the ridge gates" in err and "token loss" in err
    settings = json.loads((out / LOG_FILE).read_text())["settings"]
    assert (settings["token_loss_coef"], settings["token_tau"], settings["init"]) == (0.5, 2.0, "ridge")
    assert (settings["ridge_windows"], settings["ridge_lambda"]) == (3, 0.01)
    with pytest.raises(SystemExit):
        main(argv[:-3] + ["--token-tau", "0", "--out", str(tmp_path / "other")])
    assert "argument --token-tau" in capsys.readouterr().err
