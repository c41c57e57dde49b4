"""Model state -> a phi-msft checkpoint folder: the dtype to write, the destination check, sharded safetensors files
with their index and config.json, written atomically.

The writer is the loader's map read backwards (phixtral/layouts.py); quantization formats name and write their own
tensors through the hooks of their format object (phixtral.quant). Nothing here imports the model, so that the model's
save_pretrained and the merge command can both use it.

Shards are written tensor by tensor (`write_safetensors`: the header first, from shapes and dtypes, then each tensor's
bytes as it comes), so a save holds one tensor's file copy at a time, never a shard's; with `produce`, the tensors
themselves are made only when their turn comes (`phixtral quantize` streams its output that way).
"""

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch

from .atomic import atomic_folder, check_destination
from .config import PhixtralConfig
from .layouts import INDEX_FILE, checkpoint_map

# The dtype names a user may pass, to save and to load (phixtral.weights.resolve_dtype reads them too).
_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}  # fmt: skip
_SAVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _name_list(names, limit=20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def checkpoint_dtype(dtype) -> Optional[torch.dtype]:
    """The dtype to write a checkpoint in: None (keep the model's), torch.float16 / bfloat16 / float32 or one of their
    names ("float16", "fp16", "bf16", ...). Anything else is a ValueError naming `dtype`."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in _SAVE_DTYPES:
        return dtype
    raise ValueError(
        f"dtype must be None, torch.float16, torch.bfloat16, torch.float32 or one of {sorted(_DTYPES)}; got {dtype!r}"
    )


def check_checkpoint_destination(folder, *, overwrite: bool, sources=()) -> Path:
    """`folder` resolved if a checkpoint may be written there, else one ValueError naming it (nothing is written).

    A missing or empty folder is always fine. With `overwrite`, an existing folder is replaced whole, so it must look
    like a checkpoint: a config.json and no subfolders (a `.git`, a folder of runs, ... are never deleted).
    Without `overwrite` a non-empty folder is refused. `sources`: see `phixtral.atomic.check_destination`.
    """
    real = check_destination(folder, overwrite=overwrite, sources=sources)
    if real.is_dir() and any(real.iterdir()):
        sub = sorted(p.name for p in real.iterdir() if p.is_dir())
        if sub or not (real / "config.json").is_file():
            why = f"it holds the subfolder {sub[0]!r}" if sub else "it has no config.json"
            raise ValueError(
                f"{folder} is not empty and does not look like a checkpoint folder ({why}); refusing to replace it: "
                "choose a new or empty folder"
            )
    return real


def write_msft_files(
    folder: Path,
    state: Mapping[str, torch.Tensor],
    config: PhixtralConfig,
    *,
    dtype: Optional[torch.dtype] = None,
    max_shard_bytes: int = 4 * 2**30,
    quantization=None,
    produce: Optional[Callable] = None,
) -> list[Path]:
    """The files of `save_msft_checkpoint`, written straight into an existing folder (the temporary one of
    `atomic_folder`): shards, index and config.json. Returns the shard paths.

    quantization: the format (phixtral.quant, e.g. a GPTQConfig; `Phixtral.quantization`) when `state` holds packed
    modules: the format names their tensors and writes its settings. GPTQ writes AutoGPTQ's v1 layout (int32 tensors as
    they are, scales in fp16, biases in `dtype`), with quantize_config.json and config.json's quantization_config.
    produce: (checkpoint name, Target) -> the tensor to write, called once per tensor in the order the shards are
    written (the map's order); `state` then only describes the tensors (meta tensors do) and `dtype` is required."""
    folder = Path(folder)
    mapping = checkpoint_map(config, "phi-msft-moe" if config.is_moe else "phi-msft-dense")
    if quantization is not None:
        mapping = quantization.save_map(mapping, state)
    needed = {t.param for t in mapping.values() if not t.optional}  # the format derives the optional ones
    missing = needed - state.keys()
    if missing:
        raise ValueError(f"state lacks tensors the phi-msft layout needs: {_name_list(missing)}")
    dtype = checkpoint_dtype(dtype) or state["wte.weight"].dtype

    def tensor(name):
        t = mapping[name]
        return state[t.param][t.index] if quantization is None else quantization.checkpoint_tensor(state, name, t)

    def data(name):
        return tensor(name) if produce is None else produce(name, mapping[name])

    def file_dtype(name):
        return dtype if quantization is None else quantization.file_dtype(name, dtype)

    # Group by size first (no data read), so that file names can carry the shard count.
    shards, size, specs = [[]], 0, {}
    for name in mapping:
        t = tensor(name)
        specs[name] = (tuple(t.shape), file_dtype(name) if t.is_floating_point() else t.dtype)
        nbytes = t.numel() * specs[name][1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map, total, paths = {}, 0, []
    for i, names in enumerate(shards, 1):
        path = folder / f"model-{i:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(path, [(name, *specs[name]) for name in names], data, metadata={"format": "pt"})
        weight_map.update({name: path.name for name in names})
        paths.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config_dict = config.to_msft_dict()
    config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    if quantization is not None:
        quantization.write_settings(folder, config_dict)
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    return paths


# safetensors' dtype names.
_FILE_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(path: Path, specs: Iterable[tuple], data: Callable, *, metadata: Optional[dict] = None) -> int:
    """Write one safetensors file tensor by tensor: the header from `specs` [(name, shape, dtype)], then each tensor's
    bytes from data(name), cast to its dtype (floats; other dtypes must match), one tensor in memory at a time.
    Returns the bytes of tensor data written. An OSError names the file (a full disk, ...)."""
    specs = list(specs)
    header, offset = {"__metadata__": dict(metadata)} if metadata else {}, 0
    for name, shape, dtype in specs:
        if dtype not in _FILE_DTYPES:
            raise ValueError(f"{name}: dtype {dtype} cannot be written to a safetensors file")
        end = offset + dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _FILE_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    try:
        with open(path, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name, shape, dtype in specs:
                t = data(name)
                if tuple(t.shape) != tuple(shape) or (not t.is_floating_point() and t.dtype != dtype):
                    raise ValueError(f"{name}: expected {dtype} {tuple(shape)}, got {t.dtype} {tuple(t.shape)}")
                f.write(_file_tensor(t, dtype).reshape(-1).view(torch.uint8).numpy().data)
                del t
    except OSError as e:
        raise OSError(f"writing {Path(path).name}: {e}") from e
    return offset


def _file_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor to write: floats in `dtype`, a format's packed words and indices as they are."""
    return t.detach().to(device="cpu", dtype=dtype if t.is_floating_point() else t.dtype).contiguous()


def save_msft_checkpoint(
    folder,
    state: Mapping[str, torch.Tensor],
    config: PhixtralConfig,
    *,
    dtype=None,
    max_shard_bytes: int = 4 * 2**30,
    overwrite: bool = True,
) -> list[Path]:
    """Write a model state in the phi-msft layout (what phixtral ships and what the merge tool produces).

    state: tensors under the model's own names (`Phixtral.state_dict()`), experts stacked.
    dtype: None (the state's), torch.float16 / bfloat16 / float32 or their names ("float16", "bf16", ...).
    Writes model-0000i-of-0000n.safetensors (shards of at most max_shard_bytes, tensors whole),
    model.safetensors.index.json and config.json (`config.to_msft_dict()`); MoE layout when config has more than one
    expert, dense otherwise.
    The files go to a temporary folder next to `folder` that replaces it whole once complete (`phixtral.atomic`): a
    failure leaves `folder` as it was, and no file of an earlier checkpoint there survives a successful save.
    overwrite: replace an existing checkpoint folder (see `check_checkpoint_destination`), else refuse a non-empty one.
    Returns the shard paths.
    """
    dtype = checkpoint_dtype(dtype)
    check_checkpoint_destination(folder, overwrite=overwrite)
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        written = write_msft_files(tmp, state, config, dtype=dtype, max_shard_bytes=max_shard_bytes)
    return [Path(folder) / p.name for p in written]
