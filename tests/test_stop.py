"""StopStringMatcher: streamed stop-string detection with held-back prefixes."""
from __future__ import annotations

import random

import pytest

from ostinato.stop import StopStringMatcher


def run(stops: list[str], chunks: list[str], include: bool = False) -> tuple[list[str], bool, str]:
    """Feed chunks until a match; returns (emitted pieces incl. flush, matched, full output)."""
    m = StopStringMatcher(stops, include)
    pieces, matched = [], False
    for chunk in chunks:
        text, matched = m.feed(chunk)
        pieces.append(text)
        if matched:
            break
    if not matched:
        pieces.append(m.flush())
    return pieces, matched, "".join(pieces)


def test_no_stops_passes_text_through():
    m = StopStringMatcher([])
    assert m.feed("hello") == ("hello", False)
    assert m.flush() == ""


def test_stop_within_one_chunk_truncates():
    pieces, matched, text = run(["STOP"], ["abc STOP def"])
    assert matched and text == "abc "


def test_stop_spanning_several_feeds():
    m = StopStringMatcher(["<|end|>"])
    assert m.feed("Hi <|") == ("Hi ", False)    # "<|" may start the stop: held back
    assert m.held == "<|"
    assert m.feed("en") == ("", False)
    assert m.feed("d|> trailing") == ("", True)
    assert m.matched_stop == "<|end|>"
    assert m.feed("more") == ("", True)          # finished: nothing else comes out
    assert m.flush() == ""


def test_held_back_prefix_released_when_it_does_not_match():
    m = StopStringMatcher(["</s>"])
    assert m.feed("a <") == ("a ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("x>") == ("</x>", False)       # ruled out: all of it released
    assert m.held == ""


def test_held_back_prefix_released_by_flush():
    m = StopStringMatcher(["###"])
    assert m.feed("end ##") == ("end ", False)
    assert m.flush() == "##"
    assert m.flush() == ""


def test_partial_release_keeps_a_new_possible_prefix():
    # "aab": after "aa" the first "a" is released once "aab" can no longer start there.
    m = StopStringMatcher(["ab"])
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("a", False)
    assert m.feed("b") == ("", True)


def test_include_stop_str_in_output():
    pieces, matched, text = run(["STOP"], ["abc ST", "OP def"], include=True)
    assert matched and text == "abc STOP"
    assert pieces == ["abc ", "STOP"]


def test_multiple_stops_earliest_wins():
    _, matched, text = run(["world", "lo"], ["hello world"])
    assert matched and text == "hel"
    m = StopStringMatcher(["zzz", "c", "b"], include_stop_str_in_output=True)
    assert m.feed("abcd") == ("ab", True)
    assert m.matched_stop == "b"


def test_overlapping_stops_first_completed_wins_regardless_of_chunking():
    """"abc" starts first but "b" completes first: a token stream would stop at "b"."""
    whole = run(["abc", "b"], ["xabcy"])
    char_by_char = run(["abc", "b"], list("xabcy"))
    assert whole[2] == char_by_char[2] == "xa"
    # Same end offset: the longer (earlier-starting) string wins.
    m = StopStringMatcher(["c", "abc"], include_stop_str_in_output=True)
    assert m.feed("xabcy") == ("xabc", True)
    assert m.matched_stop == "abc"


def test_unicode_stop_strings():
    m = StopStringMatcher(["终了", "🛑"])
    assert m.feed("你好终") == ("你好", False)
    assert m.feed("了吗") == ("", True)
    assert m.matched_stop == "终了"
    _, matched, text = run(["🛑"], ["café ", "é🛑", "x"], include=True)
    assert matched and text == "café é🛑"
    _, matched, text = run(["终了"], ["终", "点"])
    assert not matched and text == "终点"


def test_stop_at_very_start():
    pieces, matched, text = run(["\n\n"], ["\n", "\nrest"])
    assert matched and text == "" and pieces == ["", ""]


def test_invalid_stops_rejected():
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher([""])
    with pytest.raises(ValueError, match="list of str"):
        StopStringMatcher("abc")  # type: ignore[arg-type]


def reference_output(stops: list[str], text: str, include: bool) -> tuple[str, bool]:
    """Non-streaming definition: stop at the match that ends first (ties: longest)."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            stop = max(hits, key=len)
            return text[:end] if include else text[:end - len(stop)], True
    return text, False


@pytest.mark.parametrize("seed", range(200))
def test_random_chunkings_agree_with_reference(seed):
    rng = random.Random(seed)
    alphabet = "abé🙂 "
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
             for _ in range(rng.randint(1, 3))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    include = rng.random() < 0.5
    cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(0, 8)))) if len(text) > 1 else []
    chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    m = StopStringMatcher(stops, include)
    emitted, matched = "", False
    for chunk in chunks:
        piece, matched = m.feed(chunk)
        emitted += piece
        # never emit something that a stop string could still begin inside
        if not matched:
            assert m.held == "" or any(s.startswith(m.held) and s != m.held for s in stops)
        if matched:
            break
    if not matched:
        emitted += m.flush()
    assert (emitted, matched) == reference_output(stops, text, include), (stops, chunks)
