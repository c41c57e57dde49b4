"""Decode steps compiled by torch.compile on the CPU: one graph per step (dense and MoE, fp32, bf16, int8 and int4), no
recompiles across steps and positions, the eager path's tokens, and the settings that turn it on and off."""

import pytest
import torch
import torch._dynamo
from helpers_models import gptq_moe_checkpoint, msft_moe_checkpoint

import phixtral
from phixtral import compiled_decode
from phixtral.compiled_decode import _step, compile_unavailable_reason

pytestmark = [
    pytest.mark.skipif(
        compiled_decode._toolchain_reason() is not None, reason=f"{compiled_decode._toolchain_reason()}"
    ),
    pytest.mark.usefixtures("one_torch_thread"),  # conftest.py
]

PROMPT = torch.tensor([[5, 17, 42, 7, 99, 3]])


def load(kind: str):
    if kind == "dense fp32":
        return phixtral.from_pretrained(msft_moe_checkpoint(experts=1, top_k=1), dtype="float32", backend="torch")
    if kind == "moe fp32":
        return phixtral.from_pretrained(msft_moe_checkpoint(), dtype="float32", backend="torch")
    if kind == "moe bf16":
        return phixtral.from_pretrained(msft_moe_checkpoint(), dtype="bfloat16", backend="torch")
    bits = 4 if kind == "moe int4" else 8
    group = 32 if kind == "moe int4" else -1
    return phixtral.from_pretrained(gptq_moe_checkpoint(bits=bits, group_size=group, sym=True), backend="torch")


