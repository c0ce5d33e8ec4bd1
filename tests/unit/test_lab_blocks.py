"""Marked blocks in /etc/hosts-like files: added once, replaced, removed, nothing else touched."""

from __future__ import annotations

from pathlib import Path

from dxflow.lab import blocks

ORIGINAL = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"


def test_add_then_remove_restores_the_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(ORIGINAL)
    assert blocks.set_block(hosts, ["10.77.0.11 n1"]) is True
    assert hosts.read_text() == ORIGINAL + "# BEGIN dxflow-lab\n10.77.0.11 n1\n# END dxflow-lab\n"
    assert blocks.drop_block(hosts) is True
    assert hosts.read_text() == ORIGINAL
    assert blocks.drop_block(hosts) is False


def test_set_block_is_idempotent(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(ORIGINAL)
    blocks.set_block(hosts, ["a", "b"])
    once = hosts.read_text()
    assert blocks.set_block(hosts, ["a", "b"]) is False
    assert hosts.read_text() == once
    assert once.count(blocks.BEGIN) == 1


def test_set_block_replaces_the_old_block(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(ORIGINAL)
    blocks.set_block(hosts, ["10.77.0.11 n1", "10.77.0.12 n2"])
    blocks.set_block(hosts, ["10.77.0.11 n1"])
    text = hosts.read_text()
    assert "n2" not in text and text.count(blocks.BEGIN) == 1 and text.startswith(ORIGINAL)


def test_lines_after_the_block_are_kept(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(f"a\n{blocks.BEGIN}\nold\n{blocks.END}\nz\n")
    blocks.drop_block(hosts)
    assert hosts.read_text() == "a\nz\n"


def test_file_without_final_newline(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost")
    blocks.set_block(hosts, ["x"])
    assert hosts.read_text() == f"127.0.0.1 localhost\n{blocks.BEGIN}\nx\n{blocks.END}\n"


def test_missing_file(tmp_path: Path) -> None:
    known = tmp_path / "ssh" / "ssh_known_hosts"
    assert blocks.drop_block(known) is False
    assert blocks.set_block(known, ["n1 ssh-ed25519 AAAA"]) is True
    blocks.drop_block(known)
    assert known.read_text() == ""


def test_same_inode_kept(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(ORIGINAL)
    inode = hosts.stat().st_ino
    blocks.set_block(hosts, ["x"])
    blocks.drop_block(hosts)
    assert hosts.stat().st_ino == inode


def test_unterminated_block_swallows_to_the_end() -> None:
    # a block cut short (crash while writing) is dropped whole rather than kept half
    assert blocks.without_block(f"a\n{blocks.BEGIN}\nx\n") == "a\n"
