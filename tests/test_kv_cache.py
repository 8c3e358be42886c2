"""BlockPool and KVCacheManager on plain integers: exact block ids, refcounts, prefix hits,
LRU eviction, sliding-window freeing. No model, no torch."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from ostinato.engine.kv_cache import NULL_BLOCK, BlockPool, KVCacheManager, hash_block
from ostinato.engine.sequence import Sequence

ROOT = Path(__file__).resolve().parents[1]


def make_seq(seq_id: str, prompt, prompt_logprobs=None) -> Sequence:
    params = SimpleNamespace(prompt_logprobs=prompt_logprobs, pooling=None)   # what these layers read
    return Sequence(seq_id, seq_id, 0, list(prompt), params, max_tokens=1000)


def admit(kv: KVCacheManager, seq: Sequence, num_tokens: int):
    """What the scheduler does for a waiting sequence."""
    seq.num_computed_tokens = kv.find_cached_prefix(seq)
    return kv.allocate(seq, num_tokens)


def test_pure_layers_import_without_torch_and_hash_is_stable():
    # Load the package from its directory without ostinato/__init__.py (which imports the
    # torch-based sampling module), then check torch never came in. A different hash seed
    # must give the same block hash: prefix-cache keys may not depend on Python's hash().
    code = textwrap.dedent("""
        import sys, types
        pkg = types.ModuleType("ostinato")
        pkg.__path__ = [sys.argv[1]]
        sys.modules["ostinato"] = pkg
        import ostinato.engine.kv_cache as kv, ostinato.engine.scheduler, ostinato.engine.sequence
        assert "torch" not in sys.modules, "torch was imported"
        print(kv.hash_block(kv.hash_block(None, [1, 2, 3]), [4, 5, 6]).hex())
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "ostinato")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == hash_block(hash_block(None, [1, 2, 3]), [4, 5, 6]).hex()


def test_hash_chain():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4]) and len(a) == 32
    assert a != hash_block(None, [4, 3, 2, 1])
    b = hash_block(None, [9, 9, 9, 9])
    # same tokens, different parent: different hash (the position in the prefix differs)
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(b, [5, 6, 7, 8])
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])


def test_block_pool_ids_refcounts_and_lru():
    pool = BlockPool(5, 4)
    assert [pool.allocate() for _ in range(4)] == [1, 2, 3, 4]   # block 0 is the null block
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        pool.allocate()
    pool.cache(2, b"h2")
    pool.cache(3, b"h3")
    pool.touch(3)
    assert pool.ref[1:] == [1, 1, 2, 1]
    for b in (3, 3, 2, 1):
        pool.release(b)
    assert list(pool.free) == [1] and list(pool.evictable) == [3, 2]
    pool.check_integrity()
    assert pool.allocate() == 1                          # the free list comes first
    assert pool.allocate() == 3 and pool.lookup(b"h3") is None   # then the LRU cached block
    pool.touch(2)                                         # a hit takes an evictable block back
    assert pool.ref[2] == 1 and 2 not in pool.evictable and pool.lookup(b"h2") == 2
    with pytest.raises(RuntimeError, match="not in use"):
        pool.release(NULL_BLOCK)
    pool.check_integrity()


def test_shared_prefix_exact_ids_and_refcounts():
    kv = KVCacheManager([8], 4, [None])
    a = make_seq("a", range(10))
    assert admit(kv, a, 10) == [[1, 2, 3]]
    a.num_computed_tokens = 10
    a.output_ids.append(100)
    assert kv.allocate(a, 11) == [[1, 2, 3]]             # registers the 2 full blocks
    b = make_seq("b", list(range(8)) + [50, 51])
    assert admit(kv, b, 10) == [[1, 2, 4]] and b.num_computed_tokens == 8
    assert kv.pools[0].ref[:5] == [0, 2, 2, 1, 1]
    c = make_seq("c", range(8))                          # the whole prompt is cached ...
    assert kv.find_cached_prefix(c) == 4                 # ... but its last token is computed
    assert kv.find_cached_prefix(make_seq("d", [7] + list(range(1, 8)) + [0])) == 0
    assert (kv.prefix_queries, kv.prefix_hits) == (20, 8)
    kv.check_integrity()
    kv.free(b)
    assert kv.pools[0].ref[:5] == [0, 1, 1, 1, 0]
    kv.free(a)
    assert kv.usage() == 0.0
    kv.check_integrity()


def test_lru_evicts_a_prefix_tail_first_and_failed_allocation_changes_nothing():
    kv = KVCacheManager([6], 4, [None])                  # blocks 1..5
    a = make_seq("a", range(9))
    assert admit(kv, a, 9) == [[1, 2, 3]]
    a.num_computed_tokens = 9
    kv.free(a)                   # 1, 2 are full and cached; 3 (partial) goes to the free list
    assert list(kv.pools[0].evictable) == [2, 1] and list(kv.pools[0].free) == [4, 5, 3]
    b = make_seq("b", range(100, 112))
    assert admit(kv, b, 12) == [[4, 5, 3]]
    c = make_seq("c", range(200, 204))
    assert admit(kv, c, 4) == [[2]]                      # evicts the LRU block: a's tail
    a2 = make_seq("a2", range(9))
    assert kv.find_cached_prefix(a2) == 4                # only a's head is still cached
    before = (list(kv.pools[0].ref), list(kv.pools[0].evictable))
    assert admit(kv, a2, 9) is None                      # needs 2 fresh blocks, none free
    assert (list(kv.pools[0].ref), list(kv.pools[0].evictable)) == before
    assert "a2" not in kv.seqs
    kv.free(b)
    assert admit(kv, a2, 9) == [[1, 3, 5]]
    assert kv.pools[0].ref[1] == 1 and not kv.pools[0].evictable
    kv.check_integrity()


