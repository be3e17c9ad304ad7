"""Per-entry file locks for a cache directory that many processes (and pods) share.

A cache entry `<dir>/<name>` has a lock file `<dir>/<name>.lock` beside it, locked with
`fcntl.flock`:

  * exclusive while the entry is being created, replaced or deleted (one writer at a time,
    and a partial download belongs to whoever holds this lock, whatever its PID);
  * shared while a process uses the entry: `EntryLock.hold_shared` keeps it until the
    process exits (the kernel drops it even on SIGKILL) or `release_all` is called, so a
    pruner, which only ever tries a non-blocking exclusive lock, never deletes an entry that
    a live process is using.

Deleting a lock file is safe: a process that opened it before it was unlinked notices after
locking that the path now names another inode (or none) and starts again.

On a ReadWriteMany volume over NFS, Linux emulates flock with whole-file POSIX locks
(NFSv4 or NFSv3 with lockd); a lock of a node that vanished is released when the server's
lease expires (about 90 s), and a volume mounted with `local_lock=flock` (or `nolock`)
does not lock across nodes at all (docs/storage.md).

stdlib only: `lastmile.modeling` uses it without importing the S3 client.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

LOCK_SUFFIX = ".lock"

_HELD: dict[str, "EntryLock"] = {}
_HELD_LOCK = threading.Lock()


def lock_path(entry: Path) -> Path:
    return entry.with_name(entry.name + LOCK_SUFFIX)


class EntryLock:
    """The flock on `<entry>.lock`: shared, exclusive or none, through one open file.

    Not thread-safe on its own: callers serialise use of one entry within a process
    (`thread_lock`), because flock on one open file is one lock for all its threads.
    """

    def __init__(self, entry: Path):
        self.entry = Path(entry)
        self.path = lock_path(self.entry)
        self.fd: int | None = None
        self.mode: int | None = None  # fcntl.LOCK_SH, fcntl.LOCK_EX or None
        self.thread_lock = threading.RLock()

    def _lock(self, mode: int, blocking: bool) -> bool:
        """Take `mode` on the file currently at self.path; False if non-blocking and busy."""
        self.unlock()  # never convert in place: flock conversion is not atomic anyway
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Opened for writing: NFS emulates an exclusive flock with a write lock, which
            # needs it. All processes sharing a cache must be able to write its directories.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, mode | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd, self.mode = fd, mode
                return True
            os.close(fd)  # a deleter unlinked it while we waited: lock the new file

    def shared(self) -> None:
        if self.mode != fcntl.LOCK_SH:
            self._lock(fcntl.LOCK_SH, blocking=True)

    def exclusive(self, blocking: bool = True) -> bool:
        if self.mode == fcntl.LOCK_EX:
            return True
        return self._lock(fcntl.LOCK_EX, blocking)

    def unlock(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor of the open file drops the lock
        self.fd, self.mode = None, None

    def delete_entry_files(self) -> None:
        """With the exclusive lock held: unlink the lock file, then let it go."""
        assert self.mode == fcntl.LOCK_EX
        self.path.unlink(missing_ok=True)
        self.unlock()


def entry_lock(entry: Path) -> EntryLock:
    """This process's one EntryLock for `entry` (created on first use)."""
    key = os.path.abspath(entry)
    with _HELD_LOCK:
        lock = _HELD.get(key)
        if lock is None:
            lock = _HELD[key] = EntryLock(Path(key))
        return lock


def held_by_this_process(entry: Path) -> bool:
    with _HELD_LOCK:
        lock = _HELD.get(os.path.abspath(entry))
    return lock is not None and lock.mode is not None


def release_all() -> None:
    """Drop every lock this process holds (what exiting does); for long-lived processes."""
    with _HELD_LOCK:
        locks = list(_HELD.values())
        _HELD.clear()
    for lock in locks:
        lock.unlock()


def try_delete(entry: Path, delete) -> bool:
    """Run `delete()` (which removes `entry`) only if no process holds `entry`'s lock, then
    remove the lock file; False, touching nothing, when the entry is in use."""
    if held_by_this_process(entry):
        return False
    probe = EntryLock(entry)
    if not probe.exclusive(blocking=False):
        return False
    try:
        delete()
        probe.delete_entry_files()
    finally:
        probe.unlock()
    return True


def _forget_after_fork() -> None:
    # A forked child shares its parent's open lock files: flock(LOCK_UN) there would unlock
    # the parent too. Closing the child's copies does not (the parent's stay open); the child
    # takes its own locks as it needs them.
    global _HELD_LOCK
    for lock in _HELD.values():
        if lock.fd is not None:
            os.close(lock.fd)
    _HELD.clear()
    _HELD_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
