"""Building a data directory from one snapshot file alone (docs/FORMAT.md "Journal base"): what a node that
rejoins its cluster gets (ledger.cluster.archive.rejoin), and the crash-safe build steps it shares with
`ledger restore` (ledger/restore.py): a temporary directory beside the destination, held with an flock while it
is built, fsynced, renamed into place without replacing anything, the parent fsynced.

Below the Python face (it imports no `ledger` handle), so the cluster node can rebuild its directory before it
opens one."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
import time
import warnings
from typing import Any

from ledger.format import (FORMAT_VERSION, RECORD_SIZE, SEGMENT_HEADER, SEGMENT_HEADER_CHECKSUM, SEGMENT_MAGIC,
                           segment_bytes, segment_name)
from ledger.snapshot import read_snapshot, write_journal_base, write_snapshot

__all__ = ["build_from_snapshot", "fsync_path", "remove_abandoned_stagings", "rename_no_replace",
           "restore_from_snapshot", "write_empty_segment"]

RENAME_NOREPLACE = 1   # renameat2's flag (linux/fs.h)
AT_FDCWD = -100


def fsync_path(path: str) -> None:
    """fsync a file or a directory by path (a directory's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_no_replace(source: str, destination: str) -> None:
    """rename(2) that fails with FileExistsError if `destination` appeared meanwhile: a plain rename would replace
    an empty directory created there since restore checked (renameat2 RENAME_NOREPLACE, Linux >= 3.15). Where
    the kernel, libc or file system lacks it, a check just before the rename narrows the window instead."""
    import ctypes
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        renameat2 = None
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(source), AT_FDCWD, os.fsencode(destination), RENAME_NOREPLACE) == 0:
            return
        error = ctypes.get_errno()
        if error not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(error, os.strerror(error), destination)
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), destination)
    os.rename(source, destination)


def remove_abandoned_stagings(parent: str, prefix: str) -> None:
    """Delete the temporary directories of earlier restores to the same destination that no live restore holds
    (a restore flocks its directory while it builds): a restore that was killed or crashed leaves one behind."""
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue   # gone meanwhile, not a directory, or a symbolic link: not ours to delete
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue   # a restore to the same destination is building it right now
            shutil.rmtree(path)
            warnings.warn(f"ledger restore: deleted {path}, left by an earlier restore that did not finish",
                          RuntimeWarning, stacklevel=3)
        finally:
            os.close(fd)


def write_empty_segment(path: str, index: int, records_log2: int, allocate: bool) -> None:
    """A segment file holding only its header, every record zero: sparse (`allocate` False: a segment before the
    journal's base, never written) or preallocated (the base's own segment, which the writer writes on into)."""
    from ledger import _core
    size = segment_bytes(records_log2)
    header = SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, RECORD_SIZE, records_log2, 0, index,
                                 index << records_log2, time.time_ns())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if allocate:
            os.posix_fallocate(fd, 0, size)
        else:
            os.ftruncate(fd, size)
        os.pwrite(fd, header + SEGMENT_HEADER_CHECKSUM.pack(_core.crc32c(header)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def build_from_snapshot(staging: str, scalars: dict[str, int], arrays: dict[str, Any]) -> None:
    """The "journal base" layout (docs/FORMAT.md) in `staging`: segments through the base's own, records zero;
    the snapshot; the base file last (its presence is what makes the zeros a base, not a journal)."""
    position = scalars["write_position"]
    records_log2 = scalars["segment_records_log2"]
    journal_directory = os.path.join(staging, "journal")
    os.mkdir(journal_directory, 0o700)
    base_segment = position >> records_log2
    for index in range(base_segment + 1):
        write_empty_segment(os.path.join(journal_directory, segment_name(index)), index, records_log2,
                            allocate=index == base_segment)
    fsync_path(journal_directory)
    write_snapshot(staging, scalars, arrays, keep=1, stall_seconds=0.0)   # fsyncs the file and its folder
    write_journal_base(staging, position)                                  # fsyncs staging


def restore_from_snapshot(snapshot_file: str, destination: str) -> int:
    """Build `destination` (must not exist) from one snapshot file alone, for a node that rejoins a cluster: its
    journal begins at the snapshot's position P (docs/FORMAT.md "Journal base"), so reads before P are refused and
    the stream after P is followed into it. The snapshot's own checks (checksums, state hash) must pass. Crash
    safe as `restore` is (temporary directory, fsync, rename, parent fsync). Returns P."""
    scalars, arrays, _ = read_snapshot(snapshot_file)   # raises LedgerCorruptError when its checks fail
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, "exists; a rejoin builds a new directory", destination)
    parent = os.path.dirname(os.path.abspath(destination))
    prefix = f".{os.path.basename(os.path.abspath(destination))}.restoring-"
    remove_abandoned_stagings(parent, prefix)
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    staging_fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(staging_fd, fcntl.LOCK_EX)   # held until it is DEST or gone: "this restore is alive"
        build_from_snapshot(staging, scalars, arrays)
        rename_no_replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(staging_fd)
    fsync_path(parent)
    return scalars["write_position"]
