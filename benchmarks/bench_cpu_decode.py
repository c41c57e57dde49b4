"""CPU decode, side by side in one run: fp32, bf16, int8 and int4 GPTQ layouts through torch's packed CPU kernels,
eager and compiled (torch.compile, phixtral/compiled_decode.py), against transformers' Phi, the original naive MoE
loop and, with --llamacpp, llama.cpp on the same model.

    python benchmarks/bench_cpu_decode.py [--threads N] [--llamacpp DIR] [--breakdown] [--no-compile] [--out DIR]

Models (random weights, seed 0, built here; nothing downloaded):
    dense  a phi-2-architecture model of 109 M parameters: n_embd 1024, 8 layers, 16 heads, n_inner 4096, vocab 4096,
           partial rotary 0.5 (rotary_dim 32), made by transformers.PhiForCausalLM and saved in the HF layout; the same
           files load into transformers (fp32) and into phixtral (every row). benchmarks/llamacpp/run.sh builds the
           same model (same config and seed) for llama.cpp.
    moe    its phixtral twin: the same dims with 4 experts, top 2 (a random router, so tokens spread over experts).
Rows: `fp32` and `bf16` load the float checkpoint; `int8` (per channel), `int8 g128`, `int4 g128` (all symmetric
round-to-nearest, `phixtral quantize --method rtn`'s quantizer) are written as AutoGPTQ v1 checkpoints and loaded
back by from_pretrained, which on the CPU runs them in bf16 through `_weight_int8pack_mm` /
`_weight_int4pack_mm_for_cpu` (phixtral_kernels/cpu_packed.py). lm_head, the router, the embedding and the norms stay
bf16 there, as in GPTQ checkpoints. Each of our rows runs eagerly and then compiled (`... compiled`: generate with
compile=True; `compile s` is its first generation's compile). `naive` is the fp32 model with backend="naive" (the
original per-expert loop); `transformers` is PhiForCausalLM.generate on the dense model. `llama.cpp f32 / f16 / q8_0 /
q4_0`: llama-bench -p 64 -n 32 at the same threads, run by this script after ours (--llamacpp: the folder run.sh built).
Timing: batch 1, a 64-token prompt, greedy; decode ms/token = (time of 1 + N new tokens - time of 1 new token) / N
with N = 32, each the best of --reps calls after a warm-up (best, not median: on a shared machine the minimum is the
run least disturbed by others). Prefill = the time of 1 new token. `read MB` = bytes of weights one decode step reads
(all but the embedding; top_k of E experts); GB/s = read MB / decode time, against the copy bandwidth measured at the
start. --breakdown profiles 16 decode steps of each row (torch.profiler): the GEMVs' time and the GB/s they read at,
attention, and everything else. Every row's first 8 greedy tokens are compared with the fp32 row of its model
(`same tokens`): equal for fp32 rows, informative for the others (random weights give near-uniform logits, so one
rounding can flip a token).
"""

import argparse
import functools
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
    """The dense model's MLP copied into 4 experts, each perturbed by its own noise, behind a random router."""
    model = phixtral.from_pretrained(dense, device="cpu", dtype="float32", progress=False)
    keys = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "rotary_dim", "n_inner", "layer_norm_epsilon")
    config = phixtral.PhixtralConfig(
        **{k: getattr(model.config, k) for k in keys}, num_local_experts=4, num_experts_per_tok=2
    )
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
    """Bytes of weights a decode step reads: everything but the embedding, act-order/zero-point metadata and the GPTQ
    tensors a packed CPU form stands in for, with the experts scaled by top_k / E."""
    E, k = model.config.num_local_experts, model.config.num_experts_per_tok
    packed = {n.rsplit(".", 1)[0] for n, t in model.named_buffers() if n.endswith(".cpu_weights") and t is not None}
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is None or name.startswith("wte.") or name.endswith((".g_idx", ".qzeros")) or "kv_cache" in name:
            continue
        module, _, leaf = name.rpartition(".")
        if module in packed and leaf in ("qweight", "scales"):  # the CPU kernels read cpu_weights / cpu_scales
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


