"""The model flags every command shares: declared once (same help, same checks), each bad value an exit 2 under the
flag's name, --threads applied, and defaults that fit the model."""

import argparse

import pytest
import torch
from helpers_models import msft_moe_checkpoint

from phixtral.cli import build_parser, main
from phixtral.commands import args as command_args

MODEL_FLAGS = ("--model", "--dtype", "--device", "--backend", "--experts-per-tok", "--quantize", "--threads")
# The model flags of each command: it leaves out those it fixes itself (train-router and quantize compute in float32,
# quantize on the torch path, inspect reports the checkpoint's own top-k).
DECLARED = {
    "generate": MODEL_FLAGS,
    "serve": MODEL_FLAGS,
    "eval": MODEL_FLAGS,
    "inspect": ("--model", "--dtype", "--device", "--backend", "--quantize", "--threads"),
    "train-router": ("--model", "--device", "--backend", "--experts-per-tok", "--threads"),
    "quantize": ("--model", "--device", "--threads"),
}


def subparser(command: str) -> argparse.ArgumentParser:
    return build_parser()._subparsers._group_actions[0].choices[command]


def flags(command: str) -> dict:
    return {opt: a for a in subparser(command)._actions for opt in a.option_strings}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    import inspect
    import textwrap

    path = tmp_path_factory.mktemp("data") / "code.py"
    path.write_text(inspect.getsource(textwrap))
    return path


def argv_of(command: str, tmp_path, text_file) -> list[str]:
    """A command line of `command` that loads the tiny MoE (4 experts, n_positions 128) on the torch path."""
    m = str(msft_moe_checkpoint())
    return {
        "generate": ["generate", "--model", m, "--prompt", "def f(x):", "--max-new-tokens", "2", "--backend", "torch"],
        "serve": ["serve", "--model", m, "--port", "0", "--backend", "torch"],
        "eval": ["eval", "--model", m, "--data", str(text_file), "--max-tokens", "64", "--no-progress",
                 "--backend", "torch"],
        "inspect": ["inspect", "--model", m, "--prompt", "def f(x):", "--backend", "torch"],
        "train-router": ["train-router", "--model", m, "--data", str(text_file), "--out", str(tmp_path / "out"),
                         "--steps", "1", "--backend", "torch", "--no-progress"],
        "quantize": ["quantize", "--model", m, "--bits", "8", "--out", str(tmp_path / "out"), "--no-progress"],
    }[command]  # fmt: skip


def exits_2(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    return err


# --- one declaration --------------------------------------------------------------------------------------------------
def test_every_model_loading_command_declares_the_same_flags():
    reference = flags("generate")
    for command, expected in DECLARED.items():
        actions = flags(command)
        assert [f for f in MODEL_FLAGS if f in actions] == list(expected), command
        for flag in expected:
            mine, theirs = actions[flag], reference[flag]
            if flag == "--model":  # required / repeatable where the command needs it; the same words
                assert mine.help.startswith(command_args.MODEL_HELP), command
                continue
            assert (mine.help, mine.default, mine.metavar) == (theirs.help, theirs.default, theirs.metavar), (
                command,
                flag,
            )
            assert getattr(mine.type, "__name__", None) == getattr(theirs.type, "__name__", None), (command, flag)
            if flag != "--backend" or command != "train-router":  # train-router offers the paths it is tested on
                assert mine.choices == theirs.choices, (command, flag)
    assert tuple(flags("train-router")["--backend"].choices) == ("auto", "triton", "torch")
    assert "--threads" in flags("merge")  # merge computes (gate_mode hidden) without loading a model through the flags


def test_dtype_choices_are_the_names_the_loader_accepts():
    from phixtral import weights

    assert sorted(command_args.DTYPES) == sorted(weights._DTYPES)


# --- bad values: exit 2 under the flag --------------------------------------------------------------------------------
@pytest.mark.parametrize("command", list(DECLARED))
def test_bad_model_flag_values_exit_2_naming_the_flag(command, tmp_path, text_file, capsys):
    import logging

    argv = argv_of(command, tmp_path, text_file)
    cases = [("--threads", "0", "argument --threads: must be >= 1, got 0"),
             ("--device", "gpu", "argument --device: invalid device 'gpu'")]  # fmt: skip
    if "--dtype" in DECLARED[command]:
        cases.append(("--dtype", "float8", "argument --dtype: invalid choice: 'float8'"))
    if "--experts-per-tok" in DECLARED[command]:
        cases.append(("--experts-per-tok", "9", "argument --experts-per-tok: 9 exceeds the model's 4 experts"))
    if "--quantize" in DECLARED[command]:
        cases += [
            ("--quantize", "int3", "argument --quantize: 'int3' is not a spec: use int4 or int8"),
            ("--quantize", "int4", "argument --quantize: group_size 128 does not divide the 64 in features"),
        ]
    for flag, value, message in cases:
        err = exits_2([*argv, flag, value], capsys)
        assert message in err and "config.json" not in err, (flag, err)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert not logging.getLogger("phixtral.serve").handlers  # the server's log was not set up for a refused start


@pytest.mark.parametrize("command", ["eval", "train-router"])
def test_a_window_longer_than_the_context_exits_2_naming_seq_len(command, tmp_path, text_file, capsys):
    err = exits_2([*argv_of(command, tmp_path, text_file), "--seq-len", "4096"], capsys)
    assert "argument --seq-len: 4096 exceeds the model's n_positions (128)" in err


def test_merge_threads_is_checked(capsys):
    assert "argument --threads: must be >= 1, got 0" in exits_2(
        ["merge", "r.yaml", "--out", "o", "--threads", "0"], capsys
    )


def test_generate_says_how_many_new_tokens_fit(capsys):
    argv = ["generate", "--model", str(msft_moe_checkpoint()), "--prompt", "def f(x):", "--backend", "torch"]
    err = exits_2([*argv, "--max-new-tokens", "200"], capsys)
    assert "argument --max-new-tokens: the prompt's" in err and "exceed the model's n_positions (128): at most" in err


def test_errors_name_the_overwrite_flag(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["quantize", "--model", str(msft_moe_checkpoint()), "--bits", "8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--out: " in err and "pass --overwrite to replace it" in err and "overwrite=True" not in err


# --- --threads --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "inspect", "eval"])
def test_threads_sets_torchs_threads(command, tmp_path, text_file, capsys):
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        assert main([*argv_of(command, tmp_path, text_file), "--threads", str(wanted)]) == 0
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)


# --- defaults that fit the model --------------------------------------------------------------------------------------
def test_train_router_default_window_fits_a_short_context(tmp_path, text_file, capsys):
    import json

    argv = [
        *argv_of("train-router", tmp_path, text_file),
        "--batch-size",
        "2",
        "--eval-every",
        "1",
        "--eval-tokens",
        "128",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--seq-len: 128 tokens per window, the model's n_positions (the default 256 does not fit)" in err
    record = json.loads((tmp_path / "out" / "router_training.json").read_text())
    assert record["settings"]["seq_len"] == 128
