"""The lm-evaluation-harness model `phixtral`, run by the real lm_eval on local tasks (YAML over a jsonl file written
here; nothing from a hub): its loglikelihoods equal the model's own forward, generate_until gives the greedy text."""

import inspect
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
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from phixtral.integrations.lm_eval import PhixtralLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    {
        "context": "def fib(n):",
        "choices": ["return", "import", "pass"],
        "label": 0,
        "text": "def fib(n):\n    return n",
    },
    {
        "context": "import os\nclass Config",
        "choices": [":", "("],
        "label": 1,
        "text": "The asyncio event loop runs tasks.",
    },
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
    # acc: the share of documents whose label has the highest of the model's own log-likelihoods.
    tok, correct = model.tokenizer, []
    for doc in DOCS:
        lls = []
        for choice in doc["choices"]:
            whole, ctx = tok(doc["context"] + " " + choice)["input_ids"], tok(doc["context"])["input_ids"]
            lls.append(own_loglikelihood(model, ctx, whole[len(ctx) :])[0])
        correct.append(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert 0 < sum(correct) < len(DOCS), "the documents must tell a right acc from a constant one"
    assert results["results"]["phixtral_test_choice"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))


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


# --- max_length below the documents' length: contexts cut on the left, rolling windows, sampling ----------------------
LONG = inspect.getsource(json.decoder)[:400]  # about 115 tokens of Python
W = 16  # max_length


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def own_rolling(model, ids, eot) -> float:
    """Log-likelihood of ids in windows of W tokens, each token predicted once, from the model's own forward on each
    window: the window predicting tokens [a, b) is the W tokens of [eot] + ids that end with token b - 1 (lm_eval's
    rolling windows, context_len 1)."""
    seq, total = [eot] + ids, 0.0  # seq[j + 1] is ids[j]
    for a in range(0, len(ids), W):
        b = min(a + W, len(ids))
        total += own_loglikelihood(model, seq[max(0, b - W) : a + 1], ids[a:b])[0]  # inputs seq[b - W : b]
    return total


@pytest.fixture(scope="module")
def short_lm(model):
    return PhixtralLM(model=model, batch_size=2, max_length=W, max_gen_toks=4)


def test_long_contexts_are_cut_on_the_left(model, short_lm):
    tok = model.tokenizer
    pairs = [(LONG[:300], LONG[300:330]), (LONG[:120], LONG[120:125]), ("def f(x):", " return x")]
    got = short_lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    cut = 0
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
        cont = whole[len(ctx) :]
        kept = (ctx + cont)[-(W + 1) : -len(cont)]  # the W + 1 last tokens: W inputs, each predicting the next
        cut += len(kept) < len(ctx)
        assert (ll, greedy) == pytest.approx(own_loglikelihood(model, kept, cont), abs=1e-4)
    assert cut == 2, "two contexts longer than max_length"


def test_rolling_loglikelihood_beyond_one_window(model, short_lm):
    tok, eot = model.tokenizer, short_lm.eot_token_id
    texts = [LONG[:250], LONG[:40]]
    got = short_lm.loglikelihood_rolling([request("loglikelihood_rolling", t) for t in texts], disable_tqdm=True)
    ids = [tok(t)["input_ids"] for t in texts]
    assert len(ids[0]) > 3 * W and len(ids[0]) % W and len(ids[1]) < W  # full windows, a partial one; one window
    for g, i in zip(got, ids):
        assert g == pytest.approx(own_rolling(model, i, eot), abs=1e-3)
    whole = own_loglikelihood(model, [eot], ids[0][: 2 * W])[0]
    windows = own_rolling(model, ids[0][: 2 * W], eot)
    assert whole != pytest.approx(windows, abs=1e-2), "windows must score otherwise than one pass"


def test_generate_until_samples_when_the_task_asks(model, short_lm):
    sampled = {"max_gen_toks": 4, "do_sample": True, "temperature": 1.5, "top_k": 50, "seed": 7}
    contexts = [LONG[:300], "def f(x):"]
    requests = [request("generate_until", c, dict(sampled)) for c in contexts]
    greedy = short_lm.generate_until([request("generate_until", c, {"max_gen_toks": 4}) for c in contexts], True)
    first, again = short_lm.generate_until(requests[:1], True), short_lm.generate_until(requests[:1], True)
    assert first == again, "seeded: the same text twice"
    ids = model.tokenizer(contexts[0])["input_ids"][-(W - 4) :]  # max_length - max_gen_toks tokens, from the right
    new = model.generate(torch.tensor([ids]), max_new_tokens=4, temperature=1.5, top_k=50, seed=7)[0, len(ids) :]
    new = new.tolist()[: next((k for k, t in enumerate(new.tolist()) if t in model.eos_token_ids), len(new))]
    assert first == [model.tokenizer.decode(new, skip_special_tokens=True)]
    assert first[0] != greedy[0], "sampled at temperature 1.5, not greedy"
    assert short_lm.generate_until(requests, True)[1] != greedy[1]


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
