"""CPU decode, side by side in one run: fp32, bf16, int8 and int4 GPTQ layouts through torch's packed CPU kernels, against
transformers' Phi and the original naive MoE loop.

    python benchmarks/bench_cpu_decode.py [--threads N] [--out DIR] [--quick]

Models (random weights, seed 0, built here; nothing downloaded):
    dense  a phi-2-architecture model of 109 M parameters: n_embd 1024, 8 layers, 16 heads, n_inner 4096, vocab 4096,
           partial rotary 0.5 (rotary_dim 32), made by transformers.PhiForCausalLM and saved in the HF layout; the same
           files load into transformers (fp32) and into phixtral (every row). It is the model llama.cpp's numbers in
           RESULTS.md were measured on (same config and seed).
    moe    its phixtral twin: the same dims with 4 experts, top 2 (a random router, so tokens spread over experts).
Rows: `fp32` and `bf16` load the float checkpoint; `int8` (per channel), `int8 g128`, `int4 g128` (all symmetric
round-to-nearest, `phixtral quantize --method rtn`'s quantizer) are written as AutoGPTQ v1 checkpoints and loaded back by
from_pretrained, which on the CPU runs them in bf16 through `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`
(phixtral_kernels/cpu_packed.py). lm_head, the router, the embedding and the norms stay bf16 there, as in GPTQ
checkpoints. `naive` is the fp32 model with backend="naive" (the original per-expert loop); `transformers` is
PhiForCausalLM.generate on the dense model.
Timing: batch 1, a 64-token prompt, greedy; decode ms/token = (time of 1 + N new tokens - time of 1 new token) / N with
N = 32, each the best of --reps calls after a warm-up (best, not median: on a shared machine the minimum is the run least
disturbed by others). Prefill = the time of 1 new token. `read MB` = bytes of weights one decode step reads (all but the
embedding; top_k of E experts); GB/s = read MB / decode time, against the copy bandwidth measured at the start.
Every row's first 8 greedy tokens are compared with the fp32 row of its model (`same tokens`): equal for float rows,
informative for quantized ones (random weights give near-uniform logits, so one rounding can flip a token).
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

import common  # noqa: E402
import phixtral  # noqa: E402
from phixtral.quant import GPTQConfig, quantize_model_rtn  # noqa: E402

DENSE = dict(vocab_size=4096, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=4096,
             partial_rotary_factor=0.5, max_position_embeddings=2048)  # fmt: skip
QUICK = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
             partial_rotary_factor=0.5, max_position_embeddings=256)  # fmt: skip
QUANT = {"int8": (8, -1), "int8 g128": (8, 128), "int4 g128": (4, 128)}
PROMPT, NEW, CHECK_TOKENS = 64, 32, 8


def make_dense(folder: Path, shape: dict) -> Path:
    import transformers

    torch.manual_seed(0)
    hf = transformers.PhiForCausalLM(transformers.PhiConfig(**shape)).eval()
    hf.save_pretrained(folder)
    return folder


def make_moe(dense: Path, folder: Path) -> Path:
    """The dense model's MLP copied into 4 experts, each perturbed by its own noise, behind a random router: a phixtral."""
    model = phixtral.from_pretrained(dense, device="cpu", dtype="float32", progress=False)
    keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "rotary_dim", "n_inner", "layer_norm_epsilon")
    config = phixtral.PhixtralConfig(**{k: getattr(model.config, k) for k in keys}, num_local_experts=4, num_experts_per_tok=2)
    moe = phixtral.Phixtral(config).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    dense_state = model.state_dict()
    with torch.no_grad():
        for name, t in moe.state_dict().items():
            src = dense_state[name]
            if t.shape == src.shape:
                t.copy_(src)
            elif ".moe.fc" in name:  # [1, ...] -> [E, ...]
                t.copy_(src.expand_as(t) + 0.01 * torch.randn(t.shape, generator=g))
            else:  # the router [E, D]
                t.copy_(0.02 * torch.randn(t.shape, generator=g))
    moe.save_pretrained(folder)
    return folder


def quantized(float_folder: Path, folder: Path, bits: int, group_size: int) -> Path:
    model = phixtral.from_pretrained(float_folder, device="cpu", dtype="float32", progress=False)
    quantize_model_rtn(model, GPTQConfig(bits=bits, group_size=group_size, desc_act=False, sym=True))
    model.save_pretrained(folder, dtype="float16")
    return folder


def read_bytes(model) -> int:
    """Bytes of weights a decode step reads: everything but the embedding and act-order/zero-point metadata, with the
    experts scaled by top_k / E."""
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("wte.") or name.endswith((".g_idx", ".qzeros")) or "kv_cache" in name:
            continue
        size = t.numel() * t.element_size()
        total += size * k / E if ".moe.fc" in name else size
    return int(total)


