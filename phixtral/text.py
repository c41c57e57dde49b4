"""Text around the token loop, shared by generate(), the server's engine and the lm-eval model: the pad id, left
padding of token rows, stop strings, and the text of a generated row (whole, or piece by piece with TextStream).

A row's text follows one rule everywhere: tokens up to the first eos id (left out), decoded without special tokens,
cut before the earliest stop string.
"""

from typing import Callable, Optional

import torch


def pad_id(model) -> int:
    """The id that fills the padding of `model`'s batches: the tokenizer's pad id, else the first eos id, else 0."""
    tok = model.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return tok.pad_token_id
    return model.eos_token_ids[0] if model.eos_token_ids else 0


def left_pad(rows: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token rows of any lengths -> (ids [B, S] int64 with `pad` on the left, attention_mask [B, S] int64: 0 pad,
    1 real; None when no row is padded), on `device`. S is the longest row."""
    S = max(map(len, rows))
    ids = torch.tensor([[pad] * (S - len(r)) + list(r) for r in rows], dtype=torch.int64, device=device)
    if all(len(r) == S for r in rows):
        return ids, None
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64, device=device)
    return ids, mask


def find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in text, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def cut_at_stop(text: str, stops: list[str]) -> str:
    """text up to (without) its earliest stop string."""
    cut = find_stop(text, stops)
    return text if cut < 0 else text[:cut]


def decode_text(tokenizer, ids: list[int]) -> str:
    """Token ids -> text, special tokens left out (as every phixtral result is decoded)."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def row_text(decode: Callable[[list[int]], str], ids: list[int], eos, stops: list[str]) -> str:
    """The text of one generated row: ids up to the first eos id (left out), decoded, cut before the first stop
    string."""
    end = next((k for k, t in enumerate(ids) if t in eos), len(ids))
    return cut_at_stop(decode(ids[:end]), stops)


class TextStream:
    """Incremental text of one generated row: push each new token, get the text that can be shown now.

    Text is held back while it ends in a partial UTF-8 character or in a prefix of a stop string; generation of the row
    ends at an eos id (not part of the text) or at a stop string (the text ends before it), and `finish_reason` becomes
    "stop". The pieces joined equal `row_text` (and generate's text) for the same tokens. decode: token ids -> text.
    """

    def __init__(self, decode: Callable[[list[int]], str], eos, stops: list[str]):
        self._decode, self._eos, self._stops = decode, eos, stops
        self.ids: list[int] = []  # the row's tokens so far, without eos
        self.emitted = 0  # characters of the decoded text already returned
        self.finish_reason: Optional[str] = None  # "stop" once eos or a stop string ended the row

    def push(self, token: int) -> str:
        """Take the row's next token; return the new text that is safe to show ("" while it is held back)."""
        if token in self._eos:
            self.finish_reason = "stop"
            return self._rest()
        self.ids.append(token)
        text = self._decode(self.ids)
        cut = find_stop(text, self._stops)
        if cut >= 0:
            self.finish_reason = "stop"
            piece = text[self.emitted : cut]
            self.emitted = max(self.emitted, cut)
            return piece
        safe = len(text.rstrip("\ufffd"))  # a byte-level token can end inside a multi-byte character
        for s in self._stops:  # a stop string may be completed by the next token
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted : safe], safe
        return piece

    def flush(self) -> str:
        """The text held back so far, at the end of a row that ran out of tokens ("" once the row has stopped)."""
        return "" if self.finish_reason is not None else self._rest()

    def _rest(self) -> str:
        text = self._decode(self.ids)
        piece, self.emitted = text[self.emitted :], max(self.emitted, len(text))
        return piece
