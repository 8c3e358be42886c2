"""Our tokenizer as llguidance sees it: each token's bytes (control tokens marked special),
the end-of-generation tokens, and encode() for the few places it re-tokenizes text."""
from __future__ import annotations

import logging
import time

import llguidance

from ..tokenizer import Tokenizer

log = logging.getLogger("ostinato.structured")


class _Vocab:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads."""

    def __init__(self, tok: Tokenizer, vocab_size: int):
        n = tok.vocab_size
        # token_to_bytes gives a control token its text; llguidance keeps special tokens
        # out of text matching, so no grammar can spell <|im_end|> out of its letters
        self.tokens = [tok.token_to_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        self.special_token_ids = [i for i in range(n) if tok.is_special(i)]
        self.eos_token_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self._tok = tok

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False)


def llg_tokenizer(tok: Tokenizer, eos_ids: list[int], vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's tokenizer for ours; vocab_size: the logits' width (may exceed the
    tokenizer's: padding rows are never allowed). Takes 0.3-1 s: build once per model."""
    if vocab_size < tok.vocab_size:
        raise ValueError(f"the model's {vocab_size} logits are fewer than the tokenizer's "
                         f"{tok.vocab_size} tokens")
    if not eos_ids:
        raise ValueError("structured output needs an end-of-generation token; this "
                         "tokenizer has none")
    t0 = time.perf_counter()
    out = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(tok, vocab_size)),
                                 n_vocab=vocab_size, eos_token=list(eos_ids))
    log.info("grammar vocabulary of %d tokens built in %.2f s (once per model)", vocab_size,
             time.perf_counter() - t0)
    return out
