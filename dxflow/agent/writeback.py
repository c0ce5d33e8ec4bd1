"""A large file's pages sent to the disk as they are written, so that its final fsync waits for the last stretch only.

A file written whole and fsynced at the end leaves all of its dirty pages to that fsync: a broadcast of
256 MiB to 32 nodes of one machine (the lab) or to a node with a slow disk ends with every node waiting
for its whole file to reach the disk at once, after the transfer. Linux's ``sync_file_range(2)`` starts
the writeback of a range without waiting (``SYNC_FILE_RANGE_WRITE``) and can wait for an earlier one
(``WAIT_BEFORE | WRITE | WAIT_AFTER``): the pattern for streaming writes that keeps only a few steps of a
file dirty, so the disk works while the bytes still arrive and the final fsync (which stays: it is what
makes the file last) has little left to do. Where the call is missing (not Linux, not glibc) this does
nothing and the final fsync does it all, as before.
"""

from __future__ import annotations

import ctypes
import functools
import os

#: bytes per range handed to the disk
STEP = 8 * 1024 * 1024
#: ranges that may be on their way to the disk before the writer waits for the oldest
AHEAD = 4
SYNC_FILE_RANGE_WAIT_BEFORE = 1
SYNC_FILE_RANGE_WRITE = 2
SYNC_FILE_RANGE_WAIT_AFTER = 4
WAIT = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER


@functools.cache  # looked up on the first broadcast, not at every agent's start
def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn



class Writeback:
    """Call :meth:`written` with the file's size so far (bytes already handed to ``write(2)``, not buffered)."""

    def __init__(self, fd: int, step: int = STEP, ahead: int = AHEAD) -> None:
        self.fd, self.step, self.ahead = fd, step, ahead
        self.started = 0  # writeback has been started for [0, started)
        self.enabled = _sync_file_range() is not None

    def written(self, size: int) -> None:
        while self.enabled and size - self.started >= self.step:
            self._call(self.started, self.step, SYNC_FILE_RANGE_WRITE)
            behind = self.started - self.ahead * self.step
            if behind >= 0:  # the oldest range still on its way: wait for it (the disk sets the pace)
                self._call(behind, self.step, WAIT)
            self.started += self.step

    def _call(self, offset: int, length: int, flags: int) -> None:
        call = _sync_file_range()
        if call is None or call(self.fd, offset, length, flags) != 0:
            # EINVAL/ESPIPE (a pipe, an odd file system), ENOSYS: leave it all to the final fsync; an I/O
            # error shows again there, where the writer learns of it
            self.enabled = False


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``write(2)`` until all of ``data`` is written."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
