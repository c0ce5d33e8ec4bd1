"""How a broadcast's copy reaches a node's disk: straight (``O_DIRECT``) where the file system takes it, else through
the page cache with each stretch handed to the disk as it is written.

:class:`DiskWriter` is the one entry point. A broadcast writes a file that nothing on the node has read yet,
and on every node of the set at once: passed through the page cache, each copy costs the node's CPU a kernel
copy per byte, then writeback and reclaim, and evicts what the job itself has cached (a broadcast of 1 GiB to
32 nodes of one machine, the lab, moves 32 GiB through its page cache). With ``O_DIRECT`` the disk reads the
bytes from this process's buffer; HPC copy tools offer the same (mpifileutils' ``dcp --direct``). Direct
I/O wants the buffer's address, the length and the file offset aligned to the device's block: the bytes are
gathered in a page-aligned buffer (one copy in user space, far cheaper than the kernel's into the page cache)
and written a whole number of pages at a time; the last partial page goes through the page cache. A file
system that refuses ``O_DIRECT`` (``fcntl`` or the first write says ``EINVAL``: tmpfs before Linux 6.6, some
FUSE ones) gets buffered writes instead, with :class:`Writeback`:

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
import errno
import fcntl
import functools
import mmap
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


#: bytes gathered before one direct write (a whole number of pages)
GATHER = 4 * 1024 * 1024
#: the alignment direct I/O gets: a page, the largest logical block size of disks in use
ALIGN = mmap.PAGESIZE


class DiskWriter:
    """Write a file's bytes in order to ``fd`` (opened for writing at offset 0); call :meth:`finish` before
    the fsync that makes the file last. ``direct``: whether the bytes still bypass the page cache.
    ``size``, when known: a file under a page goes through the page cache at once (a ``cp -r`` of many
    small files pays no buffer and no ``fcntl`` for them), a larger one gathers no more than its whole
    pages (its last partial page goes through the page cache in any case)."""

    def __init__(self, fd: int, size: int | None = None, gather: int = GATHER, try_direct: bool = True) -> None:
        self.fd = fd
        self.offset = 0  # bytes handed to write(2) so far
        if size is not None:
            gather = min(gather, size // ALIGN * ALIGN)
        self.direct = try_direct and gather >= ALIGN and _set_direct(fd, True)
        self._buf = mmap.mmap(-1, gather) if self.direct else None  # page-aligned
        self._held = 0  # bytes gathered in _buf, not written yet
        self._writeback = None if self.direct else Writeback(fd)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view and self._buf is not None:
            take = min(len(view), len(self._buf) - self._held)
            self._buf[self._held:self._held + take] = view[:take]
            self._held += take
            view = view[take:]
            if self._held == len(self._buf):
                self._write_gathered(self._held)
        if view:  # through the page cache: no direct I/O here, or it was given up on
            self._write_buffered(view)

    def finish(self) -> None:
        """Write what is gathered: whole pages directly, the last partial page through the page cache."""
        if self._buf is not None:
            whole = self._held - self._held % ALIGN
            if whole:
                self._write_gathered(whole)
        if self._buf is not None and self._held:
            self._give_up_direct()

    def _write_gathered(self, length: int) -> None:
        """The first ``length`` gathered bytes (whole pages) written directly; what is left moves to the front.
        A file system that refuses (``EINVAL``) gets them, and all that follows, through the page cache."""
        assert self._buf is not None
        done, refused = 0, False
        with memoryview(self._buf) as view:
            try:
                while done < length:
                    n = os.write(self.fd, view[done:length])
                    self.offset += n
                    done += n
                    if n % ALIGN:  # a short write off the page grid: the rest cannot go direct
                        refused = True
                        break
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                refused = True
        self._buf.move(0, done, self._held - done)
        self._held -= done
        if refused:
            self._give_up_direct()

    def _give_up_direct(self) -> None:
        """From here on through the page cache, starting with what is gathered."""
        assert self._buf is not None
        held = bytes(self._buf[:self._held])
        self._buf.close()
        self._buf, self._held, self.direct = None, 0, False
        _set_direct(self.fd, False)
        self._writeback = Writeback(self.fd)
        if held:
            self._write_buffered(memoryview(held))

    def _write_buffered(self, view: memoryview) -> None:
        write_all(self.fd, view)
        self.offset += len(view)
        assert self._writeback is not None
        self._writeback.written(self.offset)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn ``O_DIRECT`` on or off for ``fd``; False when the file system refuses it (or there is none)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if on else (flags & ~flag))
    except OSError:
        return False
    return True
