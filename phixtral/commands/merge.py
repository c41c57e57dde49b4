"""`phixtral merge RECIPE.yaml --out DIR`: build a phixtral MoE from dense phi-2 checkpoints as a mergekit recipe says.

The recipe is mergekit's (mixtral branch) MoE format:
    base_model: path                    embeddings, attention, LayerNorms and the head come from here
    gate_mode: hidden                   hidden | cheap_embed | random
    dtype: float16                      float16 | bfloat16 | float32 (default float16)
    experts_per_token: 2                optional, default 2 (mergekit's default)
    experts:
      - source_model: path              this expert's fc1 / fc2 in every layer
        positive_prompts: ["..."]
        negative_prompts: ["..."]       optional
Sources are local phi-2 checkpoints in either layout (transformers' `phi` or the original phi-msft), dense, with the
same n_embd, n_inner and n_layer. Relative paths are tried from the working directory, then from the recipe's folder.

Gate rows (one per expert and layer, each normalized to unit length; router logits = gate @ x, no bias):
    hidden       mean over the positive prompts of the base model's hidden state at each layer's MoE input, minus the
                 same mean over the negative prompts. For phi-2 the MoE input is the block's LayerNorm output ln(x),
                 which is also the attention input (parallel block). Each prompt is averaged over all its tokens (as
                 mergekit's default; it can also take the last token only, not offered here), then the prompts are
                 averaged. mergekit takes the residual stream entering each layer instead: for its Mixtral target the
                 MoE input is a LayerNorm of that stream plus the attention output, so that is an approximation; for
                 phi-2 this vector is the exact MoE input. mergekit also averages over right-padded batches; here
                 padding never enters the mean.
    cheap_embed  mean token embedding of the prompts (same averaging), the same row in every layer.
    random       standard normal rows, not normalized (as mergekit), seeded by --seed.
As in mergekit, every prompt is prefixed with the tokenizer's bos token (`<|endoftext|>` for phi-2). So an empty
prompt is the bos token alone: phixtral-4x2_8's four `positive_prompts: [""]` gave four identical gate rows, a router
that cannot route (all logits tie, top-k falls back to the lowest indices). The merge warns loudly about such recipes.

Output: the phi-msft MoE layout with phixtral's tensor names, sharded safetensors + model.safetensors.index.json,
config.json (model_type phi-msft, num_local_experts, num_experts_per_tok), and the base model's tokenizer files.
Every check runs before anything is written. The files go to a temporary folder next to --out that replaces it whole
once complete (phixtral.atomic): a failure leaves --out as it was. --out may not be, contain or lie inside a source.
"""

import argparse
import dataclasses
import json
import shutil
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..config import PhixtralConfig
from .args import add_threads_arg, apply_threads, check_out, float_in, seed

