"""Batch-invariant CPU kernels (C++/OpenMP torch extension, compiled on first use with the
machine's g++ and cached under $OSTINATO_HOME/kernels, keyed by source and CPU)."""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from contextlib import contextmanager
from functools import cache
from pathlib import Path

_CSRC = Path(__file__).parent / "csrc"
_SRC = _CSRC / "ops.cpp"          # one translation unit; it includes the csrc/*.h parts


def _sources() -> dict[str, bytes]:
    """The kernel sources as they are now, read once: the build key and the build both use
    this copy."""
    return {p.name: p.read_bytes() for p in sorted(_CSRC.glob("*.[ch]*"))}


def _cpu_key(sources: dict[str, bytes] | None = None) -> str:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    import torch
    code = b"".join((sources or _sources()).values())
    h = hashlib.sha256(code + flags.encode() + torch.__version__.encode()
                       + _march().encode())
    return h.hexdigest()[:16]


def _march() -> str:
    """The instruction set the kernels are built for: this CPU's own by default;
    OSTINATO_MARCH=haswell (say) builds the AVX2 paths, to test them on an AVX-512 machine
    or to make a build that runs on older CPUs."""
    return os.environ.get("OSTINATO_MARCH", "native")


@cache
def ops():
    """The compiled extension module (qlinear, rms_norm, qkv_rope_cache, gated_act,
    paged_attention, the Executor that replays the recorded decoder as one step, and amx_available/set_amx: whether
    the AMX tiles run batches of 6+ rows here, and a switch for tests and benchmarks)."""
    from torch.utils import cpp_extension

    from ..hub import home
    sources = _sources()
    build = home() / "kernels" / _cpu_key(sources)
    build.mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)     # ninja from the venv
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    with _build_lock(build), _compile_progress(not any(build.glob("*.so"))), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = _snapshot(build / "src", sources)
        return cpp_extension.load(
            name="ostinato_ops", sources=[str(src / _SRC.name)], build_directory=str(build),
            extra_cflags=["-O3", f"-march={_march()}", "-fopenmp", "-ffp-contract=off"],
            extra_ldflags=["-fopenmp"], verbose=False)


def _snapshot(dst: Path, sources: dict[str, bytes]) -> Path:
    """The sources the build key was computed from, written beside the build (files already
    there with the same bytes are left alone, so that the build tool sees nothing new): the
    compiler reads this copy, never the package's files, which may change while it runs (an
    upgrade, an edit) and would leave a build under a key that is not its own."""
    dst.mkdir(exist_ok=True)
    for name, code in sources.items():
        f = dst / name
        if not f.exists() or f.read_bytes() != code:
            f.write_bytes(code)
    return dst


@contextmanager
def _build_lock(build: Path):
    """One process at a time builds or loads `build`, under a lock the OS drops when its
    holder dies. torch's own lock is a file that the builder deletes when done: a build
    killed mid-way (Ctrl-C at a first start, a server stopped while it compiled) left it
    behind, and every later start waited on it for ever, a server answering 503 'still
    loading' without end (seen here). Under this lock no other Ostinato build runs, so
    such a file is stale: it is removed, with a line in the log."""
    try:
        import fcntl
    except ImportError:                  # not POSIX: torch's lock alone
        yield
        return
    with open(build / "ostinato.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        stale = build / "lock"
        if stale.exists():
            print(f"removing a stale build lock left by an interrupted compile: {stale}",
                  file=sys.stderr)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def _compile_progress(compiling: bool):
    """An elapsed-time bar while g++ runs (first use only; it takes ~30 s)."""
    if not compiling:
        yield
        return
    if not sys.stderr.isatty():          # logs get one line, not a ticking bar
        print("compiling Ostinato's CPU kernels (first run only, ~30 s) ...", file=sys.stderr)
        yield
        return
    from tqdm import tqdm
    done = threading.Event()
    bar = tqdm(desc="compiling Ostinato's CPU kernels (first run only)", unit="s",
               bar_format="{desc}: {elapsed}", file=sys.stderr)

    def tick():
        while not done.wait(0.5):
            bar.refresh()
    t = threading.Thread(target=tick, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        bar.close()
