"""The formats phixtral reads and writes, by quant_method, and the format-neutral questions the loader asks: which
format a checkpoint folder holds, and how its checkpoint map changes."""

from pathlib import Path
from typing import Optional

from ..layouts import read_json
from .format import QuantFormat

FORMATS: dict[str, type] = {}  # quant_method -> QuantFormat subclass
# The method of a quantization_config that names none (AutoGPTQ's older configs).
DEFAULT_METHOD = "gptq"


def register_format(cls: type) -> type:
    """Add a QuantFormat subclass under its `method` (usable as a class decorator); a second one for a method replaces
    the first. Its settings are then found in checkpoint folders and written with the models that carry them."""
    if not (isinstance(cls, type) and issubclass(cls, QuantFormat)) or not isinstance(
        getattr(cls, "method", None), str
    ):
        raise TypeError(f"a format is a QuantFormat subclass with a `method` name, got {cls!r}")
    FORMATS[cls.method] = cls
    return cls


def unregister_format(method: str) -> None:
    """Remove the format registered under `method` (a KeyError when there is none)."""
    del FORMATS[method]


def format_for(d: dict, where: str) -> type:
    """The registered format of a quantization settings dict (its quant_method), or a ValueError naming `where`."""
    method = d.get("quant_method", DEFAULT_METHOD)
    cls = FORMATS.get(method) if isinstance(method, str) else None
    if cls is None:
        known = ", ".join(repr(m) for m in FORMATS)
        raise ValueError(f"{where}: quant_method {method!r} is not supported (only {known})")
    return cls


def read_quantization_config(folder) -> Optional[QuantFormat]:
    """The checkpoint's quantization settings (a format object, e.g. a GPTQConfig), or None for a float checkpoint.

    Read from each format's own settings file (GPTQ: quantize_config.json) and from config.json's quantization_config;
    where several exist they must agree. The settings file wins when both exist."""
    folder = Path(folder)
    found = []  # (settings, where they came from)
    for cls in FORMATS.values():
        path = folder / cls.settings_file if cls.settings_file else None
        if path is not None and path.is_file():
            found.append((cls.from_dict(read_json(path), str(path)), str(path)))
    config_path = folder / "config.json"
    if config_path.is_file():
        q = read_json(config_path).get("quantization_config")
        if q is not None:
            if not isinstance(q, dict):
                raise ValueError(f"{config_path}: quantization_config must be an object, got {type(q).__name__}")
            where = f"{config_path} quantization_config"
            found.append((format_for(q, where).from_dict(q, where), f"{config_path}'s quantization_config"))
    for other, other_where in found[1:]:
        first, first_where = found[0]
        if not first.agrees(other):
            raise ValueError(f"{first_where} and {other_where} disagree: {first} vs {other}")
    return found[0][0] if found else None


def packed_map(mapping: dict, present: set, fmt: Optional[QuantFormat]) -> tuple[dict, dict]:
    """(the checkpoint map of a checkpoint whose files hold the tensor names `present`, {model module: (E, N, K)} that
    run packed). mapping: the float map (phixtral.layouts.checkpoint_map). Without settings (fmt None) packed tensors of
    any registered format are a ValueError saying which settings are missing."""
    if fmt is not None:
        return fmt.checkpoint_map(mapping, present)
    for cls in FORMATS.values():
        error = cls.missing_settings_error(mapping, present)
        if error:
            raise ValueError(error)
    return mapping, {}


def missing_settings_hint() -> str:
    """What a checkpoint whose tensors are not float may lack, for the loader's error (" (a GPTQ checkpoint also needs
    its quantize_config.json)")."""
    needs = [
        f"a {cls.label} checkpoint also needs its {cls.settings_file}" for cls in FORMATS.values() if cls.settings_file
    ]
    return f" ({'; '.join(needs)})" if needs else ""
