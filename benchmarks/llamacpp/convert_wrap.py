"""Run llama.cpp's convert_hf_to_gguf.py unmodified, except that an unknown BPE
pre-tokenizer hash (our freshly trained toy tokenizer) is mapped to "gpt-2"
(our tokenizer uses the plain GPT-2 ByteLevel pre-tokenizer). Known hashes are unaffected."""

import runpy
import sys
from pathlib import Path

SRC = Path(sys.argv.pop(1)).resolve()  # llama.cpp source dir
sys.path.insert(0, str(SRC))
sys.path.insert(1, str(SRC / "gguf-py"))
from conversion import base

_orig = base.TextModel.get_vocab_base_pre


def _patched(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        base.logger.warning("unknown pre-tokenizer hash -> using 'gpt-2' (toy tokenizer)")
        return "gpt-2"


base.TextModel.get_vocab_base_pre = _patched
sys.argv[0] = str(SRC / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
