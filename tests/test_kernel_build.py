"""The kernels' build directory survives an interrupted compile."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from ostinato.hub import home
from ostinato.kernels import _cpu_key, ops


def test_a_stale_build_lock_does_not_stop_the_next_start(tmp_path):
    """A compile killed mid-way (Ctrl-C at a first start) leaves torch's lock file behind;
    the next start waited on it for ever (a server answering 503 'still loading' without
    end). Now it removes it, under a lock the OS releases when its holder dies, and loads."""
    ops()                                            # this process's build exists
    build = tmp_path / "kernels" / _cpu_key()
    shutil.copytree(home() / "kernels" / _cpu_key(), build)   # mtimes kept: nothing to rebuild
    (build / "lock").touch()                         # what the killed compile left
    code = "from ostinato.kernels import ops; ops(); print('loaded')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "OSTINATO_HOME": str(tmp_path)}, timeout=600)
    assert r.returncode == 0 and "loaded" in r.stdout, r.stderr[-2000:]
    assert "stale build lock" in r.stderr
    assert not (build / "lock").exists()
