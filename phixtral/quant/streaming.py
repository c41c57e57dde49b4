"""`phixtral quantize`, streamed: a float checkpoint's files in, a GPTQ checkpoint's files out, the float model never
whole in memory.

    rtn   each Linear read one expert at a time (phixtral/checkpoint_reader.py), quantized a block of rows at a time
          (rtn.py) and packed; a layer's packed modules live until the writer has taken their tensors.
    gptq  layer by layer, as AutoGPTQ does with offloading: the calibration activations [n, S, D] are carried from layer
          to layer; each layer's float tensors are read from the files into a model whose other layers stay on the meta
          device, its four Linear stacks solved (gptq_solver.quantize_layer_gptq), its packed state written, then
          dropped. Peak: one layer's float weights, the activations, one expert's fc2 Hessian [F, F] (made when that
          expert is solved; the solver works in it) and the solver's temporaries.
The writer (checkpoint_writer.write_msft_files with `produce`) asks for the tensors in the checkpoint map's order, layer
after layer, so a layer is quantized when its first tensor is due and each shard is written as it fills, inside
phixtral.atomic's temporary folder. The tensors are those of the in-memory path (load in float32, quantize_model_rtn or
quantize_model_gptq, save_pretrained), bit for bit: the same packed modules, named by the same format hooks.
"""

import json
import time
from pathlib import Path
from typing import Optional

import torch

from ..atomic import atomic_folder
from ..checkpoint_reader import CheckpointReader
from ..checkpoint_writer import check_checkpoint_destination, checkpoint_dtype, write_msft_files
from ..model import Phixtral
from ..weights import eos_token_ids, inspect_quantized, load_tokenizer, read_config, release_freed_memory
from .gptq_format import GPTQConfig
from .gptq_solver import calibration_inputs, quantize_layer_gptq
from .on_load import packed_modules
from .rtn import packed_module, quantize_linear, stack_experts

METHODS = ("rtn", "gptq")


def quantize_checkpoint(
    source,
    out,
    gptq: GPTQConfig,
    *,
    method: str = "rtn",
    windows: Optional[torch.Tensor] = None,
    device="cpu",
    overwrite: bool = False,
    report: Optional[dict] = None,
    report_file: Optional[str] = None,
    batch_size: int = 8,
    max_shard_bytes: int = 4 * 2**30,
    progress: bool = True,
) -> dict:
    """Quantize the float checkpoint folder `source` into a GPTQ checkpoint at `out` (written atomically, never over
    `source`), computing on `device`. Returns {model module: GPTQ's error} (empty for RTN).

    method: "rtn", or "gptq" calibrated on token windows [n, S] (`windows`).
    Float tensors (embedding, LayerNorms, router, lm_head, biases) are written in config.json's torch_dtype (float16
    when it names none); the tokenizer files and the end-of-sequence ids go along. report: a dict written as
    `report_file` beside the checkpoint, with "errors" (GPTQ) and "seconds" added."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gptq" and windows is None:
        raise ValueError("gptq needs calibration windows")
    start = time.perf_counter()
    source, device = Path(source), torch.device(device)
    config = read_config(source)
    inspected = inspect_quantized(source, config)
    if inspected[4]:
        raise ValueError(f"{source} is already quantized ({getattr(inspected[3], 'bits', '?')} bits)")
    packed = packed_modules(config, gptq)
    with torch.device("meta"):
        work = Phixtral(config, backend="torch")  # float32; GPTQ materializes one layer of it at a time
        described = Phixtral(config, backend="torch")
        gptq.prepare(described, packed)
    state = described.state_dict()  # meta tensors: the names, shapes and dtypes the writer plans the shards with
    tokenizer = load_tokenizer(source)
    eos = eos_token_ids(source, config, tokenizer)
    check_checkpoint_destination(out, overwrite=overwrite, sources=[source])
    from tqdm.auto import tqdm

    losses = {}
    with (
        CheckpointReader(source, config, inspected=inspected, device=device) as reader,
        tqdm(total=len(packed), desc=method, unit="linear", disable=not progress) as bar,
    ):
        if method == "rtn":
            layers = _Layers(lambda i: _rtn_layer(reader, i, packed, gptq, device, bar))
        else:
            solver = _GPTQ(reader, work, gptq, windows, device, batch_size, bar, losses)
            layers = _Layers(solver.layer)

        def produce(name: str, target) -> torch.Tensor:
            module, _, _ = target.param.rpartition(".")
            if module not in packed:
                return reader.read(target.param, target.index, target.shape)
            return gptq.checkpoint_tensor(layers.state(int(module.split(".")[1])), name, target)

        with atomic_folder(out, overwrite=overwrite, sources=[source]) as tmp:
            dtype = checkpoint_dtype(config.torch_dtype or "float16")
            write_msft_files(tmp, state, config, dtype=dtype, max_shard_bytes=max_shard_bytes, quantization=gptq,
                             produce=produce)  # fmt: skip
            layers.release()
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if set(eos) - set(eos_token_ids(tmp, config, tokenizer)):
                (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}) + "\n")
            if report is not None:
                if method == "gptq":
                    report["errors"] = losses
                report["seconds"] = time.perf_counter() - start
                (tmp / report_file).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    release_freed_memory()
    return losses


class _Layers:
    """The packed state of one layer at a time ({model tensor name: tensor}), made by make(i) when the writer first
    asks for layer i, the previous layer's dropped first."""

    def __init__(self, make):
        self.make, self.layer, self._state = make, None, {}

    def state(self, i: int) -> dict:
        if i != self.layer:
            if self.layer is not None and i < self.layer:
                raise RuntimeError(f"layer {i} asked for after layer {self.layer}: the writer goes in layer order")
            self.release()
            self._state, self.layer = self.make(i), i
        return self._state

    def release(self) -> None:
        self._state = {}


