"""Tiny checkpoints built on the fly (no hub access): a random transformers PhiForCausalLM with a freshly trained
byte-level BPE tokenizer, phi-msft MoE checkpoints with the real key and config names (sharded, with an index), and a
plain-PyTorch re-implementation of the original phixtral forward to compare against.

Builders are cached per process, so every test file shares one copy of each checkpoint.
"""

import atexit
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

_ROOT = Path(tempfile.mkdtemp(prefix="phixtral-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

EOS = "<|endoftext|>"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> str:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    lines = []
    for i in range(120):
        lines.append(" ".join(words[(i * 7 + j) % len(words)] for j in range(9)) + ".")
        lines.append(f"def f{i}(x, y):\n    return x * {i} + y  # comment {i % 5}")
    lines.append("Unicode: café, naïve, 東京, emoji 🙂.")
    return "\n".join(lines)  # about 10 KB


@functools.lru_cache(maxsize=None)
def train_tokenizer(vocab_size: int = 400, chat_template: bool = True):
    """A GPT-2-style byte-level BPE tokenizer (as phi-2's) with <|endoftext|> as bos/eos/unk and the ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_corpus()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)
    if chat_template:
        fast.chat_template = CHATML
    return fast


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Non-zero everything (biases and LayerNorm affines too), so a misplaced tensor always shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or ".ln." in name or name.startswith("ln"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            else:
                p.copy_(scale * noise)


@functools.lru_cache(maxsize=None)
def hf_phi_checkpoint(
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    vocab: int = 512,
    n_positions: int = 128,
    partial_rotary_factor: float = 0.4,
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """A random transformers PhiForCausalLM saved with save_pretrained (HF `phi` layout) next to its tokenizer."""
    from transformers import PhiConfig, PhiForCausalLM

    tokenizer = train_tokenizer()
    eos = tokenizer.eos_token_id
    config = PhiConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=n_positions,
        partial_rotary_factor=partial_rotary_factor,
        rope_theta=rope_theta,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = PhiForCausalLM(config).eval()
    _randomize(model, seed)
    folder = _ROOT / "-".join(
        map(str, ("hf", hidden, layers, heads, kv_heads, vocab, n_positions, partial_rotary_factor, rope_theta, seed))
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_hf(folder: Path):
    from transformers import PhiForCausalLM

    return PhiForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()


# --- phi-msft checkpoints ---------------------------------------------------------------------------------------------
def msft_config(
    *, hidden, layers, heads, vocab, n_positions, rotary_dim, experts=None, top_k=None, n_inner=None
) -> dict:
    """config.json of phixtral (model_type phi-msft) with every key the real one has."""
    d = {
        "_name_or_path": "mlabonne/phixtral-4x2_8",
        "activation_function": "gelu_new",
        "architectures": ["PhiForCausalLM"],
        "attn_pdrop": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_phi.PhiConfig",
            "AutoModelForCausalLM": "modeling_phi.PhiForCausalLM",
        },
        "embd_pdrop": 0.0,
        "flash_attn": False,
        "flash_rotary": False,
        "fused_dense": False,
        "img_processor": None,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "phi-msft",
        "n_embd": hidden,
        "n_head": heads,
        "n_head_kv": None,
        "n_inner": n_inner,
        "n_layer": layers,
        "n_positions": n_positions,
        "resid_pdrop": 0.1,
        "rotary_dim": rotary_dim,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.37.0.dev0",
        "vocab_size": vocab,
    }
    if experts is not None:
        d["num_local_experts"] = experts
        d["num_experts_per_tok"] = top_k
    return d


def write_checkpoint(folder: Path, tensors: dict, config: dict, n_shards: int = 2, tokenizer=True) -> Path:
    """Write tensors (in the given order) as model-0000i-of-0000n.safetensors, model.safetensors.index.json and
    config.json, as mergekit did for phixtral."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per = math.ceil(len(names) / n_shards)
    weight_map = {}
    for i in range(n_shards):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n].contiguous().clone() for n in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        train_tokenizer().save_pretrained(folder)
    return folder


def hf_to_msft(state: dict, layers: int, experts: int = None, gate_seed: int = 0) -> dict:
    """transformers Phi tensors -> phi-msft names; experts=None: dense layout, else E identical copies of the MLP."""
    g = torch.Generator().manual_seed(gate_seed)
    out = {"transformer.embd.wte.weight": state["model.embed_tokens.weight"]}
    for i in range(layers):
        s, d = f"model.layers.{i}.", f"transformer.h.{i}."
        for p in ("weight", "bias"):
            out[d + f"ln.{p}"] = state[s + f"input_layernorm.{p}"]
            out[d + f"mixer.Wqkv.{p}"] = torch.cat([state[s + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[d + f"mixer.out_proj.{p}"] = state[s + f"self_attn.dense.{p}"]
        if experts is None:
            for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                out[d + f"mlp.{p}"] = state[s + f"mlp.{p}"]
        else:
            D = state["model.embed_tokens.weight"].shape[1]
            out[d + "moe.gate.weight"] = torch.randn(experts, D, generator=g)
            for e in range(experts):
                for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                    out[d + f"moe.mlp.{e}.{p}"] = state[s + f"mlp.{p}"]
    for p in ("weight", "bias"):
        out[f"lm_head.ln.{p}"] = state[f"model.final_layernorm.{p}"]
        out[f"lm_head.linear.{p}"] = state[f"lm_head.{p}"]
    return out


def random_msft_tensors(*, hidden, layers, heads, vocab, experts, n_inner=None, seed=0) -> dict:
    """Random phixtral tensors under the real names (layer-norm affines near 1/0, everything else ~N(0, 0.1^2))."""
    g = torch.Generator().manual_seed(seed)
    D, F_ = hidden, n_inner or 4 * hidden

    def r(*shape, base=0.0, scale=0.1):
        return base + scale * torch.randn(*shape, generator=g)

    t = {"transformer.embd.wte.weight": r(vocab, D)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        t[p + "ln.weight"], t[p + "ln.bias"] = r(D, base=1.0), r(D)
        t[p + "mixer.Wqkv.weight"], t[p + "mixer.Wqkv.bias"] = r(3 * D, D), r(3 * D)
        t[p + "mixer.out_proj.weight"], t[p + "mixer.out_proj.bias"] = r(D, D), r(D)
        t[p + "moe.gate.weight"] = r(experts, D, scale=1.0)
        for e in range(experts):
            q = f"{p}moe.mlp.{e}."
            t[q + "fc1.weight"], t[q + "fc1.bias"] = r(F_, D), r(F_)
            t[q + "fc2.weight"], t[q + "fc2.bias"] = r(D, F_), r(D)
    t["lm_head.ln.weight"], t["lm_head.ln.bias"] = r(D, base=1.0), r(D)
    t["lm_head.linear.weight"], t["lm_head.linear.bias"] = r(vocab, D), r(vocab)
    return t


@functools.lru_cache(maxsize=None)
def msft_moe_checkpoint(
    hidden=64, layers=2, heads=4, vocab=512, experts=4, top_k=2, n_positions=128, rotary_dim=8, n_shards=3, seed=0
) -> Path:
    """A random phixtral checkpoint: real key names and config keys, sharded with an index, with a tokenizer."""
    tensors = random_msft_tensors(hidden=hidden, layers=layers, heads=heads, vocab=vocab, experts=experts, seed=seed)
    config = msft_config(
        hidden=hidden, layers=layers, heads=heads, vocab=vocab, n_positions=n_positions, rotary_dim=rotary_dim,
        experts=experts, top_k=top_k,
    )  # fmt: skip
    folder = _ROOT / f"msft-moe-{hidden}-{layers}-{heads}-{vocab}-{experts}-{top_k}-{n_positions}-{rotary_dim}-{seed}"
    return write_checkpoint(folder, tensors, config, n_shards=n_shards)


def read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# --- the original phixtral forward, in plain PyTorch ------------------------------------------------------------------
def reference_phixtral_forward(t: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """The phi-msft phixtral forward written from its description: ids [B, S] -> logits [B, S, V] fp32.

    Independent of the phixtral package: it reads the checkpoint's tensors by their real names; MoE as the original
    (torch.topk over raw logits, softmax of the k picks, repeat_interleave + a boolean mask per expert).
    """
    D, H, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    hd, rot, eps = D // H, cfg["rotary_dim"], cfg["layer_norm_epsilon"]
    E, k = cfg.get("num_local_experts", 1), cfg.get("num_experts_per_tok", 1)
    B, S = ids.shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.outer(torch.arange(S).float(), inv_freq)  # [S, rot / 2]
    cos, sin = freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def rotary(z):  # z [B, S, H, hd]
        z1, z2 = z[..., :rot].chunk(2, dim=-1)
        return torch.cat([z1 * cos - z2 * sin, z1 * sin + z2 * cos, z[..., rot:]], dim=-1)

    def expert(x, p):
        h = F.gelu(F.linear(x, t[p + "fc1.weight"], t[p + "fc1.bias"]), approximate="tanh")  # gelu_new
        return F.linear(h, t[p + "fc2.weight"], t[p + "fc2.bias"])

    x = t["transformer.embd.wte.weight"][ids]
    causal = torch.full((S, S), -10000.0).triu(1)
    for i in range(L):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (D,), t[p + "ln.weight"], t[p + "ln.bias"], eps)
        q, kk, v = F.linear(h, t[p + "mixer.Wqkv.weight"], t[p + "mixer.Wqkv.bias"]).view(B, S, 3, H, hd).unbind(2)
        q, kk = rotary(q), rotary(kk)
        scores = torch.einsum("bthd,bshd->bhts", q, kk * (1.0 / math.sqrt(hd))) + causal
        attn = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, S, D)
        attn = F.linear(attn, t[p + "mixer.out_proj.weight"], t[p + "mixer.out_proj.bias"])
        flat = h.reshape(-1, D)
        if E == 1 and p + "mlp.fc1.weight" in t:
            moe = expert(flat, p + "mlp.")
        else:
            weights, idx = torch.topk(flat @ t[p + "moe.gate.weight"].t(), k, dim=-1)
            weights = weights.softmax(-1)
            rep = flat.repeat_interleave(k, dim=0)
            y = torch.empty_like(rep)
            for e in range(E):
                mask = idx.reshape(-1) == e
                y[mask] = expert(rep[mask], f"{p}moe.mlp.{e}.")
            moe = (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(1)
        x = attn + moe.view(B, S, D) + x
    x = F.layer_norm(x, (D,), t["lm_head.ln.weight"], t["lm_head.ln.bias"], eps)
    return F.linear(x, t["lm_head.linear.weight"], t["lm_head.linear.bias"]).float()


# --- GPTQ checkpoints -------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def gptq_moe_checkpoint(bits=4, group_size=32, sym=False, act_order=True, seed=0) -> Path:
    """The random phixtral of `msft_moe_checkpoint`, RTN-quantized (Wqkv, out_proj, fc1, fc2) and written in AutoGPTQ's
    v1 layout in fp16 (as published GPTQ checkpoints are). act_order: every Linear gets a random column order, so its
    g_idx is a real act-order one."""
    import phixtral
    from phixtral.quant import GPTQConfig, quantizable, quantize_model_rtn

    model = phixtral.from_pretrained(msft_moe_checkpoint(), device="cpu", dtype="float32", backend="torch")
    orders = None
    if act_order:
        g = torch.Generator().manual_seed(seed)
        orders = {}
        for name in quantizable(model):
            w = model.get_submodule(name).weight
            E, K = (w.shape[0] if w.dim() == 3 else 1), w.shape[-1]
            orders[name] = torch.stack([torch.randperm(K, generator=g) for _ in range(E)])
    quantize_model_rtn(model, GPTQConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=sym), orders=orders)
    folder = _ROOT / f"gptq-{bits}-{group_size}-{sym}-{act_order}-{seed}"
    model.save_pretrained(folder, dtype="float16")
    return folder


def gptq_codes(tensors: dict, module: str, bits: int) -> tuple:
    """One GPTQ v1 Linear's tensors decoded from the format's definition (independent of the package): row k of qweight
    in word k // P at bit (k % P) * bits, low bits first; qzeros the same along N, stored as zero - 1.
    -> (codes q [K, N], zero points [G, N], scales [G, N] fp32, g_idx [K]), integers as int64."""
    per, mask = 32 // bits, 2**bits - 1
    qweight, qzeros, scales = tensors[module + ".qweight"], tensors[module + ".qzeros"], tensors[module + ".scales"]
    K, N = qweight.shape[0] * per, qweight.shape[1]
    k, n = torch.arange(K), torch.arange(N)
    q = (qweight[k // per].long() >> (bits * (k % per))[:, None]) & mask  # [K, N]
    z = ((qzeros[:, n // per].long() >> (bits * (n % per))[None, :]) & mask) + 1  # [G, N]
    g_idx = tensors.get(module + ".g_idx", k // (K // scales.shape[0])).long()
    return q, z, scales.float(), g_idx


def dequantize_gptq_tensors(tensors: dict, bits: int) -> dict:
    """GPTQ v1 tensors -> float `<module>.weight` [N, K] (W = scale * (q - zero), see `gptq_codes`), the other tensors
    as fp32."""
    out = {n: t.float() for n, t in tensors.items() if not n.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name in [n for n in tensors if n.endswith(".qweight")]:
        m = name[: -len(".qweight")]
        q, z, scales, g_idx = gptq_codes(tensors, m, bits)
        out[m + ".weight"] = (scales[g_idx] * (q - z[g_idx]).float()).t().contiguous()
    return out


def eager_and_graph_step_logits(model, ids, mask, max_new_tokens: int) -> tuple:
    """Each decode step's logits [steps, B, V] of an eager run and of a CUDA-graph run (generate_tokens, cuda_graph
    False / True) fed the same tokens: the eager run's greedy ones. Asserts that each run took the path asked for."""
    from phixtral.generate import generate_tokens

    logits, fed = {False: [], True: []}, []

    def record(graph):
        def sampler(x):
            logits[graph].append(x.clone())
            if not graph:
                fed.append(x.argmax(-1))
            return fed[len(logits[graph]) - 1]

        return sampler

    for graph in (False, True):
        stats = {"prefill_s": 0.0, "decode_s": 0.0}
        for _ in generate_tokens(
            model, ids, mask, max_new_tokens=max_new_tokens, sampler=record(graph), stats=stats, cuda_graph=graph
        ):
            pass
        assert stats.get("cuda_graph", False) is graph
    return torch.stack(logits[False]), torch.stack(logits[True])
