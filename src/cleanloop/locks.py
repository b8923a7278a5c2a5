"""File locks that hold across machines on a shared filesystem (NFS, Lustre, GPFS), not only on one.

cleanloop's caches (``paths.cache_dir``: the step cache, the image cache, the image-digest table)
are shared by parallel jobs, and SLURM users keep them on NFS. ``flock`` is a poor lock there: it
is local to one client on mounts with ``local_lock=flock`` (and on BeeGFS by default), and on other
mounts Linux emulates it with a byte-range lock, so behaviour depends on the mount. POSIX byte-range
locks (``fcntl``) are the kind NFS (NLM/lockd for v3, the protocol itself for v4), Lustre (mounted
``-o flock``) and GPFS carry to the server.

Classic POSIX locks belong to the process and are dropped when *any* descriptor of the file is
closed in it, so a second ``open`` of a lock file in one process would silently release a claim.
On Linux the open-file-description ("OFD") kind is used instead: the same byte-range lock on the
wire, but owned by the open file like ``flock`` (two opens in one process exclude each other, and
closing another descriptor releases nothing). Elsewhere (macOS) it falls back to ``flock``.

Every cleanloop lock goes through :func:`lock`/:func:`unlock`: locks of different kinds do not
exclude each other, so mixing them would let two jobs build one cache entry at once.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
from typing import IO

from cleanloop.errors import CleanloopError

# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (int), padding
_OFD = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLKW") and struct.calcsize("P") == 8
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


def _fd(file: int | IO) -> int:
    return file if isinstance(file, int) else file.fileno()


def _ofd(fd: int, cmd: int, kind: int) -> None:
    # l_start 0 and l_len 0: the whole file, however long it grows; l_pid must be 0 for OFD locks
    fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0))


def lock(file: int | IO, *, blocking: bool = True) -> bool:
    """Lock the whole of ``file`` (a descriptor or an open file): exclusively when it is open for
    writing, shared when read-only (a write lock needs a writable descriptor). Waits when
    ``blocking``; otherwise returns False at once when another open file holds a conflicting lock.

    Raises :class:`CleanloopError` when the filesystem keeps no locks at all.
    """
    global _OFD
    fd = _fd(file)
    writable = (fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE) != os.O_RDONLY
    try:
        if _OFD:
            try:
                _ofd(fd, fcntl.F_OFD_SETLKW if blocking else fcntl.F_OFD_SETLK,
                     fcntl.F_WRLCK if writable else fcntl.F_RDLCK)
                return True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                _OFD = False  # a kernel before 3.15: no OFD locks; flock is what is left
        fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as e:
        if not blocking and e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        if e.errno in _UNSUPPORTED:
            name = getattr(file, "name", f"descriptor {fd}")
            raise CleanloopError(
                f"{name}: this filesystem keeps no file locks ({e.strerror}), which parallel jobs need to share "
                "the cache: set paths.cache_dir to a folder on local disk (or mount NFS with locking, Lustre "
                "with -o flock)") from e
        raise


def unlock(file: int | IO) -> None:
    """Release :func:`lock` (closing the file releases it too)."""
    fd = _fd(file)
    if _OFD:
        _ofd(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
