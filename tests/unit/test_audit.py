"""dxflow.audit on its own: one syslog datagram per act, fields a user's text cannot forge, never an error."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

import pytest

from dxflow import audit, config


@pytest.fixture
def syslog(tmp_path, monkeypatch):
    """A Unix datagram socket standing in for /dev/log, named by the site config."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log"))
    sock.settimeout(2)
    site = tmp_path / "dxflow.toml"
    site.write_text(f'audit_socket = "{tmp_path / "log"}"\naudit_facility = "local2"\n')
    monkeypatch.setattr(config, "SITE_CONFIG", site)
    audit._trail.cache_clear()
    yield sock
    sock.close()
    audit._trail.cache_clear()


WHERE = SimpleNamespace(job="41", node="n1")


def test_a_record_names_the_act_the_job_and_who_asked(syslog):
    a, b = socket.socketpair(socket.AF_UNIX)
    audit.record("exec", ["python", "train.py", "--lr", "0.1"], WHERE, {"gunicorn.socket": a}, cwd="/home/x")
    line = syslog.recv(4096).decode().rstrip("\0")
    assert line.startswith(f"<{18 * 8 + 6}>dxflow-")  # local2.info
    fields = line.split(": ", 1)[1]
    assert fields.startswith("action=exec job=41 node=n1 ")
    assert "what=\"python train.py --lr 0.1\"" in fields and "cwd=/home/x" in fields
    assert f" peer_uid={os.getuid()} " in fields and f" peer_pid={os.getpid()} " in fields
    a.close(), b.close()


def test_a_users_text_cannot_forge_a_field_or_a_line(syslog):
    audit.record("delete", "x action=shell\nDec 1 fake: action=exec job=1 user=root", WHERE)
    line = syslog.recv(4096).decode().rstrip("\0")
    assert "\n" not in line
    head, quoted = line.split(" what=", 1)
    assert head.count(" action=") == 1 and quoted.startswith('"') and quoted.endswith('"')
    assert 'what="x action=shell\\nDec 1 fake: action=exec job=1 user=root"' in line


def test_no_syslog_listening_never_fails_the_act(tmp_path, monkeypatch, caplog):
    site = tmp_path / "dxflow.toml"
    site.write_text(f'audit_socket = "{tmp_path / "nobody-listens"}"\n')
    monkeypatch.setattr(config, "SITE_CONFIG", site)
    audit._trail.cache_clear()
    try:
        for _ in range(3):
            audit.record("write", "/home/x/f", WHERE)  # returns; says so once
        assert caplog.text.count("audit records cannot be sent") == 1
    finally:
        audit._trail.cache_clear()


def test_login_uid_of_a_process_without_one_is_unset_and_of_no_process_unknown():
    assert audit.loginuid("self") == "unset" or audit.loginuid("self").isdigit()
    assert audit.loginuid(2 ** 22 + 1) == "unknown"


def test_a_missing_syslog_is_tried_again_only_every_retry_seconds_and_the_missed_are_counted(
        tmp_path, monkeypatch, caplog):
    """While nothing listens, records do not each pay for a new connection; once syslog is back (after
    RETRY), records arrive again and the number lost meanwhile is logged."""
    site = tmp_path / "dxflow.toml"
    site.write_text(f'audit_socket = "{tmp_path / "log"}"\n')
    monkeypatch.setattr(config, "SITE_CONFIG", site)
    monkeypatch.setattr(audit, "RETRY", 0.3)
    audit._trail.cache_clear()
    connects = []
    real = audit._Handler._connect_unixsocket
    monkeypatch.setattr(audit._Handler, "_connect_unixsocket",
                        lambda self, address: (connects.append(address), real(self, address))[1])
    try:
        for _ in range(20):
            audit.record("exec", "true", WHERE)
        assert len(connects) <= 3  # made at start, and once more at the first failure: not 20 times
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / "log"))
        sock.settimeout(2)
        time.sleep(0.35)
        audit.record("delete", "/tmp/x", WHERE)
        assert "action=delete" in sock.recv(4096).decode()
        assert any("records could not be sent" in r.getMessage() for r in caplog.records)
        sock.close()
    finally:
        audit._trail.cache_clear()