KINDS = ["dense fp32", "moe fp32", "moe bf16", "moe int4 act-order", "moe int8"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_decode_step_is_one_graph(kind):
    model = load(kind.replace(" act-order", ""))
    if "act-order" in kind:
        model = phixtral.from_pretrained(gptq_moe_checkpoint(), backend="torch")  # 4-bit, act-order, zero points
    assert compile_unavailable_reason(model) is None
    model.setup_caches(1, 64)
    explained = torch._dynamo.explain(_step)(model, None, torch.tensor([5]), torch.tensor([3]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    if "moe" in kind:  # the experts as custom ops, never a gather of whole weight matrices
        assert any("expert_linear" in op for op in ops), ops


@pytest.mark.parametrize("kind", ["dense fp32", "moe fp32", "moe bf16", "moe int4", "moe int8"])
def test_compiled_logits_equal_eager_to_rounding(kind):
    """Step by step on one cache: fp32 within 1e-5 of the largest logit; bf16 (int8 / int4 run bf16 activations)
    within 3 bf16 steps of it, since inductor rounds fused bf16 chains once where eager rounds after every op
    (measured: 1-2 steps, 0.016-0.04 at logits of 2.6 on these models)."""
    model = load(kind)
    model.setup_caches(1, 64)
    compiled = compiled_decode.compiled_step_function()
    with torch.inference_mode():
        model.hidden_states(PROMPT, None, torch.arange(PROMPT.shape[1]))
        for pos in range(PROMPT.shape[1], PROMPT.shape[1] + 6):
            tok, input_pos = torch.tensor([7 * pos % 500]), torch.tensor([pos])
            eager = _step(model, None, tok, input_pos)
            graph = compiled(model, None, tok, input_pos)
            scale = eager.abs().max()
            tol = 1e-5 * scale if "fp32" in kind else 3 * 2**-7 * scale
            assert (graph - eager).abs().max() <= tol, (pos, (graph - eager).abs().max(), tol)


def test_compiled_tokens_equal_eager_without_recompiles():
    model = load("moe fp32")
    eager = model.generate(PROMPT, max_new_tokens=12, compile=False)
    compiled = model.generate(PROMPT, max_new_tokens=12, compile=True)
    stats = model.last_generation_stats
    assert torch.equal(compiled, eager)
    assert stats.compiled and stats.compile_s > 0
    # Other prompts, lengths and positions in the same cache shape reuse the graph: a recompile would raise.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in (PROMPT[:, :2], torch.tensor([[9, 8, 7, 6, 5, 4, 3, 2, 1]])):
            a = model.generate(prompt, max_new_tokens=20, compile=True)
            b = model.generate(prompt, max_new_tokens=20, compile=False)
            assert torch.equal(a, b)


def test_batched_and_left_padded_rows_compile_too():
    model = load("moe fp32")
    prompts = ["def f(x):", "import os\nimport sys\n\nclass A:"]
    assert model.generate(prompts, max_new_tokens=8, compile=True) == model.generate(
        prompts, max_new_tokens=8, compile=False
    )
    assert model.last_generation_stats.batch_size == 2


def test_bundled_model_generates_the_same_text_compiled():
    model = phixtral.from_pretrained(backend="torch")  # "auto" would run the Triton interpreter in eager steps here
    prompt = "def fibonacci(n):"
    assert model.generate(prompt, max_new_tokens=24, compile=True) == model.generate(
        prompt, max_new_tokens=24, compile=False
    )


def test_auto_compiles_long_generations_and_busy_models_only(monkeypatch):
    model = load("dense fp32")
    monkeypatch.setattr(compiled_decode, "COMPILE_MIN_STEPS", 40)
    monkeypatch.setattr(compiled_decode, "COMPILE_AFTER_STEPS", 60)
    model.generate(PROMPT, max_new_tokens=21)
    assert not model.last_generation_stats.compiled  # a short one-off generation: a compile would not pay
    model.generate(PROMPT, max_new_tokens=41)
    assert model.last_generation_stats.compiled  # long enough
    model.generate(PROMPT, max_new_tokens=21)
    model.generate(PROMPT, max_new_tokens=21)
    assert not model.last_generation_stats.compiled  # 20 + 20 + 20 eager steps so far
    model.generate(torch.cat([PROMPT, PROMPT]), max_new_tokens=21)
    assert not model.last_generation_stats.compiled  # a batch of two is another shape, with its own count
    model.generate(PROMPT, max_new_tokens=21)
    assert model.last_generation_stats.compiled  # a model that keeps decoding one shape compiles it
    monkeypatch.setenv("PHIXTRAL_COMPILE", "0")
    model.generate(PROMPT, max_new_tokens=41)
    assert not model.last_generation_stats.compiled
    model.compile_decode = True  # the model's setting; the environment only turns "auto" off
    model.generate(PROMPT, max_new_tokens=4)
    assert model.last_generation_stats.compiled
    model.compile_decode = False
    model.generate(PROMPT, max_new_tokens=41, compile="auto")
    assert not model.last_generation_stats.compiled


def test_what_cannot_compile_is_named():
    model = phixtral.from_pretrained(
        gptq_moe_checkpoint(), dtype="float32", backend="torch"
    )  # packed, fp32 activations
    reason = compile_unavailable_reason(model)
    assert reason == (
        "h.0.mixer.Wqkv: packed Linears run in compiled steps through the Triton kernels (GPU) or torch's packed CPU "
        "kernels (bfloat16 on the CPU), not float32 on cpu"
    )
    with pytest.raises(RuntimeError, match="compile=True, but decode steps cannot be compiled: h.0.mixer.Wqkv"):
        model.generate(PROMPT, max_new_tokens=4, compile=True)
    model.generate(PROMPT, max_new_tokens=4, compile="auto")  # "auto": eager, no error
    assert not model.last_generation_stats.compiled
    for bad in ("yes", 1, None.__class__):
        with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
            model.generate(PROMPT, max_new_tokens=2, compile=bad)
    with pytest.raises(ValueError, match="model.runtime.compile must be 'auto', True or False"):
        model.compile_decode = "always"


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "gptq"])
def test_the_triton_step_traces_to_one_graph_on_meta_tensors(monkeypatch, quantized):
    """A GPU's decode step (the Triton forward of every MoE layer and packed Linear, as custom ops) traces into one
    graph that a CUDA graph can hold, checked here with meta tensors: the ops' fake kernels give the shapes."""
    import phixtral.model
    import phixtral.quant.modules

    source = load("moe int4" if quantized else "moe fp32")
    with torch.device("meta"):
        model = phixtral.Phixtral(source.config)
        if quantized:
            for name, module in source.named_modules():
                if isinstance(module, phixtral.quant.modules.QuantizedExpertLinear):
                    E, N, K = module.bias.shape[0], module.bias.shape[1], module.qweight.shape[1] * 32 // module.bits
                    packed = phixtral.quant.modules.quantized_module(name, E, N, K, module.bits, module.group_size)
                    model.set_submodule(name, packed)
        model = model.half()
    model.setup_caches(2, 64)
    for module in (phixtral.model, phixtral.quant.modules):  # as on a GPU where the Triton kernels run
        monkeypatch.setattr(module, "resolved_backend", lambda backend, device, dtype: "triton")
    explained = torch._dynamo.explain(_step)(
        model, None, torch.zeros(2, dtype=torch.long, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("fused_moe_triton" in op for op in ops) == model.config.n_layer
    assert sum("quantized_linear_triton" in op for op in ops) == (2 * model.config.n_layer if quantized else 0)
    assert not any("expert_linear" in op for op in ops)


def test_generate_command_takes_compile(capsys):
    from phixtral.cli import main

    folder = str(msft_moe_checkpoint())
    argv = ["generate", "--model", folder, "--dtype", "float32", "--backend", "torch",
            "--prompt", "ab", "--max-new-tokens", "6"]  # fmt: skip
    outs = {}
    for mode in ("off", "on"):
        assert main(argv + ["--compile", mode]) == 0
        outs[mode] = capsys.readouterr()
    assert outs["on"].out == outs["off"].out
    assert "compiled in" in outs["on"].err and "compiled" not in outs["off"].err
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--compile", "always"])
    assert exit_info.value.code == 2 and "argument --compile: invalid choice: 'always'" in capsys.readouterr().err
