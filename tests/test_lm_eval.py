"""The lm-evaluation-harness model `phixtral`, run by the real lm_eval on local tasks (YAML over a jsonl file written
here; nothing from a hub): its loglikelihoods equal the model's own forward, generate_until gives the greedy text."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import phixtral

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from phixtral.integrations.lm_eval import PhixtralLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {"context": "def fib(n):", "choices": ["return", "import", "pass"], "label": 0, "text": "def fib(n):\n    return n"},
    {"context": "import os\nclass Config", "choices": [":", "("], "label": 1, "text": "The asyncio event loop runs tasks."},
    {"context": "for i in range(10):", "choices": ["print(i)", "yield"], "label": 0, "text": "x = 1\ny = 2\n"},
]
GEN_KWARGS = {"until": ["\n\n", "assert"], "max_gen_toks": 16, "do_sample": False}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of three task YAMLs (multiple choice, rolling loglikelihood, generate_until) over one local jsonl."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "cache")},
        "test_split": "test",
    }
    specs = {
        "phixtral_test_choice": {"output_type": "multiple_choice", "doc_to_text": "context", "doc_to_choice": "choices",
                                 "doc_to_target": "label", "metric_list": [{"metric": "acc"}]},
        "phixtral_test_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
                                  "metric_list": [{"metric": "word_perplexity"}]},
        "phixtral_test_gen": {"output_type": "generate_until", "doc_to_text": "context", "doc_to_target": "context",
                              "generation_kwargs": GEN_KWARGS, "metric_list": [{"metric": "exact_match"}]},
    }  # fmt: skip
    for name, spec in specs.items():
        (folder / f"{name}.yaml").write_text(json.dumps({"task": name, **common, **spec}, indent=1))  # JSON is YAML
    return folder


@pytest.fixture(scope="module")
def model():
    return phixtral.from_pretrained(phixtral.default_model_path(), backend="torch", dtype="float32")


@torch.inference_mode()
def own_loglikelihood(model, context_ids, continuation_ids) -> tuple[float, bool]:
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = F.log_softmax(model(ids)[0, :-1], dim=-1)[len(context_ids) - 1 :]  # predictions of the continuation
    target = torch.tensor(continuation_ids)
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def arguments(sample) -> list[tuple]:
    """A sample's request arguments: tuples in memory, {"gen_args_i": {"arg_j": ...}} in the samples file."""
    args = sample["arguments"]
    return [tuple(a.values()) for a in args.values()] if isinstance(args, dict) else [tuple(a) for a in args]


def check_samples(model, samples):
    tok = model.tokenizer
    eos = tok.eos_token_id
    for s in samples["phixtral_test_choice"]:
        for (context, continuation), (ll, greedy) in zip(arguments(s), s["filtered_resps"]):
            whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
            expected_ll, expected_greedy = own_loglikelihood(model, ctx, whole[len(ctx) :])
            assert float(ll) == pytest.approx(expected_ll, abs=1e-4)
            assert greedy in (expected_greedy, str(expected_greedy))  # the samples file holds strings
    for s in samples["phixtral_test_rolling"]:
        ids = tok(arguments(s)[0][0])["input_ids"]
        assert float(s["filtered_resps"][0]) == pytest.approx(own_loglikelihood(model, [eos], ids)[0], abs=1e-4)
    for s in samples["phixtral_test_gen"]:
        context, gen_kwargs = arguments(s)[0]
        expected = model.generate(context, max_new_tokens=16, stop=gen_kwargs["until"])
        assert s["filtered_resps"][0] == expected
    assert sum(len(v) for v in samples.values()) == 3 * len(DOCS)


def test_python_api_scores_equal_the_models_own_forward(tasks, model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = PhixtralLM(model=model, batch_size=2)  # a model already in memory; batches of 2 pad rows of unequal length
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["phixtral_test_choice", "phixtral_test_rolling", "phixtral_test_gen"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=True,
    )  # fmt: skip
    check_samples(model, results["samples"])
    assert results["results"]["phixtral_test_choice"]["acc,none"] >= 0


def test_lm_eval_command_line_with_the_registered_model(tasks, model, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, "-m", "phixtral.integrations.lm_eval", "--model", "phixtral",
        "--model_args", f"pretrained={phixtral.default_model_path()},dtype=float32,backend=torch",
        "--tasks", "phixtral_test_choice,phixtral_test_rolling,phixtral_test_gen", "--include_path", str(tasks),
        "--batch_size", "4", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "phixtral_test_gen" in proc.stdout  # lm_eval's results table
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(samples) == ["phixtral_test_choice", "phixtral_test_gen", "phixtral_test_rolling"]
    check_samples(model, samples)


def test_model_args_are_checked():
    with pytest.raises(TypeError):
        PhixtralLM(dtpye="float32")
    with pytest.raises(ValueError, match="max_length"):
        PhixtralLM(backend="torch", max_length=10_000)


@pytest.mark.parametrize(
    "model_args, code, message",
    [
        ("pretrained={tasks},backend=torch", 1, "{tasks} has no config.json"),
        ("dtpye=float32,backend=torch", 2, "phixtral takes no argument 'dtpye' (did you mean 'dtype'?)"),
    ],
)
def test_command_line_model_args_errors_are_one_line(tasks, monkeypatch, capsys, model_args, code, message):
    from phixtral.integrations.lm_eval import main

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # main() replaces it
    argv = ["--model", "phixtral", "--model_args", model_args.format(tasks=tasks), "--tasks", "phixtral_test_choice",
            "--include_path", str(tasks)]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.splitlines() if "phixtral lm_eval" in line]
    assert len(err) == 1 and err[0].startswith("phixtral lm_eval: error: ") and message.format(tasks=tasks) in err[0]


def test_model_args_string_names_a_misspelled_argument():
    with pytest.raises(TypeError, match=r"no argument 'max_lenght' \(did you mean 'max_length'\?\)"):
        PhixtralLM.create_from_arg_string("max_lenght=10", {"batch_size": 2, "device": None})
