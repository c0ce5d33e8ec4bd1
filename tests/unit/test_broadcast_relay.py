"""How an agent passes a broadcast on (dxflow.agent.peers, dxflow.agent.broadcast.Branch): the user's OpenSSH
ControlMaster gets AES-GCM first only where neither the user nor the site chose ciphers (asked of the real
``ssh -G``), dxflow's own ``-o`` options win over the defaults it adds, both socket tables read by one ``cat``
are parsed, the sockets of ControlMasters that died with their job are swept (live ones and ssh's temporary
ones are not), and a child that fails never holds up the reading of the stream."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

from dxflow.agent.broadcast import Branch
from dxflow.agent.peers import AES_GCM, cpu_has_aes, port_refusal, preferred_ciphers, sweep
from dxflow.ssh import control
from dxflow.ssh import options as ssh_options


def ciphers(config: str) -> str:
    """What the real ``ssh -G`` resolves for a node with this ssh_config (``-F``: nothing else is read)."""
    return ssh_options.resolve("n2", config_file=config).get("ciphers")


def test_gcm_goes_first_when_nobody_chose_ciphers(tmp_path: Path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host n2\n  HostName 10.77.0.12\n")
    default = ciphers(os.devnull)
    got = preferred_ciphers(ciphers(str(cfg)), default, aes=True)
    assert got.split(",")[:2] == list(AES_GCM)
    assert sorted(got.split(",")) == sorted(default.split(","))  # the same ciphers, reordered: none added or lost


def test_a_users_ciphers_stand(tmp_path: Path):
    cfg = tmp_path / "ssh_config"
    cfg.write_text("Host *\n  Ciphers chacha20-poly1305@openssh.com,aes256-ctr\n")
    assert preferred_ciphers(ciphers(str(cfg)), ciphers(os.devnull), aes=True) == ""


def test_without_aes_instructions_openssh_chooses():
    default = ciphers(os.devnull)
    assert preferred_ciphers(default, default, aes=False) == ""


def test_aes_instructions_are_read_from_cpuinfo():
    assert cpu_has_aes("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    assert cpu_has_aes("Features\t: fp asimd aes pmull sha1\n")
    assert not cpu_has_aes("flags\t\t: fpu sse2 avx2 vaes_like\n")


def test_the_callers_options_win_over_dxflows_own():
    argv = control.master_argv("n2", Path("/c"), extra=("-o", "ControlPersist=60"))
    # the real ssh takes the first value it is given: ask it what this argv would use
    out = subprocess.run(["ssh", "-G", *argv[1:]], capture_output=True, text=True, check=True).stdout
    assert "controlpersist 60" in out.splitlines()
    assert argv[argv.index("ControlPersist=60") + 1:].count(f"ControlPersist={control.PERSIST}") == 1


TCP4 = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 43121 1\n")
TCP6 = ("  sl  local_address                         remote_address                        st tx_queue rx_queue "
        "tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 "
        "00:00000000 00000000  1002        0 43122 1\n")


def test_both_tables_in_one_text_are_read():
    tables = [TCP4 + TCP6]  # what `cat /proc/net/tcp; cat /proc/net/tcp6` prints
    assert port_refusal(tables, 0x1F90, 1001, "n2") == ""
    assert "uid 1002" in port_refusal(tables, 0x1F91, 1001, "n2")  # bob's, on ::
    assert "nothing listens" in port_refusal(tables, 0x1F92, 1001, "n2")


class Child:
    """Stands for a peer's channel (the network is the lab tests' part): fails after ``ok`` chunks."""

    def __init__(self, ok: int) -> None:
        self.ok, self.got, self.closed = ok, 0, False

    def start(self, head: bytes, size: int) -> None:
        pass

    def send(self, chunk: bytes) -> None:
        if self.got >= self.ok:
            raise BrokenPipeError("the channel closed")
        self.got += 1

    def close(self) -> None:
        self.closed = True


def test_a_child_that_fails_never_holds_up_the_stream():
    lost, fine = Child(ok=2), Child(ok=10_000)
    branches = [Branch(lost, {"node": "n2", "children": []}, "n1"),  # type: ignore[arg-type]
                Branch(fine, {"node": "n3", "children": []}, "n1")]  # type: ignore[arg-type]
    for b in branches:
        b.start({"op": "file"}, 1000)
    done = threading.Event()

    def stream() -> None:
        for _ in range(1000):  # far more than the queue holds
            for b in branches:
                b.send(b"x")
        for b in branches:
            b.end()
        done.set()

    threading.Thread(target=stream, daemon=True).start()
    assert done.wait(20), "the reading waited on a child that failed"
    for b in branches:
        assert b._pumping is not None
        b._pumping.join(20)
    assert lost.got == 2 and "lost on the way from n1: the channel closed" in branches[0].error
    assert fine.got == 1000 and not branches[1].error


def test_dead_controlmaster_sockets_are_swept_and_live_ones_kept(tmp_path: Path):
    def bound(name: str) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        return s

    dead = bound("0123456789abcdef")
    dead.close()                                   # its ssh was killed: the file is left, nobody listens
    live = bound("fedcba9876543210")
    live.listen(1)
    temporary = bound("0123456789abcdef.Xy12Zw34Ab56Cd78")  # ssh's own name while it makes one
    temporary.close()
    (tmp_path / "00000000000000aa").write_text("not a socket\n")
    try:
        assert sweep(tmp_path) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "00000000000000aa", "0123456789abcdef.Xy12Zw34Ab56Cd78", "fedcba9876543210"]
    finally:
        live.close()