def time_ours(model, ids, reps: int, compile=False):
    """(prefill s, decode s per token, the first tokens, compile s): the best of `reps` generations of 1 and NEW + 1
    tokens; the first generation (compiling when compile=True) is not timed."""
    gen = lambda n: model.generate(ids, max_new_tokens=n, compile=compile)  # noqa: E731
    out = gen(NEW + 1)
    compile_s = model.last_generation_stats.compile_s
    if compile and not model.last_generation_stats.compiled:
        raise RuntimeError("compile=True did not compile")
    if out.shape[1] != ids.shape[1] + NEW + 1:
        raise RuntimeError(f"generation stopped early ({out.shape[1] - ids.shape[1]} tokens)")
    one, full = best_time(lambda: gen(1), reps), best_time(lambda: gen(NEW + 1), reps)
    return one, (full - one) / NEW, out[0, ids.shape[1] : ids.shape[1] + CHECK_TOKENS], compile_s


def time_transformers(hf, ids, reps: int, compile=False):
    mask = torch.ones_like(ids)
    gen = lambda n: hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
    with torch.inference_mode():
        out = gen(NEW + 1)
        one, full = best_time(lambda: gen(1), reps), best_time(lambda: gen(NEW + 1), reps)
    return one, (full - one) / NEW, out[0, ids.shape[1] : ids.shape[1] + CHECK_TOKENS], 0.0


# Op classes of a decode step's profile (self CPU time), the rest being everything else: fused elementwise code,
# norms, rotary, cache writes, routing, sampling-free glue, and the time between ops.
GEMV_OPS = ("aten::mm", "aten::addmm", "aten::linear", "aten::_weight_int4pack_mm_for_cpu", "aten::_weight_int8pack_mm",
            "mkldnn::_linear_pointwise", "aten::bmm", "aten::matmul")  # fmt: skip
ATTENTION_OPS = ("aten::_scaled_dot_product", "aten::scaled_dot_product")


def step_breakdown(model, ids, compile: bool, steps: int = 16) -> dict:
    """Where one decode step's time goes: ms per step in weight GEMVs (and the GB/s they read at), in attention, and in
    everything else, from torch.profiler over `steps` steps on a warm cache."""
    from phixtral.compiled_decode import CompiledStep
    from phixtral.decode_graph import eager_step

    model.setup_caches(1, 128)
    with torch.inference_mode():
        model.hidden_states(ids, None, torch.arange(ids.shape[1]))
        step = CompiledStep(model, None, None) if compile else (lambda tok, pos: eager_step(model, None, tok, pos))
        tok, first = torch.tensor([1]), ids.shape[1]
        for i in range(4):  # warm (and compiled)
            step(tok, torch.tensor([first + i]))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for i in range(steps):
                step(tok, torch.tensor([first + 4 + i]))
            wall = (time.perf_counter() - start) / steps
    gemv = attention = 0.0
    for e in prof.key_averages():
        if e.key.startswith(GEMV_OPS):
            gemv += e.self_cpu_time_total * 1e-6
        elif e.key.startswith(ATTENTION_OPS):
            attention += e.self_cpu_time_total * 1e-6
    gemv, attention = gemv / steps, attention / steps
    return dict(step_ms=1e3 * wall, gemv_ms=1e3 * gemv, gemv_gbps=read_bytes(model) / gemv / 1e9 if gemv else None,
                attention_ms=1e3 * attention, other_ms=1e3 * max(0.0, wall - gemv - attention))  # fmt: skip


# llama.cpp's formats against ours (benchmarks/llamacpp/run.sh builds them on this machine's dense model).
LLAMA_PAIRS = {"f32": "fp32", "f16": "bf16", "q8_0": "int8", "q4_0": "int4 g128"}


def run_llamacpp(folder: Path, threads: int, reps: int) -> dict:
    """{format: (decode s per token, prefill tokens/s)} from llama-bench -p 64 -n 32 on each GGUF in folder."""
    import re
    import subprocess

    bench = folder / "build-noamx" / "bin" / "llama-bench"
    out = {}
    for fmt in LLAMA_PAIRS:
        gguf = folder / "gguf" / f"phi-random-{fmt}.gguf"
        if not (bench.exists() and gguf.exists()):
            raise FileNotFoundError(f"{bench} or {gguf} is missing: run benchmarks/llamacpp/run.sh first")
        cmd = [str(bench), "-m", str(gguf), "-t", str(threads), "-p", str(PROMPT), "-n", str(NEW), "-r", str(reps)]
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        tg = re.search(rf"\|\s+tg{NEW}\s+\|\s+([\d.]+)", text)
        pp = re.search(rf"\|\s+pp{PROMPT}\s+\|\s+([\d.]+)", text)
        out[fmt] = (1 / float(tg.group(1)), float(pp.group(1)))
        decode_ms, prefill_tok_s = 1e3 / float(tg.group(1)), float(pp.group(1))
        print(f"llama.cpp {fmt:5s} decode {decode_ms:7.2f} ms/token  prefill {prefill_tok_s:7.1f} tok/s")
    return out


