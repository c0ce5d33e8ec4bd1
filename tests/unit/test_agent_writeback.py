"""dxflow.agent.writeback: a large file's pages handed to the disk as it is written."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess

import pytest

from dxflow.agent import writeback
from dxflow.agent.writeback import GATHER, DiskWriter, Writeback, write_all


def test_writeback_starts_each_step_as_the_file_grows_and_the_file_is_whole(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    wb = Writeback(fd, step=64 * 1024, ahead=2)
    data = os.urandom(1024 * 1024 + 123)
    written = 0
    for at in range(0, len(data), 100_000):
        piece = data[at:at + 100_000]
        write_all(fd, piece)
        written += len(piece)
        wb.written(written)
    os.fsync(fd)
    os.close(fd)
    assert wb.enabled  # Linux with glibc: sync_file_range is there
    assert wb.started == len(data) // (64 * 1024) * (64 * 1024)
    assert path.read_bytes() == data


def test_writeback_on_a_pipe_gives_up_quietly_and_the_bytes_still_go(tmp_path):
    r, w = os.pipe()
    try:
        wb = Writeback(w, step=4096, ahead=1)
        write_all(w, b"x" * 8192)
        wb.written(8192)
        assert not wb.enabled  # sync_file_range refuses a pipe (ESPIPE): left to the writer's own fsync
        assert os.read(r, 10000) == b"x" * 8192
    finally:
        os.close(r)
        os.close(w)


# -- DiskWriter: straight to the disk where the file system takes it -----------------------------------------
def _write_in_pieces(path, data: bytes, pieces: list[int], **kw) -> DiskWriter:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = DiskWriter(fd, **kw)
        at = 0
        for n in pieces:
            w.write(data[at:at + n])
            at += n
        w.write(data[at:])
        w.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    return w


def _file_system(path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True).stdout.strip()


def _resident_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


@pytest.mark.parametrize("pieces", [[], [1], [4095, 1, 8191], [100_000] * 30, [GATHER, 1, GATHER - 1]])
def test_disk_writer_gives_the_same_bytes_whatever_the_pieces(tmp_path, pieces):
    data = os.urandom(3 * 1024 * 1024 + 4097)
    _write_in_pieces(tmp_path / "f", data, pieces, gather=1024 * 1024)
    assert (tmp_path / "f").read_bytes() == data


def test_disk_writer_leaves_the_copy_out_of_the_page_cache_on_a_disk(tmp_path):
    if _file_system(tmp_path) in ("tmpfs", "ramfs", "overlayfs") or not shutil.which("fincore"):
        pytest.skip(f"{tmp_path} is not on a disk's file system ({_file_system(tmp_path)})")
    data = os.urandom(8 * 1024 * 1024 + 100)
    w = _write_in_pieces(tmp_path / "f", data, [1_000_000] * 8, gather=1024 * 1024)
    if not w.offset:
        pytest.skip("no direct I/O on this file system")
    # all but the last partial page went straight to the disk: the page cache holds that page at most
    assert _resident_bytes(tmp_path / "f") <= mmap.PAGESIZE
    assert (tmp_path / "f").read_bytes() == data


def test_disk_writer_without_direct_io_writes_through_the_page_cache(tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 3)
    w = _write_in_pieces(tmp_path / "f", data, [500_000] * 4, try_direct=False)
    assert not w.direct and w.offset == len(data)
    assert (tmp_path / "f").read_bytes() == data


def test_disk_writer_refused_a_direct_write_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    real_write, calls = os.write, []

    def refusing(fd, data):  # a file system that takes O_DIRECT at fcntl but refuses the write itself
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writeback.os, "write", refusing)
    data = os.urandom(3 * 1024 * 1024 + 7)
    w = _write_in_pieces(tmp_path / "f", data, [700_000] * 4, gather=1024 * 1024)
    if len(calls) < 2:
        pytest.skip("no direct I/O on this file system")
    assert not w.direct and w.offset == len(data)
    assert (tmp_path / "f").read_bytes() == data


def test_disk_writer_passes_other_errors_on(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writeback.os, "write", full)
    with pytest.raises(OSError) as e:
        _write_in_pieces(tmp_path / "f", b"x" * (3 * 1024 * 1024), [], gather=1024 * 1024)
    assert e.value.errno == errno.ENOSPC


def test_disk_writer_sends_a_file_under_a_page_through_the_page_cache_at_once(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(writeback, "_set_direct", lambda fd, on: asked.append(on) or True)
    data = os.urandom(mmap.PAGESIZE - 1)
    w = _write_in_pieces(tmp_path / "f", data, [10, 100], size=len(data))
    assert asked == [] and w._buf is None and w.offset == len(data)
    assert (tmp_path / "f").read_bytes() == data


def test_disk_writer_given_the_size_gathers_no_more_than_the_files_whole_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(writeback, "_set_direct", lambda fd, on: True)  # whatever this file system allows
    data = os.urandom(3 * mmap.PAGESIZE + 5)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        w = DiskWriter(fd, size=len(data))
        assert w.direct and w._buf is not None and len(w._buf) == 3 * mmap.PAGESIZE  # not GATHER
        w.write(data)
        w.finish()
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == data
