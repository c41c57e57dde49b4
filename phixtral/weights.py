"""Checkpoint folders -> Phixtral: hub resolution, checking the files, tensor-by-tensor loading.

The key layouts and the map from checkpoint names to model tensors are in phixtral/layouts.py (detected from the tensor
names, then checked against config.json); the same map, read backwards, writes the phi-msft files
(phixtral/checkpoint_writer.py, whose names stay importable from here).

Loading builds the model on the meta device, allocates it once on the target device in the target dtype, then copies
tensor by tensor out of the memory-mapped safetensors files: peak host memory stays near one copy of the model.
Quantized checkpoints load the same way, into packed modules where a Linear is quantized: this file asks
phixtral.quant which format a folder holds and leaves the format's tensors to the format object's hooks.
"""

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from . import quant
from .atomic import missing_folder_hint
from .checkpoint_writer import (  # noqa: F401  (importable from here, their former home)
    _DTYPES,
    _name_list,
    check_checkpoint_destination,
    checkpoint_dtype,
    save_msft_checkpoint,
    write_msft_files,
)
from .config import PhixtralConfig
from .layouts import (
    IGNORED_SUFFIXES,
    INDEX_FILE,
    LAYOUTS,  # noqa: F401  (importable from here, its former home)
    Target,
    checkpoint_map,
    detect_layout,
    read_json,
)
from .model import Phixtral
from .runtime import RuntimeSettings, check_backend_device

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "vocab.json", "merges.txt", "*.model", "*.txt"]
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# Loads above this size show a progress bar (a few hundred MB take about a second from a warm page cache).
_PROGRESS_MIN_BYTES = 256 * 2**20


def default_model_path() -> Path:
    """The model `phixtral generate` uses without --model: the tiny phixtral bundled in phixtral/assets."""
    return Path(__file__).resolve().parent / "assets" / "tiny-phixtral"


# --- reading files, with errors that name them ---------------------------------------------------------------------
@contextmanager
def open_safetensors(file: Path, device: str = "cpu"):
    """safetensors' safe_open; a truncated or corrupt file (on open or on a tensor read) is a ValueError naming it."""
    try:
        with safe_open(file, framework="pt", device=device) as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e


