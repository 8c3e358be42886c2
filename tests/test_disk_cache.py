"""The prefix cache's disk tier (engine/disk_cache.py): a block read back is the block written,
anything else about a file (torn, flipped, truncated, stale, foreign) makes it a miss that is
recomputed, the directory stays within its bound, and an engine restarted on the directory
gives the same bits as a cold one while computing only what the disk lacks."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ostinato.engine.disk_cache import HEADER_BYTES, DiskKVCache, namespace_key
from ostinato.engine.kv_cache import KVCacheManager, hash_block
from ostinato.engine.sequence import Sequence
from ostinato.params import SamplingParams

NS = namespace_key("test", 1)
SIZES = [64, 48]                 # payload bytes per group


def _disk(root, max_bytes=1 << 20, ns=NS) -> DiskKVCache:
    return DiskKVCache(root, ns, SIZES, max_bytes)


def _h(i: int) -> bytes:
    return hash_block(None, [i])


def _payload(g: int, i: int) -> bytes:
    return bytes((i * 7 + j + g) % 256 for j in range(SIZES[g]))


def _files(d: DiskKVCache) -> list:
    return sorted(p for p in d.dir.rglob("*.kv"))


def test_round_trip_and_restart(tmp_path):
    d = _disk(tmp_path)
    for i in range(5):
        d.put(0, _h(i), _payload(0, i))
    d.put(1, _h(0), _payload(1, 0))
    d.flush()
    assert d.stats.blocks_written == 6 and len(_files(d)) == 6
    assert d.read(0, _h(3)) == _payload(0, 3)
    assert d.read(1, _h(0)) == _payload(1, 0)
    assert d.read(1, _h(1)) is None and not d.contains(1, _h(1))
    d.close()
    again = _disk(tmp_path)                        # a restart indexes what is there
    assert again.num_blocks == 6 and again.contains(0, _h(4))
    assert again.read(0, _h(4)) == _payload(0, 4)


def test_read_many_reads_in_order_and_times_the_whole(tmp_path):
    d = _disk(tmp_path)
    for i in range(6):
        d.put(0, _h(i), _payload(0, i))
    d.flush()
    keys = [(0, _h(i)) for i in (5, 0, 9, 3)]
    assert d.read_many(keys) == [_payload(0, 5), _payload(0, 0), None, _payload(0, 3)]
    assert d.stats.blocks_read == 3 and d.stats.read_seconds > 0
    d.close()


def test_put_refuses_a_payload_of_the_wrong_size(tmp_path):
    with pytest.raises(ValueError, match="48 bytes"):
        _disk(tmp_path).put(1, _h(0), b"x" * 47)


def _corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[HEADER_BYTES + 5] ^= 1
    elif how == "truncate":
        data = data[:-1]
    elif how == "header":
        data[0] ^= 0xFF
    elif how == "longer":
        data += b"\0"
    elif how == "empty":
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate", "header", "longer", "empty"])
def test_a_damaged_file_is_a_miss_and_is_removed(tmp_path, how):
    d = _disk(tmp_path)
    d.put(0, _h(1), _payload(0, 1))
    d.flush()
    (path,) = _files(d)
    _corrupt(path, how)
    assert d.read(0, _h(1)) is None
    assert d.stats.blocks_rejected == 1 and not path.exists() and not d.contains(0, _h(1))


def test_a_file_under_another_blocks_name_is_not_used(tmp_path):
    """A file renamed (or copied) to another hash's name carries its own hash inside."""
    d = _disk(tmp_path)
    d.put(0, _h(1), _payload(0, 1))
    d.flush()
    d.close()
    (path,) = _files(d)
    other = d._path(0, _h(2))
    other.parent.mkdir(exist_ok=True)
    shutil.copy(path, other)
    d = _disk(tmp_path)
    assert d.contains(0, _h(2)) and d.read(0, _h(2)) is None
    assert d.stats.blocks_rejected == 1
    assert d.read(0, _h(1)) == _payload(0, 1)


def test_another_models_namespace_is_never_read(tmp_path):
    """A foreign file copied into our namespace under a valid name is refused by its header."""
    theirs = _disk(tmp_path, ns=namespace_key("another model"))
    theirs.put(0, _h(1), _payload(0, 9))
    theirs.flush()
    theirs.close()
    ours = _disk(tmp_path)
    assert not ours.contains(0, _h(1))
    target = ours._path(0, _h(1))
    target.parent.mkdir(exist_ok=True)
    shutil.copy(_files(theirs)[0], target)
    ours = _disk(tmp_path)
    assert ours.contains(0, _h(1)) and ours.read(0, _h(1)) is None


