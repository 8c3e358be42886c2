"""Paged KV-cache bookkeeping: ref-counted blocks, prefix caching, sliding-window freeing.

Pure Python, no torch: this layer only hands out block ids; the runner owns the tensors.

One BlockPool per KV-cache group (group 0: full attention; Gemma 3's group 1: sliding-window
layers). Block ids are per pool. Block 0 of every pool is the null block: never handed out,
it stands in a sliding-window table for blocks no future query can see (attention masks them).

Prefix caching: a full block whose KV is computed is registered under a chain hash,
sha256(parent block's hash + its token ids), so equal hashes mean equal token prefixes.
A released cached block keeps its hash and waits on an LRU list; it is evicted only when a
fresh block is needed and the free list is empty. A later request with the same prefix takes
it back (a hit) instead of recomputing it.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .sequence import Sequence

NULL_BLOCK = 0


def hash_block(parent: bytes | None, token_ids: Seq[int], tag: bytes = b"") -> bytes:
    """Chain hash of one full block: stable across processes (no Python hash randomisation).
    tag: what besides the tokens decides its KV (b"generated" under split paths)."""
    data = (parent or b"") + struct.pack(f"<{len(token_ids)}q", *token_ids) + tag
    return hashlib.sha256(data).digest()


class BlockPool:
    """num_blocks blocks of block_size slots. Every block but the null one is in exactly one
    of: in use (ref > 0), `free` (ref 0, no hash), `evictable` (ref 0, cached, LRU first)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"a block pool needs >= 2 blocks (one is the null block) and "
                             f"block_size >= 1, got {num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hash_of: dict[int, bytes] = {}      # block -> hash, for cached blocks
        self.cached: dict[bytes, int] = {}       # hash -> block, the prefix cache
        self.new_cached: list[tuple[int, bytes]] | None = None   # (block, hash) registered
        # since the last take, when a disk tier wants them (KVCacheManager.take_new_cached)

    def num_available(self) -> int:
        return len(self.free) + len(self.evictable)

    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_available()

    def allocate(self) -> int:
        """A fresh block (ref 1): from the free list, else by evicting the LRU cached block."""
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.hash_of.pop(block)]
        else:
            raise RuntimeError(f"out of KV blocks: all {self.num_blocks - 1} are in use")
        self.ref[block] = 1
        return block

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h)

    def touch(self, block: int) -> None:
        """Take a cached block for one more sequence (a prefix hit)."""
        if self.ref[block] == 0:
            del self.evictable[block]
        self.ref[block] += 1

    def release(self, block: int) -> None:
        if block == NULL_BLOCK or self.ref[block] <= 0:
            raise RuntimeError(f"release of block {block}, which is not in use")
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None      # most recently used end
            else:
                self.free.append(block)

    def cache(self, block: int, h: bytes) -> None:
        """Register a full, computed block. If its content is cached already (two sequences
        computed the same prefix at once), the older copy stays the cached one."""
        if h not in self.cached and block not in self.hash_of:
            self.cached[h], self.hash_of[block] = block, h
            if self.new_cached is not None:
                self.new_cached.append((block, h))

    def refresh(self, block: int) -> None:
        """Move a cached, unused block to the most recently used end of the LRU list."""
        if self.ref[block] == 0 and block in self.evictable:
            self.evictable.move_to_end(block)

    def check_integrity(self) -> None:
        assert self.ref[NULL_BLOCK] == 0 and NULL_BLOCK not in self.hash_of, "null block used"
        free, evict = set(self.free), set(self.evictable)
        assert len(free) == len(self.free), "a block is twice in the free list"
        assert not free & evict, "a block is both free and evictable"
        for b in range(1, self.num_blocks):
            n_places = (self.ref[b] > 0) + (b in free) + (b in evict)
            assert n_places == 1, f"block {b} (ref {self.ref[b]}) is in {n_places} places"
        assert all(b not in self.hash_of for b in free), "a free block has a hash"
        assert all(b in self.hash_of for b in evict), "an evictable block has no hash"
        assert all(self.hash_of.get(b) == h for h, b in self.cached.items()), "hash maps differ"
        assert len(self.cached) == len(self.hash_of), "hash maps differ in size"


