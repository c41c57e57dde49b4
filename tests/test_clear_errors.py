"""Bad files, bad values and bad exits: each a one-line error naming the file, field or flag, never a traceback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers_models import msft_moe_checkpoint
from phi_checkpoints import make_phi

import phixtral
from phixtral.cli import build_parser, main
from phixtral.commands.merge import router_warning

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def copy_checkpoint(tmp_path) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(msft_moe_checkpoint(), folder)
    return folder


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


# --- files -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "eval", "inspect"])
def test_truncated_shard_is_named_by_every_command(tmp_path, capsys, command):
    folder = copy_checkpoint(tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[1]
    truncate(shard)
    argv = {
        "generate": ["generate", "--model", str(folder), "--prompt", "hi", "--backend", "torch"],
        "eval": ["eval", "--model", str(folder), "--stdlib-slice", "asyncio", "--max-tokens", "64", "--no-progress"],
        "inspect": ["inspect", "--model", str(folder)],
    }[command]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"phixtral {command}: error: {shard}")
    assert "not a readable safetensors file" in err[0]


def test_corrupt_source_shard_is_named_by_merge(tmp_path, capsys):
    base = make_phi(tmp_path / "base", seed=0)
    expert = make_phi(tmp_path / "e0", seed=1)
    (shard,) = expert.glob("*.safetensors")
    shard.write_bytes(b"not a safetensors file at all")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(base), "gate_mode": "random", "dtype": "float32",
        "experts": [{"source_model": str(base)}, {"source_model": str(expert)}],
    }))  # fmt: skip
    capsys.readouterr()  # drop the progress bars of the checkpoints' writing
    assert main(["merge", str(recipe), "--out", str(tmp_path / "moe")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(shard) in err[0] and "not a readable safetensors file" in err[0]
    assert not (tmp_path / "moe").exists() or not any((tmp_path / "moe").iterdir())


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "generation_config.json", "config.json"])
def test_invalid_json_names_the_file(tmp_path, name):
    folder = copy_checkpoint(tmp_path)
    (folder / name).write_text('{"eos_token_id": 2,')
    with pytest.raises(ValueError, match=f"{folder / name} is not valid JSON"):
        phixtral.from_pretrained(folder, backend="torch")


def test_json_that_is_not_an_object_names_the_file(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="generation_config.json must hold a JSON object, got a list"):
        phixtral.from_pretrained(folder, backend="torch")


@pytest.mark.parametrize(
    "key, value",
    [("rope_theta", "abc"), ("rope_theta", -1.0), ("layer_norm_epsilon", "1e-5"), ("layer_norm_epsilon", 0)],
)
def test_bad_config_number_names_the_field_and_the_file(tmp_path, key, value):
    folder = copy_checkpoint(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{folder / 'config.json'}: config: {key} must be"):
        phixtral.from_pretrained(folder, backend="torch")


def test_bad_hf_config_values_name_the_field():
    from phixtral.config import PhixtralConfig

    d = {"model_type": "phi", "vocab_size": 10, "hidden_size": "64", "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 4, "max_position_embeddings": 16}  # fmt: skip
    with pytest.raises(ValueError, match="config: hidden_size must be a positive int, got '64'"):
        PhixtralConfig.from_dict(d)
    d.update(hidden_size=64, partial_rotary_factor="half")
    with pytest.raises(ValueError, match="config: partial_rotary_factor must be a finite number"):
        PhixtralConfig.from_dict(d)


# --- the command line ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, flag, message",
    [
        (["eval", "--batch-size", "-1"], "--batch-size", "must be >= 1, got -1"),
        (["eval", "--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
        (["eval", "--max-tokens", "-5"], "--max-tokens", "must be >= 1, got -5"),
        (["eval", "--seq-len", "1"], "--seq-len", "must be >= 2, got 1"),
        (["inspect", "--max-tokens", "0"], "--max-tokens", "must be >= 1, got 0"),
        (["generate", "--prompt", "p", "--max-new-tokens", "0"], "--max-new-tokens", "must be >= 1, got 0"),
        (["generate", "--prompt", "p", "--max-new-tokens", "many"], "--max-new-tokens", "expected an int, got 'many'"),
        (["generate", "--prompt", "p", "--temperature", "-1"], "--temperature", "must be in [0, inf), got -1"),
        (["generate", "--prompt", "p", "--temperature", "nan"], "--temperature", "must be in [0, inf), got nan"),
        (["generate", "--prompt", "p", "--top-p", "2"], "--top-p", "must be in (0, 1], got 2"),
        (["generate", "--prompt", "p", "--top-k", "-2"], "--top-k", "must be >= 0, got -2"),
        (
            ["generate", "--prompt", "p", "--repetition-penalty", "0"],
            "--repetition-penalty",
            "must be in (0, inf), got 0",
        ),
        (["generate", "--prompt", "p", "--seed", str(2**70)], "--seed", f"must be in [0, 2**64), got {2**70}"),
        (["generate", "--prompt", "p", "--experts-per-tok", "0"], "--experts-per-tok", "must be >= 1, got 0"),
        (["merge", "r.yaml", "--out", "o", "--max-shard-size", "0"], "--max-shard-size", "must be in (0, inf), got 0"),
    ],
)
def test_bad_flag_values_name_the_flag(capsys, argv, flag, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["generate", "eval", "inspect", "merge"])
def test_help_shows_every_default(command):
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    text = sub.format_help()
    for action in sub._actions:
        if not action.option_strings or action.help == "show this help message and exit" or action.required:
            continue
        if action.default is None or action.default is False:
            continue  # flags, and options whose help says in words what None means
        assert f"(default: {action.default})" in " ".join(text.split()), action.dest
    for action in sub._actions:
        if action.option_strings and action.default is None and not action.required:
            assert "default" in (action.help or "") or "repeatable" in (action.help or ""), action.dest


def _start(argv, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "phixtral", *argv], env=ENV, cwd=ROOT, text=True, **kwargs)


def test_ctrl_c_exits_130_without_a_traceback():
    proc = _start(["generate", "--prompt", "def f(x):", "--max-new-tokens", "400", "--backend", "torch"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    first = proc.stdout.read(1)  # generation has started
    assert first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_closed_pipe_exits_quietly():
    proc = _start(["generate", "--prompt", "def f(x):", "--max-new-tokens", "200", "--backend", "torch"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.read(5)
    proc.stdout.close()  # what `| head -c5` does
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    err = proc.stderr.read()
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


# --- first run -------------------------------------------------------------------------------------------------------
def test_triton_backend_without_the_interpreter_fails_at_once_on_cpu():
    code = (
        "import phixtral\n"
        "m = phixtral.from_pretrained(phixtral.default_model_path(), backend='torch')\n"
        "try:\n    m.set_backend('triton')\nexcept RuntimeError as e:\n    print('refused:', e)\n"
        "print('backend:', m.backend)\n"
    )
    env = {**ENV, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "refused: backend='triton' cannot run on cpu" in proc.stdout and "backend: torch" in proc.stdout


def test_bundled_model_chats():
    model = phixtral.from_pretrained(phixtral.default_model_path(), backend="torch")
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    prompt = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "Instruct: Write a function that adds two numbers.\nOutput:"
    assert model.chat(messages, max_new_tokens=8) == model.generate(prompt, max_new_tokens=8)


def test_prompt_longer_than_the_context_gives_only_our_error(capfd):
    model = phixtral.from_pretrained(phixtral.default_model_path(), backend="torch")
    with pytest.raises(ValueError, match=r"exceeds the model's n_positions \(512\)"):
        model.generate("hello world " * 400, max_new_tokens=4)
    assert "Token indices sequence length" not in capfd.readouterr().err


@pytest.mark.parametrize("E, k, words", [(2, 2, "CANNOT WEIGH"), (4, 2, "CANNOT ROUTE"), (2, 1, "CANNOT ROUTE")])
def test_router_warning_fits_top_k(E, k, words):
    text = router_warning({(0, 1): [0, 1]}, 2, E, k)
    assert text.startswith(f"THE ROUTER {words}: experts 0 and 1 have the same gate vector in every layer")
    if k >= E:
        assert "every expert runs on every token" in text and "never runs" not in text
    else:
        assert "never where the tie decides" in text