GATE_MODES = ("hidden", "cheap_embed", "random")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja",
)  # fmt: skip
_RECIPE_KEYS = {"base_model", "gate_mode", "dtype", "experts", "experts_per_token"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts"}
# Keys phixtral-4x2_8's config.json carries besides the ones PhixtralConfig writes (inference leaves them unused).
_MSFT_EXTRA_KEYS = {
    "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": 0.02, "flash_attn": False,
    "flash_rotary": False, "fused_dense": False, "img_processor": None,
}  # fmt: skip
# Two gate rows with cosine similarity at least this are the same vector up to rounding: the router cannot tell them
# apart.
IDENTICAL_COSINE = 1 - 1e-6


class RecipeError(ValueError):
    """A recipe that cannot be merged: raised before anything is written."""


@dataclass
class ExpertSpec:
    source_model: str
    positive_prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    base_model: str
    gate_mode: str
    dtype: str
    experts: list[ExpertSpec]
    experts_per_token: int = 2
    folder: Optional[Path] = None  # the recipe file's folder: relative model paths are also tried from here


@dataclass
class Source:
    """A checked source checkpoint: its folder, config and (from the file headers) its key layout and map."""

    path: Path
    config: PhixtralConfig
    layout: str
    mapping: dict


@dataclass
class MergeReport:
    out: Path
    config: PhixtralConfig
    gate_mode: str
    files: list[Path]
    identical_gates: dict  # {(i, j): [layers]} expert pairs whose gate rows are the same vector
    max_gate_cosine: list[float]  # per layer, the largest cosine similarity between two experts' gate rows


# --- the recipe ------------------------------------------------------------------------------------------------------
def _prompts(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"{where} must be a list of strings, got {value!r}")
    return value


def parse_recipe(d, folder: Optional[Path] = None) -> Recipe:
    """A Recipe from the recipe's dict (as yaml.safe_load returns it), or a RecipeError naming the problem."""
    if not isinstance(d, dict):
        raise RecipeError(f"a recipe must be a mapping with base_model, gate_mode and experts; got {type(d).__name__}")
    unknown = set(d) - _RECIPE_KEYS
    if unknown:
        raise RecipeError(f"unknown recipe keys {sorted(unknown)}; a MoE recipe has {sorted(_RECIPE_KEYS)}")
    for key in ("base_model", "experts"):
        if d.get(key) is None:
            raise RecipeError(f"recipe has no {key!r}")
    if not isinstance(d["base_model"], str):
        raise RecipeError(f"base_model must be a path (string), got {d['base_model']!r}")
    gate_mode = d.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise RecipeError(f"unknown gate_mode {gate_mode!r}; choose one of {GATE_MODES}")
    dtype = d.get("dtype", "float16")
    if dtype not in DTYPES:
        raise RecipeError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    experts_raw = d["experts"]
    if not isinstance(experts_raw, list) or len(experts_raw) < 2:
        raise RecipeError(f"experts must be a list of at least 2 entries, got {experts_raw!r}")
    experts = []
    for i, e in enumerate(experts_raw):
        if not isinstance(e, dict) or not isinstance(e.get("source_model"), str):
            raise RecipeError(f"experts[{i}] must be a mapping with a source_model path, got {e!r}")
        unknown = set(e) - _EXPERT_KEYS
        if unknown:
            raise RecipeError(f"experts[{i}]: unknown keys {sorted(unknown)}; an expert has {sorted(_EXPERT_KEYS)}")
        experts.append(
            ExpertSpec(
                e["source_model"],
                _prompts(e.get("positive_prompts"), f"experts[{i}].positive_prompts"),
                _prompts(e.get("negative_prompts"), f"experts[{i}].negative_prompts"),
            )
        )
        if gate_mode != "random" and not experts[-1].positive_prompts:
            raise RecipeError(f"experts[{i}] has no positive_prompts; gate_mode {gate_mode!r} needs at least one")
    k = d.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(experts):
        raise RecipeError(f"experts_per_token must be an int in [1, {len(experts)}] (the number of experts), got {k!r}")
    return Recipe(d["base_model"], gate_mode, dtype, experts, k, folder)


def load_recipe(path) -> Recipe:
    """Read and check a recipe YAML file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from e
    return parse_recipe(d, path.resolve().parent)


# --- the sources -----------------------------------------------------------------------------------------------------
def _resolve(name: str, recipe: Recipe, what: str) -> Path:
    candidates = [Path(name).expanduser()]
    if recipe.folder is not None and not candidates[0].is_absolute():
        candidates.append(recipe.folder / name)
    for c in candidates:
        if c.is_dir():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise RecipeError(f"{what} {name!r}: no such checkpoint folder ({tried}); merge reads local checkpoints only")


def check_source(path: Path, what: str) -> Source:
    """Read a source's config and check its tensors from the file headers (nothing is loaded)."""
    from ..weights import inspect_checkpoint, read_config

    try:
        config = read_config(path)
        _, layout, mapping = inspect_checkpoint(path, config)
    except ValueError as e:
        raise RecipeError(f"{what} {path}: {e}") from e
    if any(t.kind != "float" or t.stage is not None for t in mapping.values()):
        raise RecipeError(
            f"{what} {path} is a GPTQ checkpoint; merge reads float checkpoints (quantize the merged model)"
        )
    if config.is_moe:
        raise RecipeError(
            f"{what} {path} is already a MoE ({config.num_local_experts} experts); sources must be dense phi-2 models"
        )
    return Source(path, config, layout, mapping)


def source_paths(recipe: Recipe) -> tuple[Path, list[Path]]:
    """The folders of the base model and of every expert (RecipeError for one that does not exist)."""
    base = _resolve(recipe.base_model, recipe, "base_model")
    return base, [_resolve(e.source_model, recipe, f"experts[{i}]") for i, e in enumerate(recipe.experts)]


def check_sources(recipe: Recipe) -> tuple[Source, list[Source]]:
    """Resolve and check the base and every expert; one RecipeError listing every mismatch with the base."""
    base_path, expert_paths = source_paths(recipe)
    base = check_source(base_path, "base_model")
    experts = [check_source(p, f"experts[{i}]") for i, p in enumerate(expert_paths)]
    problems = []
    for i, src in enumerate(experts):
        for key in ("n_embd", "n_inner", "n_layer"):
            a, b = getattr(base.config, key), getattr(src.config, key)
            if a != b:
                problems.append(f"experts[{i}] ({src.path}): {key} = {b}, but the base model has {key} = {a}")
    if problems:
        raise RecipeError(
            "the experts do not fit the base model (fc1 / fc2 shapes must match):\n  " + "\n  ".join(problems)
        )
    return base, experts


def read_params(source: Source, wanted, dtype: torch.dtype, shapes: dict) -> dict[str, torch.Tensor]:
    """The model parameters named in `wanted` (Phixtral names), read from a source checkpoint in `dtype`.

    shapes: {param name: full shape} of a Phixtral of the source's config (for HF's q/k/v, which fill Wqkv row blocks).
    """
    from ..weights import checkpoint_files, open_safetensors

    wanted = set(wanted)
    out = {name: torch.empty(shapes[name], dtype=dtype) for name in wanted}
    for file in checkpoint_files(source.path):
        with open_safetensors(file) as f:
            for name in f.keys():
                target = source.mapping.get(name)
                if target is not None and target.param in wanted:
                    out[target.param][target.index].copy_(f.get_tensor(name))
    return out


def _meta_shapes(config: PhixtralConfig) -> dict[str, tuple]:
    from ..model import Phixtral

    with torch.device("meta"):
        model = Phixtral(config, backend="torch")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# --- gates -----------------------------------------------------------------------------------------------------------
def _encode_prompts(tokenizer, prompts: list[str], max_len: int) -> list[torch.Tensor]:
    bos = tokenizer.bos_token or ""
    ids = []
    for p in prompts:
        t = tokenizer(bos + p, add_special_tokens=False, verbose=False)["input_ids"][:max_len]
        if not t:
            raise RecipeError(f"prompt {p!r} encodes to no tokens and the tokenizer has no bos token to stand for it")
        ids.append(torch.tensor(t, dtype=torch.long))
    return ids


def _mean_hidden(model, ids: list[torch.Tensor]) -> torch.Tensor:
    """[L, D]: per layer, the MoE input ln(x) averaged over each prompt's tokens, then over the prompts."""
    captured = []
    hooks = [
        block.ln.register_forward_hook(lambda mod, inp, out: captured.append(out[0].float().mean(0)))
        for block in model.h
    ]
    try:
        total = 0
        with torch.no_grad():
            for t in ids:
                captured.clear()
                model.hidden_states(t[None].to(model.device))
                total = total + torch.stack(captured)  # [L, D]
    finally:
        for h in hooks:
            h.remove()
    return total / len(ids)


def _mean_embed(wte: torch.Tensor, ids: list[torch.Tensor], n_layer: int) -> torch.Tensor:
    v = torch.stack([wte[t].float().mean(0) for t in ids]).mean(0)  # [D]
    return v.expand(n_layer, -1)


def gate_vectors(recipe: Recipe, base: Source, *, device="cpu", seed: int = 0, progress: bool = True) -> torch.Tensor:
    """The router weights of every layer, [L, E, D] fp32, as the recipe's gate_mode defines them (module docstring)."""
    from tqdm.auto import tqdm

    from ..weights import load_tokenizer

    L, D, E = base.config.n_layer, base.config.n_embd, len(recipe.experts)
    if recipe.gate_mode == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn(L, E, D, generator=g)
    tokenizer = load_tokenizer(base.path)
    if tokenizer is None:
        raise RecipeError(f"gate_mode {recipe.gate_mode!r} needs the base model's tokenizer, and {base.path} has none")
    if recipe.gate_mode == "hidden":
        from ..weights import from_pretrained

        model = from_pretrained(base.path, device=device, dtype=torch.float32, backend="torch")
        vector = lambda ids: _mean_hidden(model, ids)  # noqa: E731
    else:
        wte = read_params(base, ["wte.weight"], torch.float32, _meta_shapes(base.config))["wte.weight"]
        vector = lambda ids: _mean_embed(wte, ids, L)  # noqa: E731
    rows = []
    for i, expert in enumerate(tqdm(recipe.experts, desc=f"gates ({recipe.gate_mode})", disable=not progress)):
        v = vector(_encode_prompts(tokenizer, expert.positive_prompts, base.config.n_positions))
        if expert.negative_prompts:
            v = v - vector(_encode_prompts(tokenizer, expert.negative_prompts, base.config.n_positions))
        norm = v.norm(dim=-1, keepdim=True)  # [L, 1]
        if (norm == 0).any():
            raise RecipeError(
                f"experts[{i}]: the positive and negative prompts give the same vector, so the gate row is zero"
            )
        rows.append(v / norm)
    return torch.stack(rows, dim=1)  # [L, E, D]


def gate_similarity(gate: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of one layer's gate rows: gate [E, D] -> [E, E] fp32."""
    g = gate.float()
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return g @ g.T


def identical_gate_pairs(gates, threshold: float = IDENTICAL_COSINE) -> dict:
    """{(i, j): [layers]} for expert pairs i < j whose gate rows point the same way (cosine >= threshold) somewhere."""
    pairs = {}
    for layer, g in enumerate(gates):
        sim = gate_similarity(g)
        E = sim.shape[0]
        for i in range(E):
            for j in range(i + 1, E):
                if sim[i, j] >= threshold:
                    pairs.setdefault((i, j), []).append(layer)
    return pairs


def tie_consequence(num_experts: int, top_k: int) -> str:
    """What identical gate rows do to routing at this top-k, in words."""
    if top_k >= num_experts:
        return (
            f"with top-{top_k} of {num_experts} experts every expert runs on every token anyway, but experts with "
            "identical rows always get equal routing weights: the router cannot weigh one above the other"
        )
    return (
        "their router logits tie on every token, so the higher-index expert of a pair runs only together with the "
        "lower one, at the same weight, and never where the tie decides the last of the top-k picks (the lower index "
        "wins); if all rows are identical, only experts 0 to top_k - 1 ever run"
    )


def router_warning(pairs: dict, n_layer: int, num_experts: int, top_k: int) -> str:
    lines = []
    for (i, j), layers in sorted(pairs.items()):
        where = "every layer" if len(layers) == n_layer else f"layers {layers}"
        lines.append(f"experts {i} and {j} have the same gate vector in {where}")
    head = "THE ROUTER CANNOT ROUTE" if top_k < num_experts else "THE ROUTER CANNOT WEIGH"
    return (
        f"{head}: " + "; ".join(lines) + f". {tie_consequence(num_experts, top_k).capitalize()} "
        "(phixtral-4x2_8's empty prompts did exactly this). Give each expert prompts of its own."
    )


# --- the merge -------------------------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool, sources) -> None:
    """--out is writable: not a source (nor inside or around one), empty or, with --overwrite, a checkpoint folder."""
    try:
        check_out(out, overwrite=overwrite, sources=sources)
    except ValueError as e:
        raise RecipeError(f"--out: {e}") from e


def merge(recipe: Recipe, out, *, overwrite: bool = False, seed: int = 0, device="cpu",
          max_shard_bytes: int = 2 * 2**30, progress: bool = True) -> MergeReport:  # fmt: skip
    """Build the MoE the recipe describes and write it to `out` (see the module docstring). Returns a MergeReport."""
    from tqdm.auto import tqdm

    from ..atomic import atomic_folder
    from ..checkpoint_writer import write_msft_files

    out = Path(out)
    base_path, expert_paths = source_paths(recipe)
    sources = [base_path, *expert_paths]
    _check_out(out, overwrite, sources)
    base, experts = check_sources(recipe)
    dtype = DTYPES[recipe.dtype]
    E = len(experts)
    config = dataclasses.replace(
        base.config,
        num_local_experts=E,
        num_experts_per_tok=recipe.experts_per_token,
        torch_dtype=recipe.dtype,
        bos_token_id=None,  # phixtral's config.json has none; the tokenizer names bos / eos
        eos_token_id=None,
        model_type="phi-msft",
    )
    gates = gate_vectors(recipe, base, device=device, seed=seed, progress=progress)  # [L, E, D]

    shapes = _meta_shapes(config)
    dense_shapes = _meta_shapes(base.config)
    is_expert = lambda name: ".moe.fc" in name  # noqa: E731
    state = read_params(
        base, [n for n in dense_shapes if not is_expert(n) and ".moe.gate" not in n], dtype, dense_shapes
    )
    for name in shapes:
        if is_expert(name):
            state[name] = torch.empty(shapes[name], dtype=dtype)  # [E, F, D] / [E, F] / [E, D, F] / [E, D]
    for e, src in enumerate(tqdm(experts, desc="experts", disable=not progress)):
        own = read_params(src, [n for n in dense_shapes if is_expert(n)], dtype, dense_shapes)  # [1, ...] each
        for name, t in own.items():
            state[name][e].copy_(t[0])
        del own
    for i in range(config.n_layer):
        state[f"h.{i}.moe.gate.weight"] = gates[i].to(dtype)  # [E, D]

    copied = [f for f in TOKENIZER_FILES if (base.path / f).is_file()]
    # Into a temporary folder next to `out`, swapped in when complete: a failure leaves `out` as it was.
    with atomic_folder(out, overwrite=overwrite, sources=sources) as tmp:
        written = write_msft_files(tmp, state, config, dtype=dtype, max_shard_bytes=max_shard_bytes)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        extra = {k: v for k, v in _MSFT_EXTRA_KEYS.items() if k not in cfg}
        cfg_path.write_text(json.dumps({**cfg, **extra}, indent=2) + "\n")
        for f in copied:
            shutil.copy2(base.path / f, tmp / f)
    files = [out / p.name for p in written]
    if not copied:
        warnings.warn(f"base model {base.path} has no tokenizer files; {out} will have none", stacklevel=2)

    stored = [state[f"h.{i}.moe.gate.weight"] for i in range(config.n_layer)]  # as written, after rounding to dtype
    pairs = identical_gate_pairs(stored)
    if pairs:
        warnings.warn(router_warning(pairs, config.n_layer, E, config.num_experts_per_tok), stacklevel=2)
    max_cos = []
    for g in stored:
        sim = gate_similarity(g) - 2 * torch.eye(E)
        max_cos.append(float(sim.max()))
    return MergeReport(out, config, recipe.gate_mode, files, pairs, max_cos)


# --- the command -----------------------------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "merge",
        help="build a phixtral MoE from phi-2 checkpoints with a mergekit MoE recipe",
        description="Build a phixtral MoE (phi-msft layout) from dense phi-2 checkpoints, following a mergekit MoE "
        "recipe (base_model, gate_mode hidden|cheap_embed|random, dtype, experts with positive/negative prompts, "
        "experts_per_token).",
    )
    p.add_argument("recipe", help="the recipe YAML file")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace the checkpoint in a non-empty --out (whole, once the new one is complete)",
    )  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="seed of gate_mode random")
    p.add_argument("--device", default="cpu", help="where the base model runs for gate_mode hidden")
    p.add_argument("--max-shard-size", type=float_in(0, low_open=True), default=2.0, help="GiB per safetensors shard")
    add_threads_arg(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    apply_threads(args)
    recipe = load_recipe(args.recipe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = merge(
            recipe, args.out, overwrite=args.overwrite, seed=args.seed, device=args.device,
            max_shard_bytes=int(args.max_shard_size * 2**30),
        )  # fmt: skip
    for w in caught:
        bar = "!" * 100
        print(f"{bar}\nWARNING: {w.message}\n{bar}", file=sys.stderr)
    c = report.config
    print(
        f"wrote {report.out}: {c.num_local_experts} experts, top-{c.num_experts_per_tok}, {c.n_layer} layers, "
        f"n_embd {c.n_embd}, {c.torch_dtype}, gate_mode {report.gate_mode}, {len(report.files)} shard(s)"
    )
    print("largest cosine between two gate rows, per layer: " + " ".join(f"{x:.4f}" for x in report.max_gate_cosine))
    return 0
