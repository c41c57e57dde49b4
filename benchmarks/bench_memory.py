"""Memory of loading and quantizing a checkpoint, as the OS sees it, per scenario, projected to phixtral-4x2_8 / 2x2_8.

    python benchmarks/bench_memory.py [--layers 6 12] [--device cpu|cuda] [--dir DIR] [--out DIR] [--quick]

Models: random phi-2-shaped phixtrals (D=1024, 16 heads, F=4096, E=4, top_k=2, vocab 51200) at two depths, saved in
fp16 as phi-msft checkpoints (cached in --dir), with the bundled model's tokenizer for GPTQ's calibration text.
Scenarios, each in a fresh child process:
    fp16-load          from_pretrained(fp16 checkpoint, dtype=float16)
    quantize-rtn       phixtral quantize --bits 4 --group-size 128 --method rtn (its output is int4-load's checkpoint)
    int4-load          from_pretrained(that int4 checkpoint) in its default dtype (CPU: bfloat16, with torch's packed
                       CPU form beside the GPTQ tensors)
    int4-load-fp16     the same in float16: the tensors a GPU holds
    quantize-on-load   from_pretrained(fp16 checkpoint, quantize="int4", dtype=float16): groups of 128, symmetric
    quantize-gptq      phixtral quantize --bits 4 --group-size 128 --method gptq, 16 windows of 128 tokens
Measured in the child: anonymous RSS (RssAnon of /proc/self/status: what the process allocated, not the page cache)
sampled every 5 ms by a thread, as its peak above a baseline taken after the imports and a warm-up load of the bundled
tiny model (lazy imports, tokenizer code), and its steady value once the call returned (model held, garbage collected);
file-backed RSS (RssFile: the safetensors mmap, pages the OS can drop) apart; on a GPU, torch.cuda.max_memory_allocated.
Projection: for each scenario, value = a + b x layers over the two depths; b over one layer's fp16 bytes and a over the
embedding's and head's fp16 bytes carry it to phixtral-4x2_8 and 2x2_8 by their sizes (counted on the meta device, as
benchmarks/model_memory.py counts them). GPTQ's peak does not grow with depth (one layer at a time): it is projected
from its parts (`gptq_parts`), checked against the measured peaks. The targets add a fp16 KV cache of 2048 tokens.
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

import common  # noqa: E402
import model_memory  # noqa: E402

SHAPE = dict(vocab_size=51200, n_embd=1024, n_head=16, n_positions=2048, rotary_dim=32, n_inner=4096,
             num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
QUICK_SHAPE = dict(vocab_size=4096, n_embd=256, n_head=8, n_positions=512, rotary_dim=16, n_inner=1024,
                   num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
SCENARIOS = ("fp16-load", "quantize-rtn", "int4-load", "int4-load-fp16", "quantize-on-load", "quantize-gptq")
BITS, GROUP_SIZE = 4, 128
CALIB_SAMPLES, CALIB_SEQ_LEN = 16, 128
SAMPLE_S = 0.005
KV_CONTEXT = 2048
GB, MB = 1e9, 2**20


# --- measuring, in the child ------------------------------------------------------------------------------------------
def rss() -> dict:
    """{"anon": bytes, "file": bytes}: RssAnon and RssFile of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                out["anon" if key == "RssAnon" else "file"] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """A thread that keeps the highest RssAnon and RssFile seen, every SAMPLE_S seconds, while it runs."""

    def __init__(self):
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            now = rss()
            self.peak = {k: max(self.peak[k], now[k]) for k in now}
            self._stop.wait(SAMPLE_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        now = rss()
        self.peak = {k: max(self.peak[k], now[k]) for k in now}


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in obj: a tensor, or tuples / dataclasses of them (torch's packed CPU form)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(x) for x in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f)) for f in obj.__dataclass_fields__)
    return 0


def model_bytes(model) -> dict:
    """The loaded model's tensors by role: packed (the GPTQ buffers), float (every other parameter and buffer), and
    cpu_packed (torch's packed CPU form, cached beside them by the packed modules)."""
    packed = floats = cpu = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name.endswith((".qweight", ".qzeros", ".scales", ".g_idx")):
            packed += t.numel() * t.element_size()
        elif "cpu_packed" in name or "packed_" in name.rsplit(".", 1)[-1]:
            cpu += t.numel() * t.element_size()
        else:
            floats += t.numel() * t.element_size()
    for module in model.modules():
        for entry in getattr(module, "_cache", {}).values():
            form = getattr(entry[-1], "cpu_packed", None) if isinstance(entry, tuple) else None
            cpu += _tensor_bytes(form) if form is not None else 0
    return dict(packed=packed, float=floats, cpu_packed=cpu)


def child(args) -> dict:
    """Run one scenario in this process and return its measurements."""
    import phixtral
    from phixtral.cli import main as cli_main
    from phixtral.weights import load_tokenizer

    device = torch.device(args.device)
    # A warm-up load of the bundled tiny model, so that the lazy imports (tokenizers, kernels) sit in the baseline.
    load_tokenizer(Path(args.model))
    warm = phixtral.from_pretrained(None, device=device, backend="torch")
    del warm
    gc.collect()
    time.sleep(0.05)
    base = rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    model, start = None, time.perf_counter()
    with Sampler() as sampler:
        if args.scenario == "fp16-load":
            model = phixtral.from_pretrained(args.model, device=device, dtype="float16", backend="torch")
        elif args.scenario in ("int4-load", "int4-load-fp16"):
            dtype = "float16" if args.scenario == "int4-load-fp16" else None
            model = phixtral.from_pretrained(args.model, device=device, dtype=dtype, backend="torch")
        elif args.scenario == "quantize-on-load":
            model = phixtral.from_pretrained(args.model, device=device, dtype="float16", backend="torch",
                                             quantize=f"int{BITS},group_size={GROUP_SIZE}")  # fmt: skip
        else:
            method = args.scenario.removeprefix("quantize-")
            argv = ["quantize", "--model", args.model, "--bits", str(BITS), "--group-size", str(GROUP_SIZE),
                    "--method", method, "--out", args.out, "--overwrite", "--no-progress",
                    "--device", str(device)]  # fmt: skip
            if method == "gptq":
                argv += ["--calib-samples", str(CALIB_SAMPLES), "--calib-seq-len", str(CALIB_SEQ_LEN)]
            if cli_main(argv):
                raise RuntimeError("phixtral quantize failed")
    seconds = time.perf_counter() - start
    gc.collect()
    time.sleep(0.05)
    steady = rss()
    result = dict(
        scenario=args.scenario,
        seconds=seconds,
        threads=torch.get_num_threads(),
        peak_anon=sampler.peak["anon"] - base["anon"],
        steady_anon=steady["anon"] - base["anon"],
        peak_file=sampler.peak["file"] - base["file"],
        base_anon=base["anon"],
    )
    if model is not None:
        result.update(model_bytes(model))
    if device.type == "cuda":
        result["gpu_peak"] = torch.cuda.max_memory_allocated(device) - gpu_base
        result["gpu_steady"] = torch.cuda.memory_allocated(device) - gpu_base
    return result


# --- the models and sizes -------------------------------------------------------------------------------------------
def make_checkpoint(folder: Path, shape: dict, layers: int) -> Path:
    """A random phixtral of `layers` layers saved in fp16 at `folder` (kept when it is there already)."""
    from phixtral import Phixtral, PhixtralConfig, default_model_path, save_msft_checkpoint

    if (folder / "config.json").is_file():
        return folder
    config = PhixtralConfig(**shape, n_layer=layers, torch_dtype="float16")
    with torch.device("meta"):
        names = {n: t.shape for n, t in Phixtral(config).state_dict().items()}
    g = torch.Generator().manual_seed(layers)
    state = {}
    for name, s in names.items():  # a trained model's spread, 0.02 (LayerNorm weights around 1)
        base = 1.0 if name.endswith("ln.weight") else 0.0
        state[name] = (torch.randn(s, generator=g) * 0.02 + base).to(torch.float16)
    save_msft_checkpoint(folder, state, config, dtype="float16")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # GPTQ's calibration text needs a tokenizer
        shutil.copy(default_model_path() / f, folder / f)
    return folder


def sizes(shape: dict, layers: int) -> dict:
    """fp16 bytes of one model, counted on the meta device: all of it, one layer, the embedding and head; and its int4
    g128 size in memory (model_memory.count)."""
    from phixtral import Phixtral, PhixtralConfig

    config = PhixtralConfig(**shape, n_layer=layers)
    with torch.device("meta"):
        model = Phixtral(config)
    count = lambda m: sum(t.numel() for t in [*m.parameters(), *m.buffers()]) * 2  # noqa: E731
    int4 = model_memory.count(model_memory.build(config, (BITS, GROUP_SIZE, False)), (BITS, GROUP_SIZE, False))
    return dict(fp16=count(model), layer=count(model.h[0]), fixed=count(model.wte) + count(model.lm_head),
                int4=int4["memory"], kv=model_memory.kv_cache_bytes(config, 1, KV_CONTEXT))  # fmt: skip


def gptq_parts(shape: dict, samples: int, seq_len: int) -> dict:
    """GPTQ's peak from its parts, in bytes (fp32 throughout): one layer's float weights, the calibration activations
    [n, S, D] (the layer's input and, per batch, what it computes), the largest Hessian (fc2's, [F, F]: one expert's at
    a time, which is also the solver's scratch space) and the solver's working set on that expert (a copy of its
    weight, one [F, F] temporary, its codes and the error propagation's [D, F] product)."""
    D, F = shape["n_embd"], shape.get("n_inner") or 4 * shape["n_embd"]
    E = shape["num_local_experts"]
    layer = (4 * D * D + 2 * E * D * F) * 4
    acts = samples * seq_len * D * 4
    hessians = F * F * 4
    solver = 3 * D * F * 4 + F * F * 4
    return dict(layer=layer, activations=acts, hessians=hessians, solver=solver,
                total=layer + acts + hessians + solver)  # fmt: skip


# --- fitting and projecting -------------------------------------------------------------------------------------------
def fit(points: list) -> tuple:
    """(a, b) of value = a + b x layers through two (layers, value) points."""
    (l0, v0), (l1, v1) = sorted(points)
    b = (v1 - v0) / (l1 - l0)
    return v0 - b * l0, b


def project(a: float, b: float, bench: dict, target: dict, layers: int) -> float:
    """a + b x layers carried from the bench shape to the target's: b by one layer's bytes, a by the embedding's."""
    return a / bench["fixed"] * target["fixed"] + b / bench["layer"] * target["layer"] * layers


def projections(results: list, shape: dict) -> dict:
    """{target: {scenario: {key: projected bytes}}} for every scenario measured at two depths, plus GPTQ's parts."""
    out = {}
    bench = {n: sizes(shape, n) for n in {r["layers"] for r in results}}
    for name, config in model_memory.MODELS.items():
        target_shape = {k: v for k, v in config.items() if k != "n_layer"}
        target = sizes(target_shape, config["n_layer"])
        rows = {"sizes": target}
        for scenario in SCENARIOS:
            ok = [r for r in results if r["scenario"] == scenario and "error" not in r]
            if len({r["layers"] for r in ok}) < 2:
                continue
            rows[scenario] = {}
            for key in ("peak_anon", "steady_anon", "gpu_peak", "gpu_steady"):
                if all(key in r for r in ok):
                    a, b = fit([(r["layers"], r[key]) for r in ok])
                    any_bench = bench[ok[0]["layers"]]
                    rows[scenario][key] = project(a, b, any_bench, target, config["n_layer"])
        parts = gptq_parts(target_shape, 128, 256)  # the command's default calibration
        measured = [r for r in results if r["scenario"] == "quantize-gptq" and "error" not in r]
        bench_parts = gptq_parts(shape, CALIB_SAMPLES, CALIB_SEQ_LEN)["total"]
        ratio = max((r["peak_anon"] / bench_parts for r in measured), default=None)
        rows["gptq_parts"] = dict(parts, measured_over_parts=ratio,
                                  projected=parts["total"] * max(ratio or 1.0, 1.0))  # fmt: skip
        out[name] = rows
    return out


# --- running ----------------------------------------------------------------------------------------------------------
def run_child(scenario: str, model: Path, out: Path, device: str, timeout: int = 3600) -> dict:
    cmd = [sys.executable, __file__, "--child", scenario, "--model", str(model), "--child-out", str(out),
           "--device", device]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        lines = proc.stderr.strip().splitlines()
        return dict(scenario=scenario, error=lines[-1] if lines else f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    import tempfile

    device = str(common.pick_device(args.device))
    shape = QUICK_SHAPE if args.quick else SHAPE
    layers = [2, 4] if args.quick else sorted(args.layers)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-memory-"))
    env = common.environment(torch.device(device))
    results = []
    for n in layers:
        tag = f"D{shape['n_embd']}-L{n}"
        fp16 = make_checkpoint(root / f"{tag}-fp16", shape, n)
        int4 = root / f"{tag}-int4"
        size = sizes(shape, n)
        for scenario in args.scenarios:
            model = int4 if scenario.startswith("int4-load") else fp16
            out = int4 if scenario == "quantize-rtn" else root / f"{tag}-{scenario}"
            if scenario.startswith("int4-load") and not (int4 / "config.json").is_file():
                run_child("quantize-rtn", fp16, int4, device)
            r = run_child(scenario, model, out, device)
            r.update(layers=n, loadavg=os.getloadavg()[0], **{f"model_{k}": v for k, v in size.items()})
            results.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
            if out != int4 and out.exists():
                shutil.rmtree(out)
    env["loadavg_end"] = os.getloadavg()
    result = dict(env=env, shape=shape, layers=layers, results=results, projections=projections(results, shape))
    print(report(result))
    print(common.dump_json(result, common.out_dir(args.out) / "bench_memory.json"))
    return result


def _ratio(r: dict) -> str:
    """A scenario's peak over what it is about: the fp16 model it reads, or the loaded int4 model's tensors."""
    if "error" in r:
        return "-"
    if r["scenario"].startswith("int4-load"):
        ref = r["packed"] + r["float"]
        return f"{r['peak_anon'] / ref:.2f}x / {r['steady_anon'] / ref:.2f}x of its tensors"
    return f"{r['peak_anon'] / r['model_fp16']:.2f}x the fp16 model"


def report(result: dict) -> str:
    """Tables for people: the measurements, then the projections."""
    lines = [f"Shape {result['shape']}, {common.describe(result['env'])}", "",
             "| scenario | layers | peak anon | steady anon | peak file | peak / reference | GPU peak | s | load |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["results"]:
        if "error" in r:
            lines.append(f"| {r['scenario']} | {r['layers']} | {r['error']} |")
            continue
        gpu = f"{r['gpu_peak'] / MB:.0f} MiB" if "gpu_peak" in r else "-"
        lines.append(f"| {r['scenario']} | {r['layers']} | {r['peak_anon'] / MB:.0f} MiB | "
                     f"{r['steady_anon'] / MB:.0f} MiB | {r['peak_file'] / MB:.0f} MiB | {_ratio(r)} | {gpu} | "
                     f"{r['seconds']:.1f} | {r['loadavg']:.1f} |")  # fmt: skip
    for name, rows in result["projections"].items():
        s = rows["sizes"]
        lines += ["", f"{name}: fp16 {s['fp16'] / GB:.2f} GB, int4 g128 in memory {s['int4'] / GB:.2f} GB, "
                  f"KV cache (2048 tokens, fp16) {s['kv'] / GB:.2f} GB", "",
                  "| scenario | projected peak | projected steady |", "|---|---|---|"]  # fmt: skip
        for scenario in SCENARIOS:
            if scenario in rows:
                p = rows[scenario]
                lines.append(f"| {scenario} | {p['peak_anon'] / GB:.2f} GB | {p['steady_anon'] / GB:.2f} GB |")
        g = rows["gptq_parts"]
        lines.append(f"| quantize-gptq (parts: layer {g['layer'] / GB:.2f}, activations {g['activations'] / GB:.2f}, "
                     f"one fc2 Hessian {g['hessians'] / GB:.2f}, solver {g['solver'] / GB:.2f} GB) | "
                     f"{g['projected'] / GB:.2f} GB | - |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs=2, default=[6, 12], help="the two depths (default 6 and 12)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--dir", default=None, help="where the checkpoints are kept (default: a new temporary folder)")
    p.add_argument("--out", default=None, help="folder of bench_memory.json (default: $OUT, else ./out)")
    p.add_argument("--quick", action="store_true", help="a small shape (D=256, vocab 4096) at depths 2 and 4")
    p.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.scenario, args.out = args.child, args.child_out
        print(json.dumps(child(args)))
        return {}
    return run(args)


if __name__ == "__main__":
    main()