def run_benchmark(args) -> dict:
    import transformers

    env = common.environment(torch.device("cpu"))
    env["threads"] = torch.get_num_threads()
    env["load_average_start"] = os.getloadavg()
    ceilings = common.measure_ceilings(torch.device("cpu"), quick=args.quick)
    work = Path(tempfile.mkdtemp(prefix="bench-cpu-decode-"))
    shape = QUICK if args.quick else DENSE
    ids = torch.randint(0, shape["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(0))
    rows, breakdown = [], []
    dense = make_dense(work / "dense", shape)
    moe = make_moe(dense, work / "moe")
    params = {}
    refs = {}

    def measure(model_name, variant, model, timer, dtype, compile=False):
        prefill, decode, tokens, compile_s = timer(compile) if compile else timer()
        ref = refs.setdefault(model_name, tokens)
        nbytes = read_bytes(model)
        rows.append(dict(model=model_name, variant=variant + (" compiled" if compile else ""), dtype=dtype,
                         prefill_s=prefill, prefill_tok_s=PROMPT / prefill, decode_s=decode, tokens_per_s=1 / decode,
                         read_mb=nbytes / 1e6, gbps=nbytes / decode / 1e9, compile_s=compile_s,
                         same_tokens=int((tokens == ref).sum())))  # fmt: skip
        print(f"{model_name:6s} {rows[-1]['variant']:22s} decode {decode * 1e3:7.2f} ms/token  "
              f"prefill {prefill * 1e3:7.1f} ms  (compile {compile_s:.1f} s)", flush=True)  # fmt: skip
        if args.breakdown and variant not in ("naive", "transformers"):
            breakdown.append(dict(model=model_name, variant=rows[-1]["variant"], **step_breakdown(model, ids, compile)))

    def ours(model_name, variant, model):
        dtype = str(model.dtype).replace("torch.", "")
        for compile in (False, True) if args.compile else (False,):
            measure(model_name, variant, model, functools.partial(time_ours, model, ids, args.reps), dtype, compile)

    for model_name, folder in (("dense", dense), ("moe", moe)):
        fp32 = phixtral.from_pretrained(folder, device="cpu", dtype="float32", backend="torch", progress=False)
        params[model_name] = sum(p.numel() for p in fp32.parameters())
        ours(model_name, "fp32", fp32)
        if model_name == "dense":
            hf = transformers.PhiForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            measure(
                model_name, "transformers", fp32, functools.partial(time_transformers, hf, ids, args.reps), "float32"
            )
            del hf
        else:
            fp32.set_backend("naive")
            measure(model_name, "naive", fp32, functools.partial(time_ours, fp32, ids, args.reps), "float32")
        del fp32
        bf16 = phixtral.from_pretrained(folder, device="cpu", dtype="bfloat16", backend="torch", progress=False)
        ours(model_name, "bf16", bf16)
        del bf16
        for variant, (bits, group_size) in QUANT.items():
            qfolder = quantized(folder, work / f"{model_name}-{bits}-{group_size}", bits, group_size)
            q = phixtral.from_pretrained(qfolder, device="cpu", backend="torch", progress=False)  # bf16 on the CPU
            ours(model_name, variant, q)
            del q
    llama = run_llamacpp(Path(args.llamacpp), env["threads"], args.reps) if args.llamacpp else {}
    for fmt, (decode, prefill_tok_s) in llama.items():
        rows.append(dict(model="dense", variant=f"llama.cpp {fmt}", dtype=fmt, decode_s=decode, tokens_per_s=1 / decode,
                         prefill_tok_s=prefill_tok_s, prefill_s=PROMPT / prefill_tok_s))  # fmt: skip
    for row in rows:
        base = {r["variant"]: r for r in rows if r["model"] == row["model"]}
        row["x_fp32"] = base["fp32"]["decode_s"] / row["decode_s"]
        other = base.get("transformers") or base.get("naive")
        row["x_peer"] = other["decode_s"] / row["decode_s"]
        for fmt, variant in LLAMA_PAIRS.items():
            if row["model"] == "dense" and fmt in llama and row["variant"].split(" compiled")[0] == variant:
                row["x_llama"] = row["decode_s"] / llama[fmt][0]  # our time over llama.cpp's: 1.0 = as fast
                row["prefill_x_llama"] = row["prefill_tok_s"] / llama[fmt][1]
    env["load_average_end"] = os.getloadavg()
    return dict(env=env, ceilings=ceilings, shape=shape, prompt=PROMPT, new_tokens=NEW, reps=args.reps, params=params,
                rows=rows, breakdown=breakdown)  # fmt: skip


def report(result: dict, out: Path) -> None:
    env = result["env"]
    print(common.describe(env))
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in result["params"].items()))
    print(f"threads {env['threads']}; load average {env['load_average_start'][0]:.2f} at start, "
          f"{env['load_average_end'][0]:.2f} at end; copy bandwidth {result['ceilings']['copy_gbps']:.1f} GB/s "
          "(read + write)")  # fmt: skip
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    columns = [("model", "model"), ("variant", "variant"), ("dtype", "activations"), ("decode_s", "decode ms/token"),
               ("tokens_per_s", "tokens/s"), ("prefill_tok_s", "prefill tok/s"), ("read_mb", "read MB/token"),
               ("gbps", "GB/s"), ("x_fp32", "x our fp32"), ("x_peer", "x peer"), ("x_llama", "time / llama.cpp"),
               ("prefill_x_llama", "prefill / llama.cpp"), ("compile_s", "compile s"),
               ("same_tokens", f"same tokens /{CHECK_TOKENS}")]  # fmt: skip
    formats = {"decode_s": lambda s: f"{s * 1e3:.2f}", "prefill_tok_s": lambda v: f"{v:.0f}",
               "tokens_per_s": lambda v: f"{v:.1f}", "read_mb": lambda v: "-" if v is None else f"{v:.0f}",
               "gbps": lambda v: "-" if v is None else f"{v:.1f}",
               "x_fp32": x, "x_peer": x, "x_llama": x, "prefill_x_llama": x,
               "compile_s": lambda v: f"{v:.1f}" if v else "-"}  # fmt: skip
    print(common.markdown_table(result["rows"], columns, formats))
    print(
        "peer: transformers' PhiForCausalLM (dense rows), the naive per-expert loop at fp32 (moe rows); "
        "time / llama.cpp: our decode time over llama.cpp's on its matching format (f32, f16, q8_0, q4_0)"
    )
    if result["breakdown"]:
        print("\nwhere a decode step's time goes (torch.profiler, self CPU time of the ops, per step):")
        columns = [
            ("model", "model"),
            ("variant", "variant"),
            ("step_ms", "step ms"),
            ("gemv_ms", "GEMVs ms"),
            ("gemv_gbps", "GEMV GB/s"),
            ("attention_ms", "attention ms"),
            ("other_ms", "everything else ms"),
        ]
        ms = lambda v: f"{v:.2f}"  # noqa: E731
        formats = {"step_ms": ms, "gemv_ms": ms, "attention_ms": ms, "other_ms": ms,
                   "gemv_gbps": lambda v: "-" if v is None else f"{v:.1f}"}  # fmt: skip
        print(common.markdown_table(result["breakdown"], columns, formats))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=3, help="timed generations per point (best of)")
    p.add_argument("--quick", action="store_true", help="a tiny model (the CI smoke run)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager rows only (no compiled rows)")
    p.add_argument("--breakdown", action="store_true", help="profile where each row's decode step spends its time")
    p.add_argument("--llamacpp", metavar="DIR", help="llama.cpp built by benchmarks/llamacpp/run.sh (LLAMACPP_DIR): "
                   "run llama-bench on the same model in this run, for the ratios")  # fmt: skip
    p.add_argument("--out", help="folder for bench_cpu_decode.json (default: $OUT, else ./out)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return common.run_script(parse_args(argv), run_benchmark, report, "bench_cpu_decode.json")


if __name__ == "__main__":
    main()
