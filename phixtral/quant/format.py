"""What a quantization format is to the loader (phixtral/weights.py) and the writer (phixtral/checkpoint_writer.py):
one object per checkpoint holding the format's settings, and the hooks below. weights.py reaches formats through
phixtral.quant only; the writer is handed the format object.

The checkpoint map (phixtral.layouts.checkpoint_map) names float tensors; a format rewrites the entries of the Linears
it finds packed (`checkpoint_map`): either into the buffers of a packed module swapped into the model (`prepare`), or,
with `Target.stage` set, into a float weight that the loader fills from the collected tensors (`dequantize`). Loading
then runs, for a model built on the meta device and allocated on its device:
    prepare(model, packed)          swap in packed modules (meta device), set model.quantization
    before_load(model)              defaults for tensors a checkpoint may omit
    check_tensor(name, tensor, map) per tensor read, before it is copied
    dequantize(module, tensors, dt) per staged Linear, its float weight
    finish(model)                   after every tensor is in place
Writing (save_pretrained with model.quantization set) asks `save_map`, `checkpoint_tensor`, `file_dtype` and
`write_settings`.
"""

from pathlib import Path
from typing import ClassVar, Optional

import torch

from ..layouts import Target


class QuantFormat:
    """Base class of a format's settings object (a frozen dataclass in practice); registered by `method` with
    phixtral.quant.register_format. The defaults suit a format whose packed tensors all load straight into modules."""

    method: ClassVar[str]  # config.json's quantization_config.quant_method
    label: ClassVar[str]  # the format's name in messages ("GPTQ")
    settings_file: ClassVar[Optional[str]] = None  # a settings file of its own beside config.json, if it has one
    int_dtype_name: ClassVar[str] = "int32"  # what its "int" tensors must be, in messages

    # --- settings ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, where: str) -> "QuantFormat":
        """The settings in `d` (settings_file's or config.json's quantization_config); a ValueError naming `where`."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        """config.json's quantization_config (and settings_file's content)."""
        raise NotImplementedError

    def agrees(self, other: "QuantFormat") -> bool:
        """Whether two settings read from different files describe the same tensors."""
        return self == other

    @classmethod
    def missing_settings_error(cls, mapping: dict, present: set) -> Optional[str]:
        """When no settings were found: a message if tensors of this format are present anyway, else None."""
        return None

    # --- reading ----------------------------------------------------------------------------------------------------
    def checkpoint_map(self, mapping: dict, present: set) -> tuple[dict, dict]:
        """(the map with the packed Linears' entries rewritten, {model module: (E, N, K)} for the modules that run
        packed). mapping: the float map; present: the tensor names in the files."""
        raise NotImplementedError

    def int_dtypes(self, name: str) -> tuple:
        """The safetensors dtypes a kind "int" tensor `name` may have."""
        return ("I32",)

    def prepare(self, model, packed: dict) -> None:
        """Put a packed module at each model module of `packed` ({name: (E, N, K)}), with model.set_submodule."""
        raise NotImplementedError

    def before_load(self, model) -> None:
        """Fill what a checkpoint may leave out (the model's tensors are allocated but uninitialized)."""

    def check_tensor(self, name: str, tensor: torch.Tensor, mapping: dict) -> None:
        """A ValueError naming `name` when a tensor read from the files holds values the format forbids."""

    def dequantize(self, module: str, tensors: dict, dtype: torch.dtype) -> torch.Tensor:
        """The float weight of staged checkpoint module `module` from its tensors ({suffix: tensor})."""
        raise NotImplementedError

    def finish(self, model) -> None:
        """After loading: anything the packed modules want done once their tensors are in place."""

    # --- writing ----------------------------------------------------------------------------------------------------
    def save_map(self, mapping: dict, state: dict) -> dict:
        """The checkpoint map to write a model state holding packed modules (`mapping` the float map). Entries the
        format derives when the state lacks them are `optional`."""
        raise NotImplementedError

    def checkpoint_tensor(self, state: dict, name: str, target: Target) -> torch.Tensor:
        """The tensor to write under checkpoint `name` (state[target.param][target.index] unless derived)."""
        return state[target.param][target.index]

    def file_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype a float tensor `name` is written in, `dtype` being the checkpoint's."""
        return dtype

    def write_settings(self, folder: Path, config_dict: dict) -> None:
        """Write settings_file into `folder`, and quantization_config into the caller's config.json dict."""
        config_dict["quantization_config"] = self.to_dict()