# --- finding the files ------------------------------------------------------------------------------------------------
def resolve_checkpoint(path_or_id: Union[str, os.PathLike]) -> Path:
    """A local checkpoint folder, or a hub id fetched with huggingface_hub (json, safetensors, tokenizer files only)."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"model must be a folder path or a hub id (str), got {type(path_or_id).__name__}")
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder (with config.json and *.safetensors)")
    hint = missing_folder_hint(path)
    if hint:  # a save killed between its renames (see phixtral.atomic)
        raise ValueError(f"no checkpoint folder {path}, but {hint}")
    name = str(path_or_id)
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.startswith((".", "-")):
        raise ValueError(f"no checkpoint folder {name!r}, and it is not a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, ...: one clear error naming the model and the cause
        raise RuntimeError(
            f"model {name!r}: no such local folder, and fetching it from the Hugging Face hub failed: "
            f"{type(e).__name__}: {e}"
        ) from e


def read_config(folder: Path, *, num_experts_per_tok: Optional[int] = None) -> PhixtralConfig:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.json")
    d = read_json(path)
    try:
        return PhixtralConfig.from_dict(d, num_experts_per_tok=num_experts_per_tok)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the ones its index names, else every *.safetensors in the folder."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        names = list(dict.fromkeys(weight_map.values()))
        outside = [f for f in names if not isinstance(f, str) or Path(f).name != f or f in ("", ".", "..")]
        if outside:  # an absolute path or ../ would read a file from outside the checkpoint folder
            raise ValueError(
                f"{index} names shards outside {folder} (only plain file names are allowed): {outside[:5]}"
            )
        files = [folder / f for f in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names shards that are not in {folder}: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = [p.name for p in folder.glob("*.bin")]
        hint = f" (found {other}: convert them to safetensors)" if other else ""
        raise ValueError(f"no *.safetensors files in {folder}{hint}")
    return files


def inspect_checkpoint(folder: Path, config: PhixtralConfig) -> tuple[list[Path], str, dict[str, Target]]:
    """Check names, shapes and dtypes from the file headers (no tensor is read): (files, layout, map) or one ValueError.
    Quantized checkpoints are checked too (their packed tensors are in the map): see `inspect_quantized`."""
    return inspect_quantized(folder, config)[:3]


def inspect_quantized(folder: Path, config: PhixtralConfig):
    """`inspect_checkpoint` plus the quantization: (files, layout, map, the format (phixtral.quant, e.g. a GPTQConfig)
    or None, {model module: (E, N, K)} for the modules that run packed)."""
    files = checkpoint_files(folder)
    shapes, dtypes, owner = {}, {}, {}
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                if name in owner:
                    raise ValueError(f"tensor {name!r} is in both {owner[name].name} and {file.name}")
                owner[name] = file
                s = f.get_slice(name)
                shapes[name], dtypes[name] = tuple(s.get_shape()), s.get_dtype()
    layout = detect_layout(shapes)
    if layout != "phi-msft-moe" and config.num_local_experts > 1:
        raise ValueError(
            f"config.json describes {config.num_local_experts} experts but the tensors in {folder} are a dense model "
            f"({layout} layout, no 'moe.' names)"
        )
    fmt = quant.read_quantization_config(folder)
    mapping, packed = quant.packed_map(checkpoint_map(config, layout), set(shapes), fmt)
    present = {n for n in shapes if not n.endswith(IGNORED_SUFFIXES)}
    missing = {n for n, t in mapping.items() if not t.optional} - present
    unexpected = present - mapping.keys()
    known = sorted(present & mapping.keys())
    wrong = [f"{n}: expected {mapping[n].shape}, got {shapes[n]}" for n in known if shapes[n] != mapping[n].shape]
    bad_dtype = [f"{n}: {dtypes[n]}" for n in known if mapping[n].kind == "float" and dtypes[n] not in _FLOAT_DTYPES]
    bad_int = [f"{n}: {dtypes[n]}" for n in known if mapping[n].kind == "int" and dtypes[n] not in fmt.int_dtypes(n)]
    if missing or unexpected or wrong or bad_dtype or bad_int:
        lines = [
            f"checkpoint {folder} does not match its config.json ({layout} layout, {config.n_layer} layers, "
            f"{config.num_local_experts} expert(s), n_embd {config.n_embd}, vocab {config.vocab_size}):"
        ]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {_name_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {_name_list(unexpected)}")
        if wrong:
            lines.append(f"  mis-shaped tensors ({len(wrong)}): " + "; ".join(wrong[:20]))
        if bad_dtype:
            hint = "" if fmt is not None else quant.missing_settings_hint()
            lines.append(f"  non-float tensors ({len(bad_dtype)}){hint}: " + "; ".join(bad_dtype[:20]))
        if bad_int:
            words = f"{fmt.label} tensors that are not {fmt.int_dtype_name}"
            lines.append(f"  {words} ({len(bad_int)}): " + "; ".join(bad_int[:20]))
        raise ValueError("\n".join(lines))
    return files, layout, mapping, fmt, packed


# --- loading -------------------------------------------------------------------------------------------------------
def resolve_device(device) -> torch.device:
    """None -> cuda when available, else cpu. RuntimeError for a device this machine does not have."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from e
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {device!r} requested but CUDA is not available (torch.cuda.is_available() is False)"
            )
        index = torch.cuda.current_device() if d.index is None else d.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device("cuda", index)
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {device!r} requested but MPS is not available")
    if d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or mps")
    return d


def resolve_dtype(dtype, device: torch.device, config: PhixtralConfig) -> torch.dtype:
    """None -> float32 on the CPU, the checkpoint's dtype elsewhere. Strings like "fp16" / "bfloat16" are accepted."""
    if dtype is None:
        if device.type == "cpu" or config.torch_dtype is None:
            return torch.float32
        dtype = config.torch_dtype
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported: use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a string, got {type(dtype).__name__}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype {dtype} is not supported: use float16, bfloat16 or float32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support: use dtype float16")
    return dtype


def prepare_quantized(model: Phixtral, packed: dict, fmt) -> None:
    """Swap in the format's packed module at each model module of `packed` ({name: (E, N, K)}), before allocation."""
    fmt.prepare(model, packed)


