"""Rebuild the bundled tiny phixtral (phixtral/assets/tiny-phixtral) from the standard library's source, on a CPU.

    python scripts/build_tiny_phixtral.py             # about 15 minutes on 2 CPU cores

Steps (every one seeded; the data are the slices of phixtral/stdlib_data.py):
  1. a byte-level BPE tokenizer (4096 tokens, `<|endoftext|>` = bos = eos) trained on the train parts of all slices;
  2. the base: a phi-2-shaped PhiForCausalLM (4 layers, n_embd 256, 8 heads, rotary on half of each head, 512
     positions) pretrained on the `general` slice, the library minus the four expert slices;
  3. four experts, one per slice (asyncio, web, docs, tests): the base fine-tuned on that slice's train part with
     only fc1 / fc2 trainable. The merge keeps the base's attention, embeddings and LayerNorms and takes only the
     experts' fc1 / fc2, so experts are trained against exactly the weights they will be merged with;
  4. `phixtral merge` with gate_mode hidden, top-2: each expert's positive prompts are 16 snippets of its slice's train
     text, its negative prompts the other experts' snippets (so the gate row points from the other slices to its own);
  5. `phixtral train-router` on the merged MoE: only the gate rows train, on windows of all five slices' train text, on
     the next-token loss plus a domain loss that pulls each expert slice's tokens toward its own expert;
  6. `phixtral eval` of the base, the experts and the MoE before and after step 5 on the held-out part of every slice
     -> EVAL.md.
The intermediate checkpoints (base, experts, recipe, the merged MoE with its untrained router) stay in --work (build/ is
git-ignored); the trained MoE, its router_training.json, BUILD_LOG.md and EVAL.md go to --out.
"""

import argparse
import contextlib
import hashlib
import io
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from phixtral import cli  # noqa: E402
from phixtral.commands.stdlib_data import EXPERT_SLICES, describe_slices, python_version, slice_texts  # noqa: E402

EOS = "<|endoftext|>"
# Step 5's settings (train-router): chosen by held-out loss on the slices, see EVAL.md.
ROUTER = dict(steps=300, lr=3e-3, aux_loss_coef=0.0, domain_loss_coef=0.3, seq_len=256, batch_size=8, eval_every=50)
NOTES_HEADING = "## Reading the table"


class Log:
    """Prints as it goes (the build is long) and keeps every line for BUILD_LOG.md."""

    def __init__(self):
        self.lines = []
        self.t0 = time.time()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def elapsed(self) -> float:
        return time.time() - self.t0