def test_hostile_entries_are_never_read_nor_fatal(tmp_path):
    """A folder or a link under a block's name, a huge file, an unreadable file."""
    d = _disk(tmp_path)
    d.put(0, _h(1), _payload(0, 1))
    d.put(0, _h(2), _payload(0, 2))
    d.flush()
    d.close()
    folder, link = d._path(0, _h(3)), d._path(0, _h(4))
    for p in (folder, link):
        p.parent.mkdir(exist_ok=True)
    folder.mkdir()
    link.symlink_to(_files(d)[0])
    huge = d._path(0, _h(1))
    with open(huge, "ab") as f:
        f.truncate(1 << 30)                         # sparse: 1 GiB long, one page written
    d = _disk(tmp_path, max_bytes=2 << 30)
    assert not d.contains(0, _h(3)) and not d.contains(0, _h(4))
    assert d.read(0, _h(1)) is None and not huge.exists()      # read no further than a block
    os.chmod(d._path(0, _h(2)), 0)
    if os.geteuid() != 0:                            # root reads it anyway
        assert d.read(0, _h(2)) is None
    assert d.read(0, _h(9)) is None


def test_temporary_files_of_dead_writers_are_removed(tmp_path):
    d = _disk(tmp_path)
    d.close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    sub = d.dir / "ab"
    sub.mkdir()
    stale = sub / f"0-{'ab' * 32}.kv.{dead}.tmp"
    live = sub / f"0-{'ab' * 32}.kv.{os.getppid()}.tmp"       # pytest's parent: alive
    stale.write_bytes(b"torn")
    live.write_bytes(b"being written")
    d = _disk(tmp_path)
    assert not stale.exists() and live.exists() and d.num_blocks == 0


def test_the_bound_evicts_least_recently_used_first(tmp_path):
    per_file = HEADER_BYTES + SIZES[0]
    d = _disk(tmp_path, max_bytes=3 * per_file)
    for i in range(3):
        d.put(0, _h(i), _payload(0, i))
        d.flush()
    assert d.read(0, _h(0)) is not None           # 0 is now the most recently used
    d.put(0, _h(3), _payload(0, 3))
    d.flush()
    assert [d.contains(0, _h(i)) for i in range(4)] == [True, False, True, True]
    assert len(_files(d)) == 3 and d.num_bytes == 3 * per_file and d.stats.evicted == 1


def test_the_bound_counts_other_namespaces_and_evicts_them_first(tmp_path):
    per_file = HEADER_BYTES + SIZES[0]
    old = _disk(tmp_path, max_bytes=10 * per_file, ns=namespace_key("old model"))
    for i in range(3):
        old.put(0, _h(i), _payload(0, i))
    old.close()
    d = _disk(tmp_path, max_bytes=4 * per_file)
    assert d.num_bytes == 3 * per_file
    for i in range(3):
        d.put(0, _h(10 + i), _payload(0, i))
    d.flush()
    assert d.num_blocks == 3 and len(list(old.dir.rglob("*.kv"))) == 1
    assert d.num_bytes <= 4 * per_file


def test_a_slow_writer_drops_blocks_instead_of_queueing_without_bound(tmp_path):
    d = DiskKVCache(tmp_path, NS, SIZES, 1 << 20, max_pending_bytes=2 * SIZES[0])
    blocked = __import__("threading").Event()
    real = d._write

    def slow(*a):
        blocked.wait(5)
        real(*a)
    d._write = slow
    for i in range(5):
        d.put(0, _h(i), _payload(0, i))
    assert d.stats.blocks_dropped == 3
    blocked.set()
    d.flush()
    assert d.num_blocks == 2


# -- the block manager's side (pure Python) -----------------------------------------------------
def _seq(ids: list[int]) -> Sequence:
    return Sequence("s/0", "s", 0, ids, SamplingParams(max_tokens=4), 4)


class FakeTier:
    def __init__(self, keys=()):
        self.keys = set(keys)
        self.loaded: list = []

    def has(self, g, h):
        return (g, h) in self.keys

    def load(self, g, h):
        def fill(block):
            self.loaded.append((g, h, block))
            return (g, h) in self.keys
        return fill


def _chain(ids, bs, n):
    hs, prev = [], None
    for i in range(n):
        prev = hash_block(prev, ids[i * bs:(i + 1) * bs])
        hs.append(prev)
    return hs


def test_lower_tier_blocks_extend_the_prefix_and_become_hits():
    bs, ids = 4, list(range(1, 23))               # 22 tokens: 5 full blocks before the last
    kv = KVCacheManager([16], bs, [None])
    kv.track_new_cached()
    hs = _chain(ids, bs, 5)
    tier = FakeTier({(0, h) for h in hs[:4]})
    seq = _seq(ids)
    assert kv.find_cached_prefix(seq) == 0
    want = kv.lower_tier_blocks(seq, tier.has)
    assert want == [(0, h) for h in hs[:4]]
    for g, h in want:
        assert kv.fill_block(g, h, tier.load(g, h))
    assert kv.take_new_cached() == []               # read from below: nothing to write back
    assert kv.find_cached_prefix(seq) == 16
    assert kv.pools[0].num_used() == 0              # filled blocks wait, unused, as cached
    kv.check_integrity()


