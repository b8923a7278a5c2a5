"""Issue 16 (item 4): cache locks that hold on shared filesystems (cleanloop.locks).

Two real processes contend for one step-cache entry. Beyond mutual exclusion, the lock must be a
byte-range (fcntl) lock, the kind NFS carries to the server, not a ``flock``: another process sees
it with ``F_GETLK``, which never reports a ``flock``. On Linux it is the open-file-description
kind (``l_pid`` reads -1), so closing another descriptor of the lock file in the holding process
does not drop it, as it would a classic POSIX lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

from cleanloop.cache import StepCache

CHILD = textwrap.dedent("""
    import fcntl, json, struct, sys, time
    from pathlib import Path
    from cleanloop import locks
    from cleanloop.cache import StepCache

    root = Path(sys.argv[1])
    with open(root / "oof" / "k.lock", "a") as f:
        free = locks.lock(f, blocking=False)  # the parent holds the claim: not free
        if sys.platform.startswith("linux"):  # who holds a byte-range lock on the file, if anyone
            got = fcntl.fcntl(f, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
            l_type, _, _, _, l_pid = struct.unpack("hhqqi4x", got)
        else:
            l_type = l_pid = None
    print(json.dumps({"free": free, "l_type": l_type, "l_pid": l_pid}), flush=True)
    with StepCache(root).claim("oof", "k"):
        acquired = time.time()
    print(json.dumps({"acquired": acquired}), flush=True)
""")


def test_two_processes_take_turns_on_one_cache_entry(tmp_path):
    cache = StepCache(tmp_path)
    with cache.claim("oof", "k"):
        # another descriptor of the lock file opened and closed here must not release the claim
        open(tmp_path / "oof" / "k.lock", "a").close()
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        probe = json.loads(child.stdout.readline() or "{}")
        assert probe, child.stderr.read()
        time.sleep(0.5)  # the child now waits in claim()
        released = time.time()
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert probe["free"] is False
    if sys.platform.startswith("linux"):
        import fcntl

        assert probe["l_type"] == fcntl.F_WRLCK  # a byte-range lock, visible to another process
        assert probe["l_pid"] == -1  # owned by an open file (OFD), not by the process
    assert json.loads(out)["acquired"] >= released  # the child got the entry only after the parent let go


def test_a_read_only_lock_file_takes_a_shared_lock(tmp_path):
    """cache-steps prune falls back to a read-only descriptor when it may not write the lock file."""
    from cleanloop import locks

    path = tmp_path / "x.lock"
    path.write_text("")
    with open(path) as a, open(path) as b, open(path, "a") as w:
        assert locks.lock(a, blocking=False) and locks.lock(b, blocking=False)  # readers share
        assert locks.lock(w, blocking=False) is False  # a writer waits for them
        locks.unlock(a)
        locks.unlock(b)
        assert locks.lock(w, blocking=False)
        assert locks.lock(a, blocking=False) is False  # and now readers wait for the writer
