"""Tiny random phi-2 checkpoints for the merge / eval / inspect tests: both key layouts, with a real BPE tokenizer."""

import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch

EOS = "<|endoftext|>"
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "async def main():\n    await asyncio.sleep(1)\n",
    "class TestAdd(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(1, 2), 3)\n",
    "The assert statement is a convenient way to insert debugging assertions into a program.\n",
    "Content-Type: text/plain; charset=utf-8\r\nSubject: hello\r\n\r\nbody\r\n",
] * 4
VOCAB = 320  # the tokenizer has 300 tokens; the embedding is padded, as phi-2 pads 50295 to 51200


@lru_cache(maxsize=None)
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def phi_config(n_embd=32, n_layer=2, n_head=4, intermediate=None):
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=VOCAB,
        hidden_size=n_embd,
        intermediate_size=intermediate or 4 * n_embd,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=64,
        partial_rotary_factor=0.5,
        hidden_act="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )


def make_phi(folder, seed: int, layout: str = "hf", **shape) -> Path:
    """A random dense phi checkpoint with the test tokenizer in `folder`: layout "hf" (transformers) or "msft"
    (phi-msft)."""
    from transformers import PhiForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = PhiForCausalLM(phi_config(**shape)).eval()
    with torch.no_grad():  # transformers initializes biases to zero and LayerNorms to one: make every tensor matter
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer().save_pretrained(str(folder))
    if layout == "msft":
        from phixtral.weights import from_pretrained

        hf = folder.with_name(folder.name + "-hf")
        folder.rename(hf)
        dense = from_pretrained(hf, device="cpu", dtype=torch.float32, backend="torch")
        dense.save_pretrained(folder, dtype=torch.float32)  # the phi-msft files and the tokenizer
        shutil.rmtree(hf)
        assert json.loads((folder / "config.json").read_text())["model_type"] == "phi-msft"
    return folder


def hf_model(folder):
    from transformers import PhiForCausalLM

    return PhiForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
