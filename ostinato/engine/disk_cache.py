"""The prefix cache's disk tier: full KV blocks kept in files, so that a prompt seen before a
restart (or evicted from RAM since) is read back instead of computed again. Pure Python.

A block is stored under its chain hash (kv_cache.hash_block: equal hashes, equal token
prefixes) and its KV-cache group, inside a namespace directory named by a hash of everything
else that decides its bytes: the model file, the kernel build, the cache dtype and layout
(`namespace_key`). A file is

    header  MAGIC | namespace (32 B) | block hash (32 B) | group (u32) | payload bytes (u64)
            | crc32 of the payload (u32)
    payload the block's bytes, as the runner lays them out (ModelRunner.block_payload)

and is trusted only when all of it checks out: a torn, truncated, flipped, stale or foreign
file is deleted and its block computed, never used. Files are written whole to a temporary
name and renamed, so a kill -9 mid-write leaves at worst a temporary file, removed at the next
start. The directory is bounded (max_bytes, every namespace together): least recently used
files go first; a read refreshes a file's time, so the order survives restarts. Several
processes may share a folder (replicas): a block another one wrote is found on lookup, a file
another one removed is a miss; each bounds the folder by what it has seen of it.

Writes happen on a thread of their own, from copies taken on the engine thread; a step never
waits for the disk. When the writer falls behind by more than `max_pending_bytes`, new blocks
are dropped (counted, and said once in the log), never queued without bound.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ostinato.engine")

MAGIC = b"OSTKV\x01\x00\x00"
_HEADER = struct.Struct("<8s32s32sIQI")
HEADER_BYTES = _HEADER.size
_SUFFIX = ".kv"
_TMP = ".tmp"
READ_THREADS = 4


def namespace_key(*parts: object) -> bytes:
    """32 bytes naming what decides a block's bytes (model hash, kernel build, dtype, layout)."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


@dataclass
class DiskStats:
    blocks_written: int = 0
    blocks_dropped: int = 0        # not written: the writer was behind
    blocks_read: int = 0
    blocks_rejected: int = 0       # files that failed a check (deleted, recomputed)
    bytes_written: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0
    write_errors: int = 0
    evicted: int = 0               # files removed to stay within max_bytes


def _files_under(root: Path):
    """Regular files below root (not following links); unreadable folders are skipped."""
    for top, _, names in os.walk(root, onerror=lambda e: None):
        for name in names:
            path = Path(top, name)
            if path.is_file() and not path.is_symlink():
                yield path