def _rtn_layer(reader: CheckpointReader, i: int, packed: dict, gptq: GPTQConfig, device, bar) -> dict:
    """Layer i's packed modules, each expert's weight read, quantized and dropped in turn."""
    state = {}
    for name, (E, N, K) in packed.items():
        if not name.startswith(f"h.{i}."):
            continue
        stacked = name.endswith((".moe.fc1", ".moe.fc2"))  # [E, N, K] stacks; the dense Linears are [N, K]
        parts = [
            quantize_linear(reader.read(name + ".weight", (e,) if stacked else (), (N, K)), gptq) for e in range(E)
        ]
        bias = reader.read(name + ".bias", (), (E, N) if stacked else (N,)).view(E, N)
        module = packed_module(name, stack_experts(parts), bias, device=device, dtype=torch.float32)
        del parts, bias  # before the next Linear's weights are read
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
        bar.update(1)
    return state


class _GPTQ:
    """GPTQ one layer at a time on a meta-device model: a layer's float tensors are read in, solved, and its state (the
    packed modules, then the layer's float tensors) handed out; the calibration activations go on to the next layer."""

    def __init__(self, reader, work, gptq, windows, device, batch_size, bar, losses):
        self.reader, self.work, self.gptq, self.windows = reader, work, gptq, windows
        self.device, self.batch_size, self.bar, self.losses = device, batch_size, bar, losses
        self.x, self.next = None, 0

    def layer(self, i: int) -> dict:
        if i < self.next:
            raise RuntimeError(f"layer {i} was already solved and handed out")
        while self.next <= i:
            j, self.next = self.next, self.next + 1
            if self.x is None:  # the first layer's inputs: the embedding's rows, read once
                V, D = self.work.config.vocab_size, self.work.config.n_embd
                wte = self.reader.read("wte.weight", (), (V, D))
                self.x = calibration_inputs(wte.to(self.device), self.windows, batch_size=self.batch_size)
                del wte
            block = self.work.h[j].to_empty(device=self.device)
            for name, p in block.named_parameters():
                self.reader.read(f"h.{j}.{name}", (), tuple(p.shape), out=p.data)
            self.losses.update(quantize_layer_gptq(self.work, j, self.x, self.gptq, batch_size=self.batch_size,
                                                   bar=self.bar))  # fmt: skip
            state = {f"h.{j}.{k}": v for k, v in self.work.h[j].state_dict().items()}
            self.work.h[j].to_empty(device="meta")  # the state holds the tensors until the writer has them
            release_freed_memory()  # the freed temporaries back to the OS, or the next layer peaks on top of them
        return state
