"""The kernels' build directory survives an interrupted compile."""
from __future__ import annotations

import subprocess
import sys

from ostinato.hub import home
from ostinato.kernels import _cpu_key, _snapshot, _sources, ops


def test_a_stale_build_lock_does_not_stop_the_next_start():
    """A compile killed mid-way (Ctrl-C at a first start) leaves torch's lock file behind;
    the next start waited on it for ever (a server answering 503 'still loading' without
    end). Now it removes it, under a lock the OS releases when its holder dies, and loads."""
    ops()                                            # this process's build exists
    build = home() / "kernels" / _cpu_key()
    (build / "lock").touch()                         # what the killed compile left
    code = "from ostinato.kernels import ops; ops(); print('loaded')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]
    assert "stale build lock" in r.stderr
    assert not (build / "lock").exists()


def test_the_compiler_reads_the_sources_the_build_key_was_taken_from(tmp_path):
    """The build is keyed by a hash of the sources; the compiler reads a copy written beside
    the build from the very bytes hashed, so an edit or upgrade of the package while g++
    runs cannot leave a build under a key that is not its own. An unchanged copy is left
    alone (a new mtime would make the build tool compile again)."""
    ops()
    src = home() / "kernels" / _cpu_key() / "src"
    now = _sources()
    assert {f.name: f.read_bytes() for f in src.iterdir()} == now
    first = _snapshot(tmp_path, {"a.h": b"one", "ops.cpp": b"two"})
    stamp = (first / "a.h").stat().st_mtime_ns
    _snapshot(tmp_path, {"a.h": b"one", "ops.cpp": b"three"})
    assert (first / "a.h").stat().st_mtime_ns == stamp
    assert (first / "ops.cpp").read_bytes() == b"three"
