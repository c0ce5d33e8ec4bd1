"""dxflow.agent.writeback: a large file's pages handed to the disk as it is written."""

from __future__ import annotations

import os

from dxflow.agent.writeback import Writeback, write_all


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
