"""The bundled tiny phixtral: a real phixtral checkpoint that loads, generates code-like text and has learned
something."""

import json
import re
from pathlib import Path

import pytest
import torch

import phixtral
from phixtral import cli
from phixtral.commands.evaluate import evaluate
from phixtral.commands.inspect_model import checkpoint_summary, router_health
from phixtral.commands.stdlib_data import slice_texts
from phixtral.model import Phixtral

BUNDLED = Path(phixtral.__file__).parent / "assets" / "tiny-phixtral"


@pytest.fixture(scope="module")
def model():
    return phixtral.from_pretrained(BUNDLED, device="cpu", backend="torch")


def test_bundled_files():
    cfg = json.loads((BUNDLED / "config.json").read_text())
    assert cfg["model_type"] == "phi-msft" and cfg["torch_dtype"] == "float16"
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    size = sum(f.stat().st_size for f in BUNDLED.glob("*.safetensors"))
    assert size <= 25 * 10**6
    assert (
        len(json.loads((BUNDLED / "model.safetensors.index.json").read_text())["weight_map"])
        == 1 + 4 * (6 + 1 + 4 * 4) + 4
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "BUILD_LOG.md", "EVAL.md", "merge-recipe.yaml"):
        assert (BUNDLED / name).is_file(), name


def test_the_router_routes():
    s = checkpoint_summary(BUNDLED)
    assert s["params_total"] > s["params_active"]
    for row in router_health(s["gates"]):
        assert not row["identical"] and not row["near_identical"], row


def test_generates_code_like_text(model):
    completion = model.generate("def print_prime(n):", max_new_tokens=32, temperature=0.0)  # the new text only
    assert len(completion) > 20
    assert re.search(r"\n +\w", completion), completion  # indented lines: code, not noise
    assert sum(c.isprintable() or c in "\n\t" for c in completion) >= 0.95 * len(completion)


def test_perplexity_far_below_a_random_model(model):
    texts = slice_texts("asyncio", "heldout")
    ppl = evaluate(model, texts, max_tokens=1024, progress=False).perplexity
    torch.manual_seed(0)
    random_model = Phixtral(model.config, backend="torch").eval()  # torch.nn's default init
    random_model.tokenizer = model.tokenizer
    random_ppl = evaluate(random_model, texts, max_tokens=1024, progress=False).perplexity
    assert ppl < 100 and random_ppl > 1000 and ppl < random_ppl / 20, (ppl, random_ppl)  # measured: 46 and 4967


def test_main_command_defaults_to_the_bundled_model(capsys):
    """`python -m phixtral generate --prompt ...` with no --model."""
    assert Path(phixtral.default_model_path()) == BUNDLED
    assert (
        cli.main(["generate", "--prompt", "def print_prime(n):", "--max-new-tokens", "16", "--backend", "torch"]) == 0
    )
    out, err = capsys.readouterr()
    assert len(out.strip()) > 10 and "decode: 16 tokens" in err


def test_bundled_router_was_trained_and_says_how():
    """router_training.json records the settings and losses of the train-router run that made the bundled gates."""
    record = json.loads((BUNDLED / "router_training.json").read_text())
    assert record["settings"]["steps"] == len(record["log"]) and record["settings"]["domain_loss_coef"] > 0
    assert record["heldout_after"]["mean"] < record["heldout_before"]["mean"]
    assert set(record["heldout_after"]) == {"asyncio", "web", "docs", "tests", "general", "mean"}