def best_time(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_ours(model, ids, reps: int):
    gen = lambda n: model.generate(ids, max_new_tokens=n)  # noqa: E731
    out = gen(NEW + 1)
    if out.shape[1] != ids.shape[1] + NEW + 1:
        raise RuntimeError(f"generation stopped early ({out.shape[1] - ids.shape[1]} tokens)")
    one, full = best_time(lambda: gen(1), reps), best_time(lambda: gen(NEW + 1), reps)
    return one, (full - one) / NEW, out[0, ids.shape[1] : ids.shape[1] + CHECK_TOKENS]


def time_transformers(hf, ids, reps: int):
    mask = torch.ones_like(ids)
    gen = lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    with torch.inference_mode():
        out = gen(NEW + 1)
        one, full = best_time(lambda: gen(1), reps), best_time(lambda: gen(NEW + 1), reps)
    return one, (full - one) / NEW, out[0, ids.shape[1] : ids.shape[1] + CHECK_TOKENS]


def run_benchmark(args) -> dict:
    import transformers

    env = common.environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    env["load_average_start"] = os.getloadavg()
    ceilings = common.measure_ceilings(torch.device("cpu"), quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-decode-"))
    shape = QUICK if args.quick else DENSE
    ids = torch.randint(0, shape["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))
    rows = []
    dense = make_dense(work / "dense", shape)
    moe = make_moe(dense, work / "moe")
    params = {}

    def add(model_name, variant, prefill_s, decode_s, tokens, ref_tokens, nbytes, dtype):
        rows.append(dict(model=model_name, variant=variant, dtype=dtype, prefill_s=prefill_s, decode_s=decode_s,
                         tokens_per_s=1 / decode_s, read_mb=nbytes / 1e6, gbps=nbytes / decode_s / 1e9,
                         same_tokens=int((tokens == ref_tokens).sum()) if ref_tokens is not None else CHECK_TOKENS))  # fmt: skip
        print(f"{model_name:6s} {variant:13s} decode {decode_s * 1e3:7.2f} ms/token  prefill {prefill_s * 1e3:7.1f} ms", flush=True)

    for model_name, folder in (("dense", dense), ("moe", moe)):
        fp32 = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch", progress=False)
        params[model_name] = sum(p.numel() for p in fp32.parameters())
        prefill, decode, ref = time_ours(fp32, ids, args.reps)
        add(model_name, "fp32", prefill, decode, ref, None, read_bytes(fp32), "float32")
        if model_name == "dense":
            hf = transformers.PhiForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            prefill, decode, tokens = time_transformers(hf, ids, args.reps)
            add(model_name, "transformers", prefill, decode, tokens, ref, read_bytes(fp32), "float32")
            del hf
        else:
            fp32.set_backend("naive")
            prefill, decode, tokens = time_ours(fp32, ids, args.reps)
            add(model_name, "naive", prefill, decode, tokens, ref, read_bytes(fp32), "float32")
        del fp32
        bf16 = phixtral.from_pretrained(folder, device="cpu", dtype="bfloat16", backend="torch", progress=False)
        prefill, decode, tokens = time_ours(bf16, ids, args.reps)
        add(model_name, "bf16", prefill, decode, tokens, ref, read_bytes(bf16), "bfloat16")
        del bf16
        for variant, (bits, group_size) in QUANT.items():
            qfolder = quantized(folder, work / f"{model_name}-{bits}-{group_size}", bits, group_size)
            q = phixtral.from_pretrained(qfolder, device="cpu", backend="torch", progress=False)  # bf16 on the CPU
            prefill, decode, tokens = time_ours(q, ids, args.reps)
            add(model_name, variant, prefill, decode, tokens, ref, read_bytes(q), str(q.dtype).replace("torch.", ""))
            del q
    for row in rows:
        base = {r["variant"]: r for r in rows if r["model"] == row["model"]}
        row["x_fp32"] = base["fp32"]["decode_s"] / row["decode_s"]
        other = base.get("transformers") or base.get("naive")
        row["x_peer"] = other["decode_s"] / row["decode_s"]
    env["load_average_end"] = os.getloadavg()
    return dict(env=env, ceilings=ceilings, shape=shape, prompt=PROMPT, new_tokens=NEW, reps=args.reps, params=params, rows=rows)


def report(result: dict, out: Path) -> None:
    env = result["env"]
    print(common.describe(env))
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in result["params"].items()))
    print(f"threads {env['threads']}; load average {env['load_average_start'][0]:.2f} at start, "
          f"{env['load_average_end'][0]:.2f} at end; copy bandwidth {result['ceilings']['copy_gbps']:.1f} GB/s (read + write)")  # fmt: skip
    columns = [("model", "model"), ("variant", "variant"), ("dtype", "activations"), ("decode_s", "decode ms/token"),
               ("tokens_per_s", "tokens/s"), ("prefill_s", "prefill (64 tok)"), ("read_mb", "read MB/token"),
               ("gbps", "GB/s"), ("x_fp32", "x our fp32"), ("x_peer", "x peer"), ("same_tokens", f"same tokens /{CHECK_TOKENS}")]  # fmt: skip
    formats = {"decode_s": lambda s: f"{s * 1e3:.2f}", "prefill_s": common.fmt_time, "tokens_per_s": lambda v: f"{v:.1f}",
               "read_mb": lambda v: f"{v:.0f}", "gbps": lambda v: f"{v:.1f}", "x_fp32": lambda v: f"{v:.2f}x",
               "x_peer": lambda v: f"{v:.2f}x"}  # fmt: skip
    print(common.markdown_table(result["rows"], columns, formats))
    print("peer: transformers' PhiForCausalLM (dense rows), the naive per-expert loop at fp32 (moe rows)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=3, help="timed generations per point (best of)")
    p.add_argument("--quick", action="store_true", help="a tiny model (the CI smoke run)")
    p.add_argument("--out", help="folder for bench_cpu_decode.json (default: $OUT, else ./out)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return common.run_script(parse_args(argv), run_benchmark, report, "bench_cpu_decode.json")


if __name__ == "__main__":
    main()
