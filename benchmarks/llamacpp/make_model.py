"""The random phi-2-architecture model of bench_cpu_decode.py (same config, seed 0) with a small byte-level BPE trained
on the standard library, which llama.cpp's converter needs: python make_model.py OUT_DIR."""

import glob
import os
import sys
import sysconfig

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

# --- tiny byte-level BPE (GPT-2 style) trained on python stdlib sources ---
stdlib = sysconfig.get_paths()["stdlib"]
files = sorted(glob.glob(os.path.join(stdlib, "*.py")))[:200]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.post_processor = processors.ByteLevel(trim_offsets=False)
trainer = trainers.BpeTrainer(
    vocab_size=4096,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
)
tok.train(files, trainer)
print("tokenizer vocab:", tok.get_vocab_size())
fast = PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
)
fast.save_pretrained(out)

# --- random phi-2 architecture model ---
cfg = transformers.PhiConfig(
    vocab_size=4096,
    hidden_size=1024,
    num_hidden_layers=8,
    num_attention_heads=16,
    intermediate_size=4096,
    partial_rotary_factor=0.5,
    max_position_embeddings=2048,
)
cfg.bos_token_id = cfg.eos_token_id = tok.token_to_id("<|endoftext|>")
torch.manual_seed(0)
model = transformers.PhiForCausalLM(cfg)
model = model.to(torch.float32)
print("params:", sum(p.numel() for p in model.parameters()))
model.save_pretrained(out, safe_serialization=True)
print(sorted(os.listdir(out)))