class DiskKVCache:
    def __init__(self, root: str | os.PathLike, namespace: bytes, block_bytes: list[int],
                 max_bytes: int, max_pending_bytes: int = 256 << 20):
        """block_bytes: payload size of one block, per KV-cache group."""
        if max_bytes <= 0:
            raise ValueError(f"the disk tier needs a positive size, got {max_bytes} bytes")
        self.root, self.namespace = Path(root), namespace
        self.dir = self.root / namespace.hex()[:32]
        self.block_bytes, self.max_bytes = list(block_bytes), max_bytes
        self.stats = DiskStats()
        self._lock = threading.Lock()              # guards _index, _bytes, stats' writes
        self._index: OrderedDict[tuple[int, bytes], int] = OrderedDict()   # LRU first -> size
        self._bytes = 0                            # ours and other namespaces' files
        self._foreign: list[tuple[float, Path, int]] = []   # (mtime, path, size), oldest first
        self._pending: set[tuple[int, bytes]] = set()
        self._pending_bytes, self.max_pending_bytes = 0, max_pending_bytes
        self._said_behind = False
        self._readers: ThreadPoolExecutor | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f"probe.{os.getpid()}{_TMP}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"the KV cache directory {self.root} is not a writable "
                             f"folder: {e}") from None
        self._scan()
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="ostinato-kv-disk",
                                        daemon=True)
        self._writer.start()

    # -- start-up ----------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index our files and size everyone's; remove dead writers' temporary files; trim
        to max_bytes, oldest first."""
        ours, theirs = [], []
        for path in _files_under(self.root):
            if path.name.endswith(_TMP):
                self._remove_stale_tmp(path)
                continue
            try:
                st = path.stat()
            except OSError:
                continue
            key = self._key_of(path) if path.parent.parent == self.dir else None
            (ours if key else theirs).append((st.st_mtime, path, st.st_size, key))
        for mtime, path, size, key in sorted(ours, key=lambda e: e[0]):
            self._index[key] = size
            self._bytes += size
        for mtime, path, size, _ in sorted(theirs, key=lambda e: e[0]):
            self._foreign.append((mtime, path, size))
            self._bytes += size
        with self._lock:
            self._trim(0)
        log.info("KV disk tier %s: %d blocks of this model, %.1f MB in all (bound %.1f MB)",
                 self.dir, len(self._index), self._bytes / 1e6, self.max_bytes / 1e6)

    @staticmethod
    def _remove_stale_tmp(path: Path) -> None:
        """name.<pid>.tmp: left by a writer that died (kill -9) unless that pid still runs."""
        try:
            pid = int(path.name.rsplit(".", 2)[-2])
            if pid != os.getpid():
                os.kill(pid, 0)
                return                    # a live process is writing it
        except (ValueError, IndexError, ProcessLookupError):
            pass
        except PermissionError:
            return
        path.unlink(missing_ok=True)

    def _key_of(self, path: Path) -> tuple[int, bytes] | None:
        """(group, hash) from 'g-<hex>.kv'; None for a name we did not write."""
        name = path.name
        if not name.endswith(_SUFFIX):
            return None
        g, _, hexhash = name[: -len(_SUFFIX)].partition("-")
        try:
            key = (int(g), bytes.fromhex(hexhash))
        except ValueError:
            return None
        ok = len(key[1]) == 32 and 0 <= key[0] < len(self.block_bytes)
        return key if ok and path.parent.name == key[1].hex()[:2] else None

    def _path(self, g: int, h: bytes) -> Path:
        return self.dir / h.hex()[:2] / f"{g}-{h.hex()}{_SUFFIX}"

    # -- lookups and reads -------------------------------------------------------------------
    def contains(self, g: int, h: bytes) -> bool:
        """Indexed, or written since by another process sharing the folder (then indexed)."""
        if (g, h) in self._index:
            return True
        path = self._path(g, h)
        try:
            st = path.lstat()
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        with self._lock:
            if (g, h) not in self._index:
                self._index[(g, h)] = st.st_size
                self._bytes += st.st_size
        return True

    def read(self, g: int, h: bytes, timed: bool = True) -> bytes | None:
        """Group g's block of hash h, checked; None (and the file gone) if anything is off.
        timed: add its time to stats.read_seconds (read_many times its reads together)."""
        path, t0 = self._path(g, h), time.perf_counter()
        try:
            with open(path, "rb") as f:
                data = f.read(HEADER_BYTES + self.block_bytes[g] + 1)
        except OSError:
            self._forget(g, h, path, rejected=False)
            return None
        payload = self._check(g, h, data)
        if payload is None:
            log.warning("KV disk tier: %s failed its checks; removed, the block is computed",
                        path)
            self._forget(g, h, path, rejected=True)
            return None
        with self._lock:
            if (g, h) in self._index:
                self._index.move_to_end((g, h))
            self.stats.blocks_read += 1
            self.stats.bytes_read += len(data)
            if timed:
                self.stats.read_seconds += time.perf_counter() - t0
        try:
            os.utime(path)
        except OSError:
            pass
        return payload

    def read_many(self, keys: list[tuple[int, bytes]]) -> list[bytes | None]:
        """read() of each (group, hash), several at a time (the device serves a queue of
        reads faster than one after another; the checksums run outside the GIL)."""
        if len(keys) < 2:
            return [self.read(g, h) for g, h in keys]
        if self._readers is None:
            self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="ostinato-kv-read")
        t0 = time.perf_counter()
        out = list(self._readers.map(lambda k: self.read(*k, timed=False), keys))
        with self._lock:
            self.stats.read_seconds += time.perf_counter() - t0     # wall time, not the sum
        return out

    def _check(self, g: int, h: bytes, data: bytes) -> bytes | None:
        if len(data) != HEADER_BYTES + self.block_bytes[g]:
            return None
        magic, ns, hh, group, n, crc = _HEADER.unpack_from(data)
        payload = data[HEADER_BYTES:]
        ok = (magic == MAGIC and ns == self.namespace and hh == h and group == g
              and n == len(payload) and zlib.crc32(payload) == crc)
        return payload if ok else None

    def _forget(self, g: int, h: bytes, path: Path, rejected: bool) -> None:
        with self._lock:
            size = self._index.pop((g, h), None)
            if size is not None:
                self._bytes -= size
            self.stats.blocks_rejected += rejected
        try:
            path.unlink(missing_ok=True)
        except OSError:          # a directory or a file we may not remove: left, never read
            pass

    # -- writes ------------------------------------------------------------------------------
    def wants(self, g: int, h: bytes) -> bool:
        """Whether put(g, h, ...) would do anything (so the caller can skip the copy)."""
        return (g, h) not in self._index and (g, h) not in self._pending

    def put(self, g: int, h: bytes, payload: bytes) -> None:
        """Queue a block for writing; payload: the block's bytes, a copy the caller gives up."""
        if len(payload) != self.block_bytes[g]:
            raise ValueError(f"a group-{g} block has {self.block_bytes[g]} bytes, "
                             f"not {len(payload)}")
        if not self.wants(g, h):
            return
        if self._pending_bytes + len(payload) > self.max_pending_bytes:
            self.stats.blocks_dropped += 1
            if not self._said_behind:
                self._said_behind = True
                log.warning("KV disk tier: the writer is %d MB behind; blocks are dropped "
                            "(not persisted) until it catches up", self._pending_bytes >> 20)
            return
        with self._lock:
            self._pending.add((g, h))
            self._pending_bytes += len(payload)
        self._queue.put((g, h, payload))

    def flush(self) -> None:
        """Wait until every queued block is written."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=10)
        if self._readers is not None:
            self._readers.shutdown()

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            g, h, payload = item
            try:
                self._write(g, h, payload)
            except OSError as e:
                self.stats.write_errors += 1
                if self.stats.write_errors == 1 or self.stats.write_errors % 1000 == 0:
                    log.warning("KV disk tier: %d block writes failed so far (blocks are "
                                "then only computed), the latest: %s",
                                self.stats.write_errors, e)
            finally:
                with self._lock:
                    self._pending.discard((g, h))
                    self._pending_bytes -= len(payload)
                self._queue.task_done()
        self._queue.task_done()

    def _write(self, g: int, h: bytes, payload: bytes) -> None:
        size = HEADER_BYTES + len(payload)
        with self._lock:
            if not self._trim(size):
                self.stats.blocks_dropped += 1
                return
        path = self._path(g, h)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}{_TMP}")
        header = _HEADER.pack(MAGIC, self.namespace, h, g, len(payload), zlib.crc32(payload))
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        with self._lock:
            if (g, h) not in self._index:
                self._index[(g, h)] = size
                self._bytes += size
            self.stats.blocks_written += 1
            self.stats.bytes_written += size

    def _trim(self, incoming: int) -> bool:
        """Remove least recently used files (other namespaces' first, they are stale to us)
        until `incoming` more bytes fit; False if they cannot. Holds self._lock."""
        if incoming > self.max_bytes:
            return False
        while self._bytes + incoming > self.max_bytes:
            if self._foreign:
                _, path, size = self._foreign.pop(0)
            elif self._index:
                (g, h), size = self._index.popitem(last=False)
                path = self._path(g, h)
            else:
                return False
            self._bytes -= size
            self.stats.evicted += 1
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        return True

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    @property
    def num_bytes(self) -> int:
        return self._bytes
