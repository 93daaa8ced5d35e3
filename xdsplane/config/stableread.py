"""Reading a file only when no writer is part-way through it.

A file that is open for writing by any process may be half-written. On Linux a read
lease (``F_SETLEASE`` with ``F_RDLCK``) can only be taken on a file that no process holds
open for writing, which makes it an exact, cheap test: the lease is taken and released at
once (never held while reading), then the file is read and its size and times compared
before and after. Where leases are not allowed (another owner's file without CAP_LEASE, some
network file systems), only the before/after comparison is made.

While a lease is held the kernel signals SIGIO to its holder when a writer opens the file;
SIGIO's default action ends the process, so leases are only taken once ``install()`` has
set SIGIO to be ignored (``xdsplane serve`` and ``validate`` do, from the main thread).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)


class FileBusy(Exception):
    """The file is being written right now; read it again shortly."""


# The one budget for files being written (documented in docs/deploy.md, "Reloads"): every
# load, at startup, on a reload (xdsplane/reload.py) or in a command, waits this long.
BUSY_BUDGET_SECONDS = 5.0
BUSY_RETRY_SECONDS = 0.01


def retry_busy(
    load: Callable[[], T],
    seconds: float = BUSY_BUDGET_SECONDS,
    step: float = BUSY_RETRY_SECONDS,
) -> T:
    """``load()``, called again while it raises FileBusy, for up to ``seconds``.

    For loads outside an event loop (startup, ``validate``, ``render``, ``diff``): a writer
    part-way through a file is waited for; after ``seconds`` the last FileBusy is raised.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return load()
        except FileBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(step)


def install() -> None:
    """Allow lease probes in this process (call from the main thread)."""
    if hasattr(signal, "SIGIO"):
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def _leases_allowed() -> bool:
    return hasattr(signal, "SIGIO") and signal.getsignal(signal.SIGIO) == signal.SIG_IGN


def _probe_writers(fd: int, path: str) -> None:
    if not _leases_allowed():
        return
    try:
        fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        if e.errno == errno.EAGAIN:
            raise FileBusy(f"{path}: the file is open for writing by another process") from None
        return  # leases not available here: fall back to the stat comparison
    fcntl.fcntl(fd, _F_SETLEASE, fcntl.F_UNLCK)


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def read_stable(path: str, limit: int = 64 * 1024 * 1024) -> bytes:
    """The whole content of ``path``, as no writer left it part-way.

    Raises FileBusy when a writer has it open or it changed while being read, and OSError
    for anything else (missing, a directory, permission denied).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        before = os.fstat(fd)
        if not _is_regular(before.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
        if before.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        _probe_writers(fd, path)
        chunks = []
        total = 0
        # The whole file in one read (its size, plus one byte to see it end): one chunk is
        # returned as it is, not copied by the join below (0.45 ms for a 1.5 MB file).
        want = before.st_size + 1
        while True:
            chunk = os.read(fd, want)
            want = 1 << 20
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", path)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if _stamp(before) != _stamp(after) or len(data) != after.st_size:
        raise FileBusy(f"{path}: the file changed while it was read")
    try:
        current = os.stat(path)
    except FileNotFoundError:
        raise FileBusy(f"{path}: the file was replaced while it was read") from None
    if current.st_ino != after.st_ino or current.st_dev != after.st_dev:
        raise FileBusy(f"{path}: the file was replaced while it was read")
    return data


def _is_regular(mode: int) -> bool:
    import stat

    return stat.S_ISREG(mode)
