"""A checkpoint's float tensors read on demand under the model's names, without building the model.

`CheckpointReader.read("h.3.moe.fc1.weight", (2,))` is what `load_weights` would copy into expert 2's slice of that
parameter: the tensor of the checkpoint's map entry for it (phixtral/layouts.py), rows gathered where a layout splits
one parameter (HF's q_proj, k_proj, v_proj rows of Wqkv), a format's packed Linear dequantized where it loads as a
float weight (`Target.stage`), zeros where the layout has nothing (a dense checkpoint's router, which load_weights
zeroes too). The files are memory-mapped (page cache, not the process's own memory) and only the tensors asked for are
read: `phixtral quantize` streams a checkpoint through this, one Linear or one layer at a time.
"""

from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch

from .weights import inspect_quantized, open_safetensors


class CheckpointReader:
    """Float tensors of the checkpoint in `folder` by model parameter; a context manager (the files stay open inside).

    inspected: `inspect_quantized`'s answer when the caller has it (names, shapes and dtypes are checked there).
    device: where tensors are read to (a CUDA device reads straight from the file to the GPU)."""

    def __init__(self, folder: Path, config, *, inspected=None, device="cpu"):
        self.folder = Path(folder)
        self.files, self.layout, self.mapping, self.fmt, _ = inspected or inspect_quantized(self.folder, config)
        self.device = torch.device(device)
        self.sources = {}  # model parameter -> [(checkpoint name, Target)]
        for name, target in self.mapping.items():
            self.sources.setdefault(target.param, []).append((name, target))
        self._stack = ExitStack()
        self._open = {}  # file -> its safe_open handle, opened when first read
        self._owner = {}  # checkpoint name -> file
        for file in self.files:
            with open_safetensors(file) as f:
                self._owner.update(dict.fromkeys(f.keys(), file))

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def tensor(self, name: str) -> torch.Tensor:
        """One checkpoint tensor as stored (dtype and shape of the file), on the reader's device."""
        file = self._owner[name]
        if file not in self._open:
            read_device = str(self.device) if self.device.type == "cuda" else "cpu"
            self._open[file] = self._stack.enter_context(open_safetensors(file, device=read_device))
        try:
            return self._open[file].get_tensor(name)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def read(self, param: str, index: tuple = (), shape=None, dtype: torch.dtype = torch.float32,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        """The model's param[index] (shape `shape`) in `dtype`, as load_weights would fill it from this checkpoint.

        Every checkpoint tensor whose target lies inside param[index] is copied into its place; staged ones (packed
        Linears that load as float weights) are dequantized by the format. Parts the checkpoint lacks are zero.
        out: a tensor to fill instead (its shape and dtype), e.g. the parameter itself: no second copy is made."""
        if out is None:
            out = torch.zeros(shape, dtype=dtype, device=self.device)
        else:
            dtype = out.dtype
            out.zero_()
        staged = {}  # checkpoint module -> (its Target, {suffix: tensor})
        for name, target in self.sources.get(param, ()):
            if target.index[: len(index)] != tuple(index):
                continue
            if target.stage is not None:
                staged.setdefault(target.stage, (target, {}))[1][name.rsplit(".", 1)[1]] = self.tensor(name)
                continue
            out[target.index[len(index) :]] = self.tensor(name)  # casts to dtype on the way
        for module, (target, tensors) in staged.items():
            out[target.index[len(index) :]] = self.fmt.dequantize(module, tensors, dtype)
        return out