def test_a_failed_fill_leaves_the_block_free():
    kv = KVCacheManager([8], 4, [None])
    h = hash_block(None, [1, 2, 3, 4])
    assert not kv.fill_block(0, h, lambda b: False)
    assert kv.pools[0].lookup(h) is None and kv.pools[0].num_available() == 7
    kv.check_integrity()


def test_sliding_groups_ask_only_for_blocks_in_the_window():
    bs, ids = 4, list(range(1, 40))                 # 9 full blocks before the last token
    kv = KVCacheManager([32, 32], bs, [None, 8])
    hs = _chain(ids, bs, 9)
    tier = FakeTier({(g, h) for g in (0, 1) for h in hs})
    want = kv.lower_tier_blocks(_seq(ids), tier.has)
    lo = (36 - 8 + 1) // bs                         # first block the window at 36 sees
    assert want == [(g, hs[i]) for i in range(9) for g in (0, 1) if g == 0 or i >= lo]


def test_the_ram_part_of_a_prefix_is_refreshed_not_evicted():
    bs, ids = 4, list(range(1, 14))
    kv = KVCacheManager([5], bs, [None])            # 4 usable blocks
    hs = _chain(ids, bs, 3)
    seq = _seq(ids)
    assert kv.fill_block(0, hs[0], lambda b: True)  # RAM holds block 0 ...
    for i in range(2):                              # ... and two unrelated cached blocks
        assert kv.fill_block(0, hash_block(None, [99, i]), lambda b: True)
    tier = FakeTier({(0, h) for h in hs})
    want = kv.lower_tier_blocks(seq, tier.has)      # refreshes block 0 to the recent end
    assert want == [(0, hs[1]), (0, hs[2])]
    for g, h in want:
        assert kv.fill_block(g, h, tier.load(g, h))  # the second one evicts an unrelated block
    assert kv.find_cached_prefix(seq) == 12


# -- the engine: a restart on the directory gives cold bits ------------------------------------
def _generate(path, prompts, params, **kw):
    from ostinato.llm import LLM
    # one thread: on 2 (next to the disk writer's thread) the restart tests took 21 s instead
    # of 30 s on a quiet 2-core machine, but 193 s instead of 45 s with one busy neighbour
    llm = LLM(path, threads=1, max_model_len=2048, kv_cache_gb=0.25, **kw)
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    disk = llm.engine.disk
    if disk is not None:
        disk.close()
    kv = llm.engine.scheduler.kv
    return [(o.token_ids, o.logprobs) for o in outs], disk, kv.prefix_hits


@pytest.mark.parametrize("model", ["smollm_path", "gemma_path"])
def test_a_restart_reads_the_prefix_and_gives_the_cold_bits(request, tmp_path, model):
    """Gemma's sliding layers keep only their window's blocks; chunking differs between runs."""
    path = request.getfixturevalue(model)
    # 936 tokens: past Gemma's 512-token window, 58 blocks of 16 (90 lines, 1413, took 1.5x)
    text = " ".join(f"line {i}: the value of x{i} is {i * i % 97}." for i in range(60))
    prompts = [text + " What is x7?", text + " Which value is largest?"]
    params = [SamplingParams(max_tokens=6, temperature=0, logprobs=3),
              SamplingParams(max_tokens=6, temperature=0.8, seed=5, logprobs=2)]
    cold, _, cold_hits = _generate(path, prompts, params, enable_prefix_caching=False)
    first, disk, _ = _generate(path, prompts, params, kv_cache_dir=tmp_path,
                               max_num_batched_tokens=96)
    assert first == cold and disk.stats.blocks_written > 40
    again, disk, hits = _generate(path, prompts, params, kv_cache_dir=tmp_path)
    assert again == cold
    assert disk.stats.blocks_read > 40 and disk.stats.blocks_rejected == 0 and hits > 1000
    files = sorted(disk.dir.rglob("*.kv"))
    for f in files[::3]:                            # a third of the files damaged
        _corrupt(f, "flip")
    damaged, disk, _ = _generate(path, prompts, params, kv_cache_dir=tmp_path)
    assert damaged == cold and disk.stats.blocks_rejected > 0


def test_two_processes_share_a_folder(tmp_path):
    """A block another process wrote after this one started is found; one it removed is a miss."""
    ours, theirs = _disk(tmp_path), _disk(tmp_path)
    theirs.put(0, _h(7), _payload(0, 7))
    theirs.flush()
    assert ours.contains(0, _h(7)) and ours.read(0, _h(7)) == _payload(0, 7)
    ours._path(0, _h(7)).unlink()
    assert theirs.read(0, _h(7)) is None and not theirs.contains(0, _h(7))
    assert theirs.stats.blocks_rejected == 0