def load_weights(model: Phixtral, folder: Path, *, progress: Optional[bool] = None, inspected=None,
                 quantize=None) -> str:  # fmt: skip
    """Fill every parameter of `model` from the checkpoint in `folder`, tensor by tensor; returns the layout.

    Raises a ValueError listing the missing, unexpected or mis-shaped tensors before anything is read.
    Quantized checkpoints: `model` must already hold the packed modules (`prepare_quantized`); the format checks each
    of its tensors as it is read (GPTQ: a g_idx outside [0, G) is a ValueError naming it), dequantizes the Linears that
    load as float weights, and finishes the packed modules once all is read (see phixtral/quant/format.py).
    inspected: `inspect_quantized`'s answer, when the caller already has it.
    quantize: a float checkpoint quantized as it is read (a GPTQConfig; `model` prepared by
    phixtral.quant.prepare_on_load): each packed module's weight is quantized on the model's device and freed.
    """
    from tqdm.auto import tqdm

    files, layout, mapping, fmt, _ = inspected or inspect_quantized(folder, model.config)
    quantizer = None
    if quantize is not None:
        fmt = quantize
        quantizer = quant.OnLoadQuantizer(model, quantize, quant.packed_modules(model.config, quantize))
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    if fmt is not None:
        fmt.before_load(model)
    staged = {}  # checkpoint module -> (its Target, {suffix: tensor}): packed Linears that load as float weights
    device = model.device
    read_device = str(device) if device.type == "cuda" else "cpu"  # CUDA: straight from the file to the GPU
    total = sum(f.stat().st_size for f in files)
    show = total >= _PROGRESS_MIN_BYTES if progress is None else progress
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not show) as bar:
        for file in files:
            with open_safetensors(file, device=read_device) as f:
                for name in f.keys():
                    target = mapping.get(name)
                    if target is None:  # an ignored buffer
                        continue
                    tensor = f.get_tensor(name)
                    bar.update(tensor.numel() * tensor.element_size())
                    if target.stage is not None:
                        staged.setdefault(target.stage, (target, {}))[1][name.rsplit(".", 1)[1]] = tensor
                        continue
                    if quantizer is not None and quantizer.add(target, tensor):
                        del tensor  # quantized into its packed module: the float weight goes now
                        continue
                    if fmt is not None:
                        try:
                            fmt.check_tensor(name, tensor, mapping)
                        except ValueError as e:
                            raise ValueError(f"{file}: {e}") from None
                    params[target.param].data[target.index].copy_(tensor)  # casts to the model's dtype on the way
                    del tensor
        for module, (target, tensors) in staged.items():
            try:
                weight = fmt.dequantize(module, tensors, model.dtype)
            except ValueError as e:
                raise ValueError(f"{folder}: {e}") from None
            params[target.param].data[target.index].copy_(weight)
        if quantizer is not None:
            quantizer.finish()
        if fmt is not None:
            fmt.finish(model)
        if layout != "phi-msft-moe":
            for block in model.h:  # one expert: its routing weight is softmax of one logit = 1 whatever the gate holds
                block.moe.gate.weight.zero_()
    return layout


