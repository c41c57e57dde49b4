"""`phixtral quantize` streams: the files equal those of the in-memory path (load in float32, quantize in place,
save_pretrained) bit for bit, one float weight (RTN) or one layer (GPTQ) is held at a time, and shards are written as
they fill."""

import weakref

import pytest
import torch
from helpers_models import hf_phi_checkpoint, msft_moe_checkpoint, read_tensors

import phixtral
from phixtral import checkpoint_reader, checkpoint_writer
from phixtral.cli import main
from phixtral.commands.quantize import calibration_windows
from phixtral.quant import GPTQConfig, quantize_model_gptq, quantize_model_rtn, streaming

CALIB = ["--calib-samples", "8", "--calib-seq-len", "32"]


def _command(source, out, *args) -> None:
    assert main(["quantize", "--model", str(source), "--out", str(out), "--no-progress", *args]) == 0


def _in_memory(source, out, gptq: GPTQConfig, windows=None) -> dict:
    model = phixtral.from_pretrained(source, device="cpu", dtype="float32", backend="torch")
    losses = {}
    if windows is None:
        quantize_model_rtn(model, gptq)
    else:
        losses = quantize_model_gptq(model, gptq, windows, progress=False)
    model.save_pretrained(out, dtype=model.config.torch_dtype or "float16")
    return losses


def assert_same_files(a, b) -> None:
    ta, tb = read_tensors(a), read_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    for f in ("config.json", "quantize_config.json", "model.safetensors.index.json", "tokenizer.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize(
    "make,bits,sym", [(msft_moe_checkpoint, 4, False), (hf_phi_checkpoint, 8, True)], ids=["msft-int4-asym", "hf-int8"]
)
def test_rtn_files_equal_the_in_memory_path(tmp_path, make, bits, sym):
    _command(make(), tmp_path / "stream", "--bits", str(bits), "--group-size", "32", "--sym" if sym else "--no-sym")
    _in_memory(make(), tmp_path / "memory", GPTQConfig(bits=bits, group_size=32, sym=sym))
    assert_same_files(tmp_path / "stream", tmp_path / "memory")


def test_gptq_files_and_errors_equal_the_in_memory_path(tmp_path):
    import json

    source = msft_moe_checkpoint()
    _command(source, tmp_path / "stream", "--bits", "4", "--group-size", "32", "--method", "gptq", "--act-order",
             "--no-sym", *CALIB)  # fmt: skip
    tokenizer = phixtral.weights.load_tokenizer(source)
    windows = calibration_windows(tokenizer, "stdlib", samples=8, seq_len=32, seed=0)
    gptq = GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False)
    losses = _in_memory(source, tmp_path / "memory", gptq, windows)
    assert_same_files(tmp_path / "stream", tmp_path / "memory")
    assert json.loads((tmp_path / "stream" / "quantize_report.json").read_text())["errors"] == losses


def test_rtn_holds_one_float_weight_at_a_time(tmp_path, monkeypatch):
    """Every tensor read from the source is gone when the next one is read: no float copy of the model builds up."""
    alive, most = [], []
    real_read = checkpoint_reader.CheckpointReader.read

    def read(self, *args, **kwargs):
        most.append(sum(r() is not None for r in alive))
        t = real_read(self, *args, **kwargs)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(checkpoint_reader.CheckpointReader, "read", read)
    _command(msft_moe_checkpoint(), tmp_path / "q", "--bits", "8", "--group-size", "32")
    assert len(most) == 39 and max(most) == 0  # wte, 2 x 17 per layer, lm_head's 4


def test_gptq_holds_one_layer_and_writes_shards_as_they_fill(tmp_path, monkeypatch):
    """Layers other than the one being solved stay on the meta device; with small shards, the first is on disk
    before the last layer is solved."""
    events = []
    real_solve, real_write = streaming.quantize_layer_gptq, checkpoint_writer.write_safetensors

    def solve(model, i, x, gptq, **kwargs):
        held = [j for j, block in enumerate(model.h) if not block.ln.weight.is_meta]
        assert held == [i], held
        events.append(f"layer {i}")
        return real_solve(model, i, x, gptq, **kwargs)

    def write(path, specs, data, metadata=None):
        events.append("shard")
        return real_write(path, specs, data, metadata=metadata)

    monkeypatch.setattr(streaming, "quantize_layer_gptq", solve)
    monkeypatch.setattr(checkpoint_writer, "write_safetensors", write)
    source = msft_moe_checkpoint(layers=3)
    windows = calibration_windows(phixtral.weights.load_tokenizer(source), "stdlib", samples=4, seq_len=16)
    gptq = GPTQConfig(bits=4, group_size=32)
    streaming.quantize_checkpoint(source, tmp_path / "q", gptq, method="gptq", windows=windows, progress=False,
                                  max_shard_bytes=100_000)  # fmt: skip
    assert [e for e in events if e.startswith("layer")] == ["layer 0", "layer 1", "layer 2"]
    assert events.index("shard") < events.index("layer 2") and events.count("shard") >= 3, events
    model = phixtral.from_pretrained(tmp_path / "q", device="cpu", dtype="float32", backend="torch")
    assert model.quantization == gptq and torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_gptq_holds_one_expert_hessian_of_fc2_at_a_time(tmp_path, monkeypatch):
    """fc2's Hessians ([F, F] per expert, the largest) are made one at a time, each when its expert is solved and gone
    before the next is made; the files still equal the in-memory path's (checked above)."""
    from phixtral.quant import gptq_solver

    made, alive_then = [], []
    real_init = gptq_solver._Hessians.__init__

    def init(self, E, K, device):
        real_init(self, E, K, device)
        if K == 4 * 64:  # fc2's input width: n_inner = 4 * n_embd
            alive_then.append(sum(r() is not None for r in made))
            made.append(weakref.ref(self.H))

    monkeypatch.setattr(gptq_solver._Hessians, "__init__", init)
    _command(msft_moe_checkpoint(), tmp_path / "q", "--bits", "4", "--group-size", "32", "--method", "gptq",
             "--act-order", *CALIB)  # fmt: skip
    assert len(made) == 2 * 4 and alive_then == [0] * 8  # 2 layers x 4 experts, none alive when the next is made


def test_an_already_quantized_source_is_refused(tmp_path, capsys):
    _command(msft_moe_checkpoint(), tmp_path / "q", "--bits", "8", "--group-size", "32")
    argv = ["quantize", "--model", str(tmp_path / "q"), "--out", str(tmp_path / "again"), "--bits", "4"]
    assert main([*argv, "--group-size", "32", "--no-progress"]) == 1
    assert "is already quantized (8 bits)" in capsys.readouterr().err and not (tmp_path / "again").exists()