@dataclass
class _SeqBlocks:
    tables: list[list[int]]   # per group: block id of each block_size slice of the sequence
    num_cached: int           # leading blocks already registered in the prefix cache (or hits)


class KVCacheManager:
    """Block tables of every running sequence, one per KV-cache group."""

    def __init__(self, num_blocks_per_group: list[int], block_size: int,
                 windows: list[int | None], enable_prefix_caching: bool = True,
                 split_paths: bool = False):
        """split_paths: prompt and generated positions are computed on different matmul paths
        (--prompt-bf16), so a block holding a generated position is cached under another
        hash than the same tokens as a prompt: a later prompt never reuses it."""
        if len(num_blocks_per_group) != len(windows) or not windows:
            raise ValueError(f"{len(num_blocks_per_group)} block counts for "
                             f"{len(windows)} KV-cache groups")
        self.pools = [BlockPool(n, block_size) for n in num_blocks_per_group]
        self.windows, self.block_size = list(windows), block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.split_paths = split_paths
        self.seqs: dict[str, _SeqBlocks] = {}
        self.prefix_queries = 0    # prompt tokens looked up at admission
        self.prefix_hits = 0       # of those, tokens found in the cache

    # -- prefix lookup ---------------------------------------------------------------------
    def find_cached_prefix(self, seq: Sequence) -> int:
        """Tokens of seq.all_ids whose KV every group has cached: a multiple of block_size,
        never all of them (the last token is computed so that its logits exist). Sliding
        groups need only the blocks inside the window of the first uncached position."""
        if not self._may_hit(seq):
            return 0
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        return self._hit_blocks(hashes, lambda g, h: h in self.pools[g].cached) * self.block_size

    def _may_hit(self, seq: Sequence) -> bool:
        """Prompt logprobs and mean pooling need every prompt position computed."""
        p = seq.params
        return (self.enable_prefix_caching and p.prompt_logprobs is None
                and p.pooling != "mean")

    def _hit_blocks(self, hashes: list[bytes], has) -> int:
        """The most leading blocks k that `has(group, hash)` holds: every block before k in
        each full-attention group, those in the window of position k*block_size in each
        sliding one."""
        k = min((self._leading(g, hashes, has) for g, w in enumerate(self.windows) if w is None),
                default=len(hashes))
        while k > 0 and not all(has(g, h) for g in self._sliding()
                                for h in hashes[self._first_live_block(g, k * self.block_size):k]):
            k -= 1
        return k

    @staticmethod
    def _leading(g: int, hashes: list[bytes], has) -> int:
        n = 0
        while n < len(hashes) and has(g, hashes[n]):
            n += 1
        return n

    # -- a lower tier (disk) ---------------------------------------------------------------
    def track_new_cached(self) -> None:
        """From now on, record every block registered in the prefix cache (take_new_cached)."""
        for pool in self.pools:
            pool.new_cached = []

    def take_new_cached(self) -> list[tuple[int, int, bytes]]:
        """(group, block, hash) of the blocks registered since the last call. Their KV is
        what a past step wrote, and stays until a later step runs (eviction only hands a
        block out; a step overwrites it): copy them before the next execute."""
        out = []
        for g, pool in enumerate(self.pools):
            out.extend((g, b, h) for b, h in pool.new_cached or ())
            if pool.new_cached:
                pool.new_cached = []
        return out

    def lower_tier_blocks(self, seq: Sequence, lower_has) -> list[tuple[int, bytes]]:
        """(group, hash) of the blocks to bring into RAM from a lower tier holding
        `lower_has(group, hash)`, so that seq's cached prefix is as long as both tiers allow;
        in prefix order. The RAM blocks of that prefix move to the LRU list's recent end, so
        that making room for the others does not evict them."""
        if not self._may_hit(seq):
            return []
        hashes = self._block_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        k = self._hit_blocks(hashes, lambda g, h: h in self.pools[g].cached or lower_has(g, h))
        out = []
        for i in range(k):
            for g, pool in enumerate(self.pools):
                if i < self._first_live_block(g, k * self.block_size):
                    continue
                b = pool.lookup(hashes[i])
                if b is None:
                    out.append((g, hashes[i]))
                else:
                    pool.refresh(b)
        return out

    def fill_block(self, g: int, h: bytes, load) -> bool:
        """Bring one block in from a lower tier: a fresh block of group g, `load(block)`
        writes its KV (False: it could not, the block goes back free), then it is cached
        under h, unused (evictable), as if a finished sequence had left it."""
        pool = self.pools[g]
        if h in pool.cached:
            return True
        if not pool.num_available():
            return False
        block = pool.allocate()
        if not load(block):
            pool.release(block)
            return False
        pool.cache(block, h)
        if pool.new_cached:
            pool.new_cached.pop()          # it came from the lower tier: nothing to write
        pool.release(block)
        return True

    def _sliding(self) -> list[int]:
        return [g for g, w in enumerate(self.windows) if w is not None]

    def _first_live_block(self, g: int, num_computed: int) -> int:
        """Blocks before this one hold only positions < num_computed - window + 1, which the
        query at position num_computed (and every later one) cannot see."""
        w = self.windows[g]
        return 0 if w is None else max(0, num_computed - w + 1) // self.block_size

    def _block_hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """Chain hashes of seq's first n blocks (all full), memoised on seq: tokens are only
        ever appended, so a full block's hash never changes (preemption included)."""
        hashes, bs = seq.block_hashes, self.block_size
        assert n * bs <= seq.num_tokens, "only full blocks have a hash"
        if len(hashes) < n:
            ids, n_prompt = seq.all_ids, len(seq.prompt_ids)
            for i in range(len(hashes), n):
                tag = b"generated" if self.split_paths and (i + 1) * bs > n_prompt else b""
                hashes.append(hash_block(hashes[i - 1] if i else None, ids[i * bs:(i + 1) * bs],
                                         tag))
        return hashes[:n]

    # -- allocation ------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens_after_step: int) -> list[list[int]] | None:
        """Blocks for positions [0, num_tokens_after_step) in every group; returns copies of
        the tables, or None (and allocates nothing) when a pool is short. A new sequence's
        first seq.num_computed_tokens tokens come from the cache (find_cached_prefix)."""
        state = self.seqs.get(seq.seq_id)
        if state is None:
            return self._allocate_new(seq, num_tokens_after_step)
        self._cache_computed(seq, state)
        self._free_out_of_window(seq, state)
        need = self._fresh_needed(state, num_tokens_after_step)
        if any(n > p.num_available() for n, p in zip(need, self.pools)):
            return None
        self._grow(state, need)
        return [list(t) for t in state.tables]

    def _allocate_new(self, seq: Sequence, num_tokens_after_step: int):
        hit = seq.num_computed_tokens
        assert hit % self.block_size == 0, f"a prefix hit of {hit} tokens is not whole blocks"
        state = _SeqBlocks([self._hit_table(g, seq, hit) for g in range(len(self.pools))],
                           hit // self.block_size)
        need = self._fresh_needed(state, num_tokens_after_step)
        for n, pool, table in zip(need, self.pools, state.tables):
            reclaimed = sum(1 for b in table if b != NULL_BLOCK and pool.ref[b] == 0)
            if n + reclaimed > pool.num_available():
                return None
        for pool, table in zip(self.pools, state.tables):
            for b in table:
                if b != NULL_BLOCK:
                    pool.touch(b)
        self._grow(state, need)
        self.seqs[seq.seq_id] = state
        if self.enable_prefix_caching:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += hit
        return [list(t) for t in state.tables]

    def _hit_table(self, g: int, seq: Sequence, hit: int) -> list[int]:
        """Group g's table for the cached first `hit` tokens (null where out of window)."""
        k, lo = hit // self.block_size, self._first_live_block(g, hit)
        hashes = self._block_hashes(seq, k)
        table = [NULL_BLOCK] * lo + [self.pools[g].lookup(h) for h in hashes[lo:k]]
        assert None not in table, "allocate() of a prefix that find_cached_prefix() did not find"
        return table

    def _fresh_needed(self, state: _SeqBlocks, num_tokens: int) -> list[int]:
        n_blocks = -(-num_tokens // self.block_size)
        return [max(0, n_blocks - len(t)) for t in state.tables]

    def _grow(self, state: _SeqBlocks, need: list[int]) -> None:
        for n, pool, table in zip(need, self.pools, state.tables):
            table.extend(pool.allocate() for _ in range(n))

    def _cache_computed(self, seq: Sequence, state: _SeqBlocks) -> None:
        """Register seq's full blocks whose KV is computed (prompt and output alike). Done
        before a step, so a block is only shared once a past step wrote its KV."""
        n = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or n <= state.num_cached:
            return
        hashes = self._block_hashes(seq, n)
        for pool, table in zip(self.pools, state.tables):
            for i in range(state.num_cached, n):
                if table[i] != NULL_BLOCK:
                    pool.cache(table[i], hashes[i])
        state.num_cached = n

    def _free_out_of_window(self, seq: Sequence, state: _SeqBlocks) -> None:
        """Sliding groups: release blocks no future query sees; the null block takes their
        place. Dead blocks form a prefix of the table, so walk back from the last dead one."""
        for g in self._sliding():
            table, pool = state.tables[g], self.pools[g]
            i = self._first_live_block(g, seq.num_computed_tokens) - 1
            while i >= 0 and table[i] != NULL_BLOCK:
                pool.release(table[i])
                table[i] = NULL_BLOCK
                i -= 1

    def roll_back(self, seq: Sequence, num_tokens: int) -> None:
        """seq's tokens from num_tokens on are replaced (a draft model's rejected guesses):
        its blocks past them leave the prefix cache (their KV will be overwritten) and its
        memoised hashes are cut. Set seq.num_computed_tokens <= num_tokens with it."""
        keep = num_tokens // self.block_size
        del seq.block_hashes[keep:]
        state = self.seqs.get(seq.seq_id)
        if state is None or state.num_cached <= keep:
            return
        for pool, table in zip(self.pools, state.tables):
            for b in table[keep: state.num_cached]:
                if b != NULL_BLOCK and b in pool.hash_of:
                    assert pool.ref[b] == 1, "a shared block cannot hold a guess"
                    del pool.cached[pool.hash_of.pop(b)]
        state.num_cached = keep

    # -- release and stats -----------------------------------------------------------------
    def free(self, seq: Sequence) -> None:
        """Release seq's blocks (its computed full blocks stay cached). Tail blocks first, so
        that the LRU list evicts a prefix's tail before its head."""
        state = self.seqs.pop(seq.seq_id, None)
        if state is None:
            return
        self._cache_computed(seq, state)
        for pool, table in zip(self.pools, state.tables):
            for b in reversed(table):
                if b != NULL_BLOCK:
                    pool.release(b)

    def usage(self) -> float:
        """Fraction of blocks (all groups, null blocks excluded) held by sequences."""
        return sum(p.num_used() for p in self.pools) / sum(p.num_blocks - 1 for p in self.pools)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def check_integrity(self) -> None:
        """Each pool is consistent, and a block's refcount is the number of tables holding it."""
        for g, pool in enumerate(self.pools):
            pool.check_integrity()
            counts = [0] * pool.num_blocks
            for state in self.seqs.values():
                for b in state.tables[g]:
                    counts[b] += b != NULL_BLOCK
            assert counts == pool.ref, f"group {g}: refcounts differ from the block tables"
        for seq_id, state in self.seqs.items():
            assert len({len(t) for t in state.tables}) == 1, f"{seq_id}: tables differ in length"
