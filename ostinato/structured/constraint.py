"""One sequence's grammar state: the tokens allowed next, and the token taken."""
from __future__ import annotations

import os
import threading

import llguidance
import numpy as np

_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def fill_masks(constraints: list[Constraint]) -> None:
    """Compute the next masks of a step's constraints at once, on llguidance's own threads
    (the GIL released); each forbidden() then reads its own. The masks are the same bits as
    one at a time."""
    if len(constraints) < 2:
        return
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor(num_threads=os.cpu_count() or 1)
    words = constraints[0]._bits.size
    buf = np.empty((len(constraints), words), dtype=np.int32)
    _executor.unsafe_compute_mask_ptr([(c._m, i) for i, c in enumerate(constraints)],
                                      buf.ctypes.data, words * 4, len(constraints))
    for c, row in zip(constraints, buf):
        c._bits[:] = row
        c._ready = True


TOO_COMPLEX = ("ParserTooComplex", "LexerTooComplex")     # llguidance's resource limits
PARSER_LIMIT = "Parser Error: Current row has"      # a row over max_items_in_row
DEAD_END = ("NoExtension", "NoExtensionBias")       # no token of the vocabulary goes on
DEAD_END_TEXT = ("the output constraint admits no token after the output so far: nothing "
                 "the model's vocabulary can write completes it (a rule or $ref that only "
                 "refers to itself, an empty character class, ...); fix the grammar or "
                 "schema")


class GrammarInputError(RuntimeError, ValueError):
    """A grammar failed mid-generation by the request's own fault (it hit a resource limit,
    or it admits no continuation): a RuntimeError as any grammar failure (the runner fails
    that sequence alone), and a ValueError: the request's input (a 400 on the server)."""


class Constraint:
    """Wraps an llguidance matcher. A preempted sequence keeps its Constraint: its output
    tokens are kept, so the matcher's state stays right for the next token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self._m, self.vocab_size = matcher, vocab_size
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)   # bit t: token t
        self._ready = False             # _bits already holds this step's mask (fill_masks)

    def forbidden(self) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar forbids next (all but an end-of-generation
        token once the grammar is complete)."""
        self._read_bits()
        if not self._bits.any():
            raise GrammarInputError(DEAD_END_TEXT)
        bits = np.unpackbits(np.invert(self._bits).view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(np.bool_)

    @staticmethod
    def allowed_rows(constraints: list[Constraint]) -> np.ndarray:
        """(len, words) int32: each constraint's allowed-token bits (bit t: token t), as one
        array; each mask counts as read, as by forbidden(). Raises as forbidden() does when
        a grammar failed."""
        for c in constraints:
            c._read_bits()
        return np.stack([c._bits for c in constraints])

    def _read_bits(self) -> None:
        """This step's mask into _bits (computed now unless fill_masks did), read once."""
        if not self._ready:
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._ready = False
        if self._m.is_error():
            raise self._failure("the grammar failed")

    def advance(self, token: int) -> None:
        self._ready = False
        if not self._m.consume_token(token):
            raise self._failure(f"the grammar refused token {token}")

    def _failure(self, what: str) -> RuntimeError:
        """The matcher's error; the request's own fault (a 400 on the server) when its
        grammar outgrew the engine's limits or admits no continuation, else ours."""
        error, reason = (self._m.get_error() or "").strip(), self._m.stop_reason()
        if reason in TOO_COMPLEX or error.startswith(PARSER_LIMIT):
            first = error.splitlines()[0][:160] if error else reason
            return GrammarInputError(f"the output constraint is too complex for the grammar "
                                     f"engine ({first}); simplify it")
        if reason in DEAD_END or error.split("\n", 1)[0].strip() in DEAD_END:   # the latter
            return GrammarInputError(DEAD_END_TEXT)      # with reason "InternalError", 1.9.1
        return RuntimeError(f"{what}: {error}")

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar would take from here (its state
        unchanged)."""
        return self._m.validate_tokens(tokens)

    @property
    def done(self) -> bool:
        """No token but end-of-generation may follow."""
        return self._m.is_stopped()