# --- 1. tokenizer ----------------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int, max_len: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """eos, doc 0, eos, doc 1, ... as one int64 tensor (the layout `phixtral eval` scores)."""
    ids = []
    for t in texts:
        ids.append(tokenizer.eos_token_id)
        ids.extend(tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


# --- 2, 3. training --------------------------------------------------------------------------------------------------
def phi_config(args, tokenizer):
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.n_embd,
        intermediate_size=4 * args.n_embd,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_head,
        max_position_embeddings=args.seq_len,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        hidden_act="gelu_new",
        layer_norm_eps=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def train(model, stream: torch.Tensor, *, steps: int, lr: float, warmup: int, batch_size: int, seq_len: int, seed: int,
          log: Log, tag: str, log_every: int) -> float:  # fmt: skip
    """AdamW on random stream windows, linear warmup then cosine decay to lr / 10. Returns the last logged loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95)
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0, running, last = time.time(), 0.0, float("nan")
    for step in range(1, steps + 1):
        scale = (
            step / warmup
            if step <= warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        )
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=g)
        x = torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # [B, S]
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            last = running / n
            dt = time.time() - t0
            log(
                f"    {tag} step {step:4d}/{steps}  loss {last:.3f}  lr {lr * scale:.2e}  {dt:6.0f} s  "
                f"{step * batch_size * seq_len / dt:6.0f} tok/s"
            )
            running = 0.0
    model.eval()
    return last


# phi-2's question-answer format ("Instruct: ...\nOutput:"), the format of the phixtral family's base models. The tiny
# model never saw a dialogue, so its replies are code-like text; the template lets chat() run on it like on the others.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Instruct: {{ message['content'] }}\n"
    "{% else %}Output: {{ message['content'] }}<|endoftext|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Output:{% endif %}"
)


def save_hf(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 names its own backend class here; the generic fast class loads in transformers 4 as well.
    path = folder / "tokenizer_config.json"
    d = json.loads(path.read_text())
    d["tokenizer_class"] = "PreTrainedTokenizerFast"
    d["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(d, indent=2) + "\n")


# --- 4. recipe -------------------------------------------------------------------------------------------------------
def snippets(texts: list[str], n: int, chars: int) -> list[str]:
    """n snippets of whole lines, about `chars` long, from the middle of n evenly spaced documents."""
    out = []
    for i in range(n):
        t = texts[(i * len(texts)) // n]
        start = t.find("\n", len(t) // 2) + 1
        end = t.rfind("\n", start, start + chars)
        out.append(t[start : end if end > start else start + chars])
    return out


def write_recipe(work: Path, prompts: dict, negatives: bool) -> Path:
    import yaml

    experts = []
    for s in EXPERT_SLICES:
        e = {"source_model": f"expert-{s}", "positive_prompts": prompts[s]}
        if negatives:
            e["negative_prompts"] = [p for o in EXPERT_SLICES if o != s for p in prompts[o]]
        experts.append(e)
    recipe = {
        "base_model": "base",
        "gate_mode": "hidden",
        "dtype": "float16",
        "experts_per_token": 2,
        "experts": experts,
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, width=120, allow_unicode=True))
    return path


def run_cli(argv: list[str], log: Log) -> str:
    """Run a phixtral subcommand in-process, log its stdout, fail loudly on a non-zero exit."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    out = buf.getvalue()
    for line in out.rstrip().splitlines():
        log("    " + line)
    if code != 0:
        raise SystemExit(f"phixtral {' '.join(argv)} failed with exit code {code}")
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_merged(args, work: Path, merged: Path, log: "Log") -> tuple[dict, Path]:
    """Steps 1-4: tokenizer, base, experts, merge into `merged`. Returns (times, recipe path)."""
    from transformers import PhiForCausalLM

    # 1. data and tokenizer
    log()
    log("[1] stdlib slices (pieces of ~16 KB, every 10th held out) and the tokenizer")
    for row in describe_slices():
        log(
            f"    {row['slice']:8s} {row['files']:4d} files {row['pieces']:4d} pieces  "
            f"train {row['train_chars']:>9,d} chars  held out {row['heldout_chars']:>8,d} chars"
        )
    train_texts = {s: slice_texts(s, "train") for s in EXPERT_SLICES + ("general",)}
    t = time.time()
    tokenizer = train_tokenizer([x for texts in train_texts.values() for x in texts], args.vocab_size, args.seq_len)
    streams = {s: token_stream(tokenizer, texts) for s, texts in train_texts.items()}
    log(f"    tokenizer: byte-level BPE, {len(tokenizer)} tokens, trained in {time.time() - t:.1f} s")
    for s, st in streams.items():
        chars = sum(len(x) for x in train_texts[s])
        log(f"    {s:8s} train stream {st.numel():>9,d} tokens ({chars / st.numel():.2f} chars/token)")

    # 2. base
    config = phi_config(args, tokenizer)
    model = PhiForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.pretrain_steps * args.batch_size * args.seq_len
    log()
    log(f"[2] base: PhiForCausalLM {n_params / 1e6:.2f} M parameters "
        f"(n_embd {args.n_embd}, {args.n_layer} layers, {args.n_head} heads, "
        f"rotary {args.n_embd // args.n_head // 2} of {args.n_embd // args.n_head} dims), pretrained on general: "
        f"{args.pretrain_steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,d} tokens "
        f"({tokens / streams['general'].numel():.2f} epochs)")  # fmt: skip
    t = time.time()
    train(model, streams["general"], steps=args.pretrain_steps, lr=args.pretrain_lr, warmup=30,
          batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed, log=log, tag="base",
          log_every=25)  # fmt: skip
    save_hf(model, tokenizer, work / "base")
    times = {"pretrain": time.time() - t}
    log(f"    pretraining took {times['pretrain']:.0f} s")
    del model

    # 3. experts
    log()
    tokens = args.expert_steps * args.batch_size * args.seq_len
    log("[3] experts: the base with only mlp.fc1 / mlp.fc2 trainable, "
        f"{args.expert_steps} steps x {args.batch_size} x {args.seq_len} = {tokens:,d} tokens each")  # fmt: skip
    t = time.time()
    for i, s in enumerate(EXPERT_SLICES):
        model = PhiForCausalLM.from_pretrained(str(work / "base"), dtype=torch.float32)
        for name, param in model.named_parameters():
            param.requires_grad_(".mlp." in name)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"    expert-{s}: {trainable / 1e6:.2f} M trainable, {tokens / streams[s].numel():.2f} epochs of its slice")
        train(model, streams[s], steps=args.expert_steps, lr=args.expert_lr, warmup=5, batch_size=args.batch_size,
              seq_len=args.seq_len, seed=args.seed + 1 + i, log=log, tag=s, log_every=20)  # fmt: skip
        save_hf(model, tokenizer, work / f"expert-{s}")
        del model
    times["experts"] = time.time() - t
    log(f"    fine-tuning took {times['experts']:.0f} s")

    # 4. merge
    log()
    log(f"[4] phixtral merge: gate_mode hidden, top-2, {args.prompts} positive prompts per expert"
        + ("" if args.no_negatives else ", the other experts' prompts as negative prompts"))  # fmt: skip
    prompts = {s: snippets(train_texts[s], args.prompts, 600) for s in EXPERT_SLICES}
    recipe = write_recipe(work, prompts, negatives=not args.no_negatives)
    t = time.time()
    run_cli(["merge", str(recipe), "--out", str(merged), "--overwrite", "--max-shard-size", str(10 / 1024)], log)
    times["merge"] = time.time() - t
    log(f"    merge took {times['merge']:.0f} s")
    return times, recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "phixtral" / "assets" / "tiny-phixtral")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "tiny-phixtral")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512, help="training window = n_positions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--pretrain-steps", type=int, default=500)
    p.add_argument("--pretrain-lr", type=float, default=3e-3)
    p.add_argument("--expert-steps", type=int, default=70)
    p.add_argument("--expert-lr", type=float, default=1e-3)
    p.add_argument("--prompts", type=int, default=16, help="positive prompts per expert")
    p.add_argument("--no-negatives", action="store_true", help="no negative prompts in the recipe")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--router-steps", type=int, default=ROUTER["steps"], help="train-router steps")
    p.add_argument("--router-lr", type=float, default=ROUTER["lr"])
    p.add_argument("--router-aux-loss-coef", type=float, default=ROUTER["aux_loss_coef"])
    p.add_argument("--router-domain-loss-coef", type=float, default=ROUTER["domain_loss_coef"],
                   help="pull each expert slice's tokens toward its own expert")  # fmt: skip
    p.add_argument("--no-eval", action="store_true", help="skip step 6 (EVAL.md)")
    p.add_argument(
        "--reuse-work", action="store_true", help="reuse steps 1-4 (base, experts, merge) from --work when there"
    )
    args = p.parse_args(argv)

    import tokenizers
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = Log()
    work, out = args.work.resolve(), args.out.resolve()
    work_shown = work.relative_to(ROOT) if work.is_relative_to(ROOT) else work
    work.mkdir(parents=True, exist_ok=True)
    log("# Build log of the bundled tiny phixtral")
    log()
    cli = "".join(" " + a for a in (argv if argv is not None else sys.argv[1:]))
    log(f"Written by `python scripts/build_tiny_phixtral.py{cli}`; the numbers below are that run's.")
    log()
    log("```")
    log(f"started   {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    log(
        f"python {python_version()}  torch {torch.__version__}  transformers {transformers.__version__}  "
        f"tokenizers {tokenizers.__version__}"
    )
    log(f"machine   {platform.machine()} {platform.processor() or ''}  torch threads {torch.get_num_threads()}")
    log(f"args      {json.dumps({k: str(v) for k, v in vars(args).items()})}")

    eval_md = out / "EVAL.md"  # its discussion below the table is written by hand: a rebuild keeps it
    old_eval = eval_md.read_text() if eval_md.is_file() else ""
    notes = old_eval.partition(NOTES_HEADING)[2]
    merged, steps_log = work / "merged", work / "BUILD_LOG.steps-1-4.md"
    if args.reuse_work and (merged / "config.json").is_file() and steps_log.is_file():
        log()
        log(f"[1-4] reused from {work_shown} (--reuse-work): the log of the run that built them")
        for line in steps_log.read_text().splitlines():
            log(line)
        times = {}
        recipe = work / "recipe.yaml"
    else:
        first = len(log.lines)
        times, recipe = build_merged(args, work, merged, log)
        steps_log.write_text("\n".join(log.lines[first:]) + "\n")

    # 5. router
    log()
    argv_router = ["train-router", "--model", str(merged), "--data", "stdlib", "--steps", str(args.router_steps),
                   "--lr", str(args.router_lr), "--aux-loss-coef", str(args.router_aux_loss_coef),
                   "--domain-loss-coef", str(args.router_domain_loss_coef), "--expert-data", *EXPERT_SLICES,
                   "--seed", str(args.seed),
                   "--seq-len", str(ROUTER["seq_len"]), "--batch-size", str(ROUTER["batch_size"]),
                   "--eval-every", str(ROUTER["eval_every"]), "--backend", "torch", "--device", "cpu",
                   "--out", str(out), "--overwrite", "--no-progress"]  # fmt: skip
    log(f"[5] phixtral {' '.join(argv_router[:1] + argv_router[3:])} (--model {merged.name})")
    t = time.time()
    with contextlib.redirect_stderr(io.StringIO()) as progress:
        run_cli(argv_router, log)
    for line in progress.getvalue().splitlines():
        if line.startswith(("held-out", "step")):
            log("    " + line)
    times["router"] = time.time() - t
    shutil.copy2(recipe, out / "merge-recipe.yaml")
    log(
        f"    train-router took {times['router']:.0f} s; recipe copied to merge-recipe.yaml "
        f"(model paths relative to {work_shown})"
    )
    size = 0
    for f in sorted(out.iterdir()):
        size += f.stat().st_size
        log(f"    {f.name:40s} {f.stat().st_size:>11,d} bytes  sha256 {sha256(f)[:16]}")
    log(f"    total {size / 1e6:.2f} MB")

    # 6. eval
    if not args.no_eval:
        log()
        models = [work / "base"] + [work / f"expert-{s}" for s in EXPERT_SLICES] + [merged, out]
        rel = lambda q: str(q.relative_to(ROOT)) if q.is_relative_to(ROOT) else str(q)  # noqa: E731
        argv_eval = (
            ["eval"]
            + [a for m in models for a in ("--model", rel(m))]
            + ["--stdlib-slice", "all", "--markdown", "--no-progress"]
        )
        command = "python -m phixtral " + " ".join(argv_eval)
        log(f"[6] {command}")
        t = time.time()
        out_text = run_cli(argv_eval, log)
        times["eval"] = time.time() - t
        table = "\n".join(line for line in out_text.splitlines() if line.startswith("|"))
        eval_md.write_text(
            "# Perplexity of the tiny phixtral, its base and its experts\n\n"
            f"Held-out pieces (every 10th ~16 KB piece) of each stdlib slice, Python {python_version()}; windows of "
            f"{args.seq_len} tokens, float32 on the CPU; lower is better. Made by (from the repository root, after "
            f"`python scripts/build_tiny_phixtral.py`):\n\n```\n{command}\n```\n\n{table}\n"
            + (f"\n{NOTES_HEADING}{notes}" if notes else "")
        )
        log(f"    eval took {times['eval']:.0f} s")
    elif old_eval:
        eval_md.write_text(old_eval)  # as it was before the merge (its table is the previous build's)
    log()
    log(
        "times: "
        + "  ".join(f"{k} {v:.0f} s" for k, v in times.items())
        + f"  total {log.elapsed():.0f} s ({log.elapsed() / 60:.1f} min)"
    )
    log("```")
    (out / "BUILD_LOG.md").write_text("\n".join(log.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
