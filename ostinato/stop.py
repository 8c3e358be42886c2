"""Stop-string matching for streamed text.

Text arrives in chunks (one detokenized delta per step). `StopStringMatcher.feed`
returns only text that can no longer become part of a stop string: the longest
suffix that is a proper prefix of some stop string is held back until later text
either completes the stop string or rules it out.

Invariant: the held-back text is always a proper prefix of some stop string (so
shorter than the longest one), and no stop string occurs anywhere in held + emitted
text. Hence a match found in `held + new_text` is always a new match, and a match can
never start inside already-emitted text.

Which stop wins when several occur: the one that COMPLETES first (smallest end
offset), ties broken by the earliest start (the longer string). This is exactly the
one a token-by-token stream would hit first, so the result does not depend on how
the text was split into chunks. (vLLM instead takes the first stop in list order.)
"""
from __future__ import annotations


class StopStringMatcher:
    """Streams text through, holding back possible stop-string prefixes.

    feed(new_text) -> (safe_text, matched). After a match, the emitted text ends right
    before the stop string (or right after it with include_stop_str_in_output), the
    matched string is in `.matched_stop`, and further feeds return ("", True).
    """

    def __init__(self, stops: list[str], include_stop_str_in_output: bool = False):
        if isinstance(stops, str) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"StopStringMatcher: stops must be a list of str, got {stops!r}")
        if any(s == "" for s in stops):
            raise ValueError(f"StopStringMatcher: stop strings must not be empty, got {stops!r}")
        self.stops = list(dict.fromkeys(stops))          # de-duplicated, order kept
        self.include_stop_str_in_output = include_stop_str_in_output
        self.matched_stop: str | None = None
        self._held = ""

    @property
    def held(self) -> str:
        """Text received but not yet emitted (a possible start of a stop string)."""
        return self._held

    def feed(self, new_text: str) -> tuple[str, bool]:
        if self.matched_stop is not None:
            return "", True
        if not self.stops:
            return new_text, False
        pending = self._held + new_text
        match = self._first_match(pending)
        if match is not None:
            start, stop = match
            self.matched_stop = stop
            self._held = ""
            end = start + len(stop) if self.include_stop_str_in_output else start
            return pending[:end], True
        keep = self._held_back_length(pending)
        self._held = pending[len(pending) - keep:]
        return pending[:len(pending) - keep], False

    def flush(self) -> str:
        """End of generation: release whatever was held back."""
        out, self._held = self._held, ""
        return out

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop) of the match that ends first; ties -> earliest start."""
        best: tuple[int, int, str] | None = None     # (end, start, stop)
        for stop in self.stops:
            start = text.find(stop)                   # earliest start = earliest end for this stop
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _held_back_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop."""
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(longest, len(text)), 0, -1):
            suffix = text[len(text) - k:]
            if any(len(s) > k and s.startswith(suffix) for s in self.stops):
                return k
        return 0
