"""One sequence's grammar state: the tokens allowed next, and the token taken."""
from __future__ import annotations

import llguidance
import numpy as np


class Constraint:
    """Wraps an llguidance matcher. A preempted sequence keeps its Constraint: its output
    tokens are kept, so the matcher's state stays right for the next token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._m, self.vocab_size = matcher, vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)   # bit t: token t

    def forbidden(self) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar forbids next (all but an end-of-generation
        token once the grammar is complete)."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self._m.is_error():
            raise RuntimeError(f"the grammar failed: {self._m.get_error()}")
        if not self._bits.any():
            raise RuntimeError("the grammar allows no token here")
        bits = np.unpackbits(np.invert(self._bits).view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(np.bool_)

    def advance(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """No token but end-of-generation may follow."""
        return self._m.is_stopped()