def release_freed_memory() -> None:
    """Hand the free pages of the C heap back to the OS (glibc's malloc_trim; nothing elsewhere).

    A load frees one tensor per checkpoint tensor read, and the packing's temporaries; glibc keeps such chunks for
    reuse and the OS goes on counting them as the process's own: after loading a 330 MB int4 checkpoint on the CPU,
    0 to 650 MB more from one run to the next (thread timing decides which heap they land in)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return
    if trim is not None:
        trim(0)


def load_tokenizer(folder: Path):
    """transformers' AutoTokenizer from the checkpoint folder, or None when the folder ships no tokenizer files."""
    folder = Path(folder)
    if not any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    # AutoTokenizer warns that it does not know model_type 'phi-msft'; it does not need to.
    hf_logging.set_verbosity_error()
    try:
        # Never run code shipped with a checkpoint: phixtral's config.json carries an auto_map for its remote modeling
        # code.
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise RuntimeError(f"could not load the tokenizer in {folder}: {type(e).__name__}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)


def eos_token_ids(folder: Path, config: PhixtralConfig, tokenizer) -> list[int]:
    """Every end-of-sequence id the checkpoint declares: tokenizer, config.json and generation_config.json together."""
    ids = []

    def add(value):
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v not in ids:
                ids.append(v)

    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    add(config.eos_token_id)
    gen = Path(folder) / "generation_config.json"
    if gen.is_file():
        add(read_json(gen).get("eos_token_id"))
    return ids


def from_pretrained(
    path_or_id=None,
    *,
    device=None,
    dtype=None,
    backend: str = "auto",
    num_experts_per_tok: Optional[int] = None,
    progress: Optional[bool] = None,
    quantize=None,
) -> Phixtral:
    """Load a phixtral / phi-2 checkpoint (local folder or hub id) into an eval-mode Phixtral with its tokenizer.

    path_or_id: a checkpoint folder or a hub id; None (or no argument) loads the tiny phixtral bundled with the package
        (`default_model_path()`).
    device: None (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ...
    dtype: None (float32 on the CPU, the checkpoint's dtype elsewhere), torch.float16 / "fp16", bfloat16, float32.
        GPTQ checkpoints (found by themselves, see phixtral/quant/) keep their packed weights; dtype is that of the
        activations, scales and everything not packed. On the CPU their default is bfloat16, the one activation dtype
        that torch's packed int8 / int4 kernels run fast on (repacked here, at load); float32 computes everything in
        fp32 from the dequantized weights instead: exact, and slower than the float checkpoint.
    backend: the MoE implementation, "auto", "triton", "torch" or "naive" (see phixtral_kernels.fused_moe).
    num_experts_per_tok: override the checkpoint's top_k (1..num_local_experts).
    progress: show a tqdm bar (None: only for loads of a few hundred MB and more).
    quantize: quantize a float checkpoint as it is read: "int4" or "int8" (group size 128, symmetric), options after
        commas ("int4,group_size=64,sym=false"), a dict {"bits", "group_size", "sym"} or a GPTQConfig. Round-to-nearest,
        tensor by tensor on `device`, so the float model never exists whole; the result equals what
        `phixtral quantize --method rtn` writes with the same settings, and runs like a GPTQ checkpoint (see dtype).
    """
    runtime = RuntimeSettings(backend=backend)  # the one check of the value, before any file is read
    spec = quant.quantize_spec(quantize) if quantize is not None else None
    folder = resolve_checkpoint(default_model_path() if path_or_id is None else path_or_id)
    config = read_config(folder, num_experts_per_tok=num_experts_per_tok)
    device = resolve_device(device)
    check_backend_device(backend, device)
    inspected = inspect_quantized(folder, config)
    fmt, packed = inspected[3:]
    if spec is not None:
        if fmt is not None:
            raise ValueError(f"{folder} is already quantized ({fmt.label}): load it without quantize")
        fmt, packed = spec, quant.packed_modules(config, spec)
    if dtype is None and device.type == "cpu" and packed:
        dtype = (
            torch.bfloat16
        )  # torch's packed CPU kernels are fast with bf16 activations only (phixtral_kernels.cpu_packed)
    dtype = resolve_dtype(dtype, device, config)
    with torch.device("meta"):
        model = Phixtral(config, runtime=runtime).to(dtype)
        if spec is not None:
            quant.prepare_on_load(model, spec, packed)
        elif fmt is not None:
            prepare_quantized(
                model, packed, fmt
            )  # in the model's dtype: after the cast, which would round GPTQ's scales
    model = model.to_empty(device=device)  # one allocation, in the target dtype, on the target device
    load_weights(model, folder, progress=progress, inspected=inspected, quantize=spec)
    model.eval().requires_grad_(False)
    model.pack_for_cpu()
    model.tokenizer = load_tokenizer(folder)
    model.eos_token_ids = eos_token_ids(folder, config, model.tokenizer)
    model.source, model.source_dtype = folder.resolve(), stored_float_dtype(inspected[0])
    release_freed_memory()
    return model


_STORED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float32}


def stored_float_dtype(files: list[Path]) -> Optional[torch.dtype]:
    """The float dtype most of the checkpoint's float tensors are stored in (read from the headers), or None."""
    counts = {}
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                stored = f.get_slice(name).get_dtype()
                if stored in _STORED_DTYPES:
                    counts[_STORED_DTYPES[stored]] = counts.get(_STORED_DTYPES[stored], 0) + 1
    return max(counts, key=counts.get) if counts else None