def test_output_blocks_are_cached_too():
    kv = KVCacheManager([8], 4, [None])
    a = make_seq("a", range(6))
    assert admit(kv, a, 6) == [[1, 2]]
    for n in (7, 8, 9):                                  # decode: one token a step
        a.num_computed_tokens = n - 1
        a.output_ids.append(90 + n)
        kv.allocate(a, n)
    assert kv.seqs["a"].tables == [[1, 2, 3]] and kv.seqs["a"].num_cached == 2
    b = make_seq("b", a.all_ids[:8] + [1])               # block 2 holds 2 generated tokens
    assert admit(kv, b, 9) == [[1, 2, 4]] and b.num_computed_tokens == 8
    kv.check_integrity()


def test_prompt_logprobs_skip_the_prefix_cache():
    kv = KVCacheManager([8], 4, [None])
    a = make_seq("a", range(9))
    admit(kv, a, 9)
    a.num_computed_tokens = 9
    kv.free(a)
    assert kv.find_cached_prefix(make_seq("b", range(9))) == 8
    assert kv.find_cached_prefix(make_seq("c", range(9), prompt_logprobs=1)) == 0
    assert kv.find_cached_prefix(make_seq("c", range(9))) == 8
    off = KVCacheManager([8], 4, [None], enable_prefix_caching=False)
    admit(off, a, 9)
    a.num_computed_tokens = 9
    off.free(a)
    assert off.find_cached_prefix(make_seq("b", range(9))) == 0 and not off.pools[0].cached
    assert list(off.pools[0].free) == [4, 5, 6, 7, 3, 2, 1]


@pytest.mark.parametrize("caching", [True, False])
def test_sliding_window_releases_blocks_into_the_null_block(caching):
    kv = KVCacheManager([10, 10], 4, [None, 8], enable_prefix_caching=caching)
    s = make_seq("s", range(20))
    assert admit(kv, s, 6) == [[1, 2], [1, 2]]
    s.num_computed_tokens = 6
    assert kv.allocate(s, 12) == [[1, 2, 3], [1, 2, 3]]   # query 6 still sees position 0
    s.num_computed_tokens = 12        # query 12 sees 5..12: block 0 (positions 0..3) is dead
    assert kv.allocate(s, 18) == [[1, 2, 3, 4, 5], [0, 2, 3, 4, 5]]
    sliding = kv.pools[1]
    assert sliding.ref[1] == 0
    assert (1 in sliding.evictable) if caching else (sliding.free[-1] == 1)
    s.num_computed_tokens = 18        # query 18 sees 11..18: block 1 (4..7) is dead too
    assert kv.allocate(s, 20) == [[1, 2, 3, 4, 5], [0, 0, 3, 4, 5]]
    assert kv.usage() == pytest.approx((5 + 3) / 18)
    kv.check_integrity()
    kv.free(s)
    assert kv.usage() == 0.0
    kv.check_integrity()


def test_sliding_window_prefix_hit_needs_only_the_window():
    kv = KVCacheManager([16, 12], 4, [None, 8])
    a = make_seq("a", range(20))
    assert admit(kv, a, 20) == [[1, 2, 3, 4, 5]] * 2
    a.num_computed_tokens = 20
    a.output_ids.append(99)
    assert kv.allocate(a, 21) == [[1, 2, 3, 4, 5, 6], [0, 0, 0, 4, 5, 6]]
    # b's first uncached position is 20; it sees 13..20, so the sliding group needs only
    # blocks 3 and 4 of the prefix (still held by a), not the released 0..2.
    b = make_seq("b", list(range(20)) + [7])
    assert admit(kv, b, 21) == [[1, 2, 3, 4, 5, 7], [0, 0, 0, 4, 5, 7]]
    assert b.num_computed_tokens == 20
    assert kv.pools[1].ref[4] == 2 and list(kv.pools[1].evictable) == [3, 2, 1]
    d = make_seq("d", range(100, 120))   # takes the 4 free sliding blocks, then evicts 3
    assert admit(kv, d, 20) == [[8, 9, 10, 11, 12], [8, 9, 10, 11, 3]]
    # c shares 4 blocks with a. A hit of 16 would need sliding blocks 2..3: block 2's copy
    # is gone. 12 would need 1..2: no. 8 needs 0..1, both still cached.
    c = make_seq("c", list(range(16)) + [77] * 5)
    assert kv.find_cached_prefix(c) == 8
    assert admit(kv, c, 21) is None      # the sliding pool has no 4 fresh blocks left
    kv.free(d)                           # d computed nothing: its blocks go back uncached
    assert admit(kv, c, 21) == [[1, 2, 13, 14, 15, 12], [1, 2, 3, 11, 10, 9]]
    kv.check_integrity()


def test_check_integrity_catches_corruption():
    kv = KVCacheManager([6], 4, [None])
    admit(kv, make_seq("a", range(5)), 5)
    kv.check_integrity()
    kv.pools[0].ref[1] += 1
    with pytest.raises(AssertionError, match="refcounts"):
        kv.check_integrity()
    kv.pools[0].ref[1] -= 1
    kv.pools[0].free.append(1)
    with pytest.raises(AssertionError):
        kv.check_integrity()


def test_bad_arguments():
    with pytest.raises(ValueError, match="null block"):
        BlockPool(1, 4)
    with pytest.raises(ValueError, match="groups"):
        KVCacheManager([8, 8], 4, [None])
