"""`phixtral generate` / `python -m phixtral generate` on a tiny checkpoint folder."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_models import msft_moe_checkpoint

import phixtral
from phixtral.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def f7(x, y):\n"


def test_parser_has_generate_with_every_option(capsys):
    args = build_parser().parse_args(
        ["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "7", "--temperature", "0.5", "--top-k", "3",
         "--top-p", "0.9", "--repetition-penalty", "1.1", "--stop", "a", "--stop", "b", "--seed", "4",
         "--dtype", "bf16", "--device", "cpu", "--backend", "naive", "--experts-per-tok", "1"]
    )  # fmt: skip
    assert (args.command, args.model, args.prompt, args.max_new_tokens, args.temperature) == (
        "generate",
        "m",
        "p",
        7,
        0.5,
    )
    assert (args.top_k, args.top_p, args.repetition_penalty, args.stop, args.seed) == (3, 0.9, 1.1, ["a", "b"], 4)
    assert (args.dtype, args.device, args.backend, args.experts_per_tok) == ("bf16", "cpu", "naive", 1)
    assert build_parser().parse_args(["generate", "--prompt", "p"]).model is None
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["generate", "--prompt", "p", "--backend", "cuda"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "phixtral generate: error: argument --backend: invalid choice: 'cuda'" in err
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([])  # a subcommand is required
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "phixtral: error: the following arguments are required: COMMAND" in err


def test_missing_model_folder_is_a_clear_error(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    assert main(["generate", "--model", str(missing), "--prompt", "hi", "--backend", "torch"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("phixtral generate: error:") and "no-such-model" in err


def test_generate_streams_the_same_text_as_the_api(capsys):
    folder = msft_moe_checkpoint()
    assert (
        main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--backend", "torch"])
        == 0
    )
    out, err = capsys.readouterr()
    expected = phixtral.from_pretrained(folder, backend="torch").generate(PROMPT, max_new_tokens=12)
    assert out == expected + "\n"
    assert "prompt: " in err and "decode: 12 tokens" in err and "tokens/s" in err


def test_bad_options_are_reported(capsys):
    # --dtype and --experts-per-tok were library errors with exit 1 (`dtype 'int4' is not supported`, config.json's
    # num_experts_per_tok); they are flag errors now, exit 2 under the flag's name, as every other bad value.
    folder = str(msft_moe_checkpoint())
    for flag, value, message in [("--dtype", "int4", "invalid choice: 'int4'"),
                                 ("--experts-per-tok", "9", "9 exceeds the model's 4 experts"),
                                 ("--top-p", "2", "must be in (0, 1], got 2")]:  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main(["generate", "--model", folder, "--prompt", "hi", "--backend", "torch", flag, value])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"argument {flag}: {message}" in err and "config.json" not in err


def test_python_dash_m_phixtral_generate():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "phixtral", "generate", "--model", str(msft_moe_checkpoint()), "--prompt", PROMPT,
           "--max-new-tokens", "6", "--backend", "torch", "--temperature", "0.7", "--seed", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and "decode: 6 tokens" in proc.stderr
    expected = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch").generate(
        PROMPT, max_new_tokens=6, temperature=0.7, seed=1
    )
    assert proc.stdout == expected + "\n"
