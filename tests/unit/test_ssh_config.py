"""A node's SSH settings as the user's OpenSSH resolves them (``ssh -G``), known_hosts as paramiko can
use them, the ``ssh_transport`` setting, and the choice between paramiko and OpenSSH per node.

Every test runs the real ``ssh -G`` with ``-F FILE`` (the file replaces ~/.ssh/config and
/etc/ssh/ssh_config, as it does for ssh itself); none connects anywhere.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import paramiko
import pytest

from dxflow.config import SiteConfig
from dxflow.errors import AgentUnreachable, ConfigError, UsageError
from dxflow.layout import UserLayout
from dxflow.master import tunnels
from dxflow.ssh import control, knownhosts, options
from dxflow.ssh.transport import transport_setting

HOME = os.path.expanduser("~")


@pytest.fixture
def short_tmp():
    """A folder with a short path: a socket's path has ~100 bytes, pytest's tmp_path is long."""
    path = Path(tempfile.mkdtemp(prefix="dx", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(tmp_path: Path, text: str, name: str = "ssh_config") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_ssh_config_is_followed(tmp_path):
    cfg = config(tmp_path, "Host n*\n  HostName %h.cluster.example\n  User svc\n  Port 2222\n"
                           "  IdentityFile ~/.ssh/special\n  ProxyJump gateway\n"
                           "  UserKnownHostsFile ~/.ssh/cluster_hosts\n")
    t = options.resolve("n7", config_file=cfg)
    assert (t.hostname, t.user, t.port) == ("n7.cluster.example", "svc", 2222)
    assert t.identity_files == (f"{HOME}/.ssh/special",)
    assert t.jumps == (options.Jump("gateway"),)
    assert f"{HOME}/.ssh/cluster_hosts" in t.known_hosts


def test_user_known_hosts_file_keeps_the_system_wide_ones(tmp_path):
    """paramiko's parser dropped /etc/ssh/ssh_known_hosts once UserKnownHostsFile was set; OpenSSH does not."""
    t = options.resolve("n1", config_file=config(tmp_path, "UserKnownHostsFile ~/.ssh/mine\n"))
    assert t.known_hosts[0] == "/etc/ssh/ssh_known_hosts"
    assert t.known_hosts[-1] == f"{HOME}/.ssh/mine"


def test_defaults_without_config(tmp_path):
    t = options.resolve("n1", config_file=config(tmp_path, ""))
    assert t.hostname == "n1" and t.port == 22 and t.jumps == ()
    assert "/etc/ssh/ssh_known_hosts" in t.known_hosts
    assert f"{HOME}/.ssh/known_hosts" in t.known_hosts
    assert f"{HOME}/.ssh/id_ed25519" in t.identity_files   # OpenSSH's default keys
    assert t.why_openssh() == ""


def test_include_is_followed(tmp_path):
    """paramiko's parser ignored Include: the settings in the included file never applied."""
    (tmp_path / "conf.d").mkdir()
    config(tmp_path, "Host n1\n  Port 2206\n  User carol\n", "conf.d/lab.conf")
    t = options.resolve("n1", config_file=config(tmp_path, f"Include {tmp_path}/conf.d/*.conf\n"))
    assert (t.port, t.user) == (2206, "carol")


def test_every_proxyjump_hop_is_kept(tmp_path):
    """paramiko's parser kept only the first of ``ProxyJump a,b``."""
    t = options.resolve("n1", config_file=config(tmp_path, "Host n1\n  ProxyJump hop1,carol@hop2:2205\n"))
    assert t.jumps == (options.Jump("hop1"), options.Jump("hop2", "carol", 2205))


def test_match_blocks_are_followed(tmp_path):
    t = options.resolve("n1", config_file=config(tmp_path, "Match host n1\n  Port 2299\n"))
    assert t.port == 2299


@pytest.mark.parametrize("spec, jump", [
    ("gw", options.Jump("gw")),
    ("u@gw:2222", options.Jump("gw", "u", 2222)),
    ("ssh://u@gw:2222", options.Jump("gw", "u", 2222)),
    ("[fd00::1]:22", options.Jump("fd00::1", None, 22)),
])
def test_jump_forms(spec, jump):
    assert options.Jump.parse(spec) == jump


@pytest.mark.parametrize("host", ["-oProxyCommand=touch /tmp/pwned", "", "a b", "n1\n-oX"])
def test_a_hostile_host_name_never_reaches_ssh(host):
    with pytest.raises(UsageError):
        options.ssh_g_argv(host)
    with pytest.raises(ConfigError):
        control.channel_argv(host, Path("/tmp/x"), "127.0.0.1", 80)


@pytest.mark.parametrize("line, why", [
    ("ProxyCommand nc %h %p", "ProxyCommand"),
    ("HostKeyAlias cluster", "HostKeyAlias"),
    ("PubkeyAuthentication no", "PubkeyAuthentication"),
    ("PreferredAuthentications keyboard-interactive,publickey", "PreferredAuthentications"),
    ("IdentityAgent /run/other-agent.sock", "IdentityAgent"),
])
def test_settings_paramiko_cannot_honour_send_the_host_to_openssh(tmp_path, line, why):
    t = options.resolve("n1", config_file=config(tmp_path, f"Host n1\n  {line}\n"))
    assert why in t.why_openssh()


@pytest.mark.skipif("HashKnownHosts yes" not in Path("/etc/ssh/ssh_config").read_text(errors="replace")
                    if Path("/etc/ssh/ssh_config").exists() else True,
                    reason="needs Debian's /etc/ssh/ssh_config (HashKnownHosts yes)")
def test_the_system_wide_ssh_config_is_read():
    """Without -F, ssh -G reads /etc/ssh/ssh_config (Debian sets HashKnownHosts yes; OpenSSH's default is no)."""
    assert options.resolve("some-node").get("hashknownhosts") == "yes"


# -- known_hosts ------------------------------------------------------------------------------------

def _key_line(names: str) -> tuple[str, paramiko.PKey]:
    key = paramiko.ECDSAKey.generate()
    return f"{names} {key.get_name()} {key.get_base64()}", key


def test_a_cert_authority_line_does_not_break_known_hosts(tmp_path):
    """One @cert-authority line made paramiko's loader fail on the whole file: every node unreachable."""
    plain, key = _key_line("n1,10.77.0.11")
    ca, _ = _key_line("*.cluster")
    hashed_host = paramiko.HostKeys.hash_host("n2")
    hashed, key2 = _key_line(hashed_host)
    path = tmp_path / "known_hosts"
    path.write_text(f"@cert-authority {ca}\n{plain}\nthis line is garbage\n# comment\n{hashed}\n")
    with pytest.raises(Exception):
        paramiko.HostKeys(str(path))   # what paramiko alone does with it
    found = knownhosts.load([str(path), str(tmp_path / "missing")])
    assert found.keys.lookup("n1")[key.get_name()] == key
    assert found.keys.lookup("n2")[key2.get_name()] == key2
    assert found.cert_authorities == 1


def test_a_revoked_key_is_known_as_revoked(tmp_path):
    line, key = _key_line("*")
    other, other_key = _key_line("n1")
    path = tmp_path / "known_hosts"
    path.write_text(f"@revoked {line}\n{other}\n")
    found = knownhosts.load([str(path)])
    assert found.is_revoked(key) and not found.is_revoked(other_key)
    assert found.keys.lookup("n1") is not None


# -- ssh_transport ----------------------------------------------------------------------------------

def test_the_users_setting_wins_over_the_sites(tmp_path):
    layout = UserLayout(tmp_path / ".dxflow", "login")
    layout.base.mkdir()
    site = SiteConfig(ssh_transport="paramiko")
    assert transport_setting(site, layout) == "paramiko"
    (layout.base / "config").write_text('ssh_transport = "openssh"\n')
    assert transport_setting(site, layout) == "openssh"
    (layout.base / "config").write_text('ssh_transport = "telnet"\n')
    with pytest.raises(ConfigError, match="auto, paramiko, openssh"):
        transport_setting(site, layout)


def test_a_bad_site_setting_is_an_error(tmp_path):
    path = tmp_path / "dxflow.toml"
    path.write_text('ssh_transport = 3\n')
    with pytest.raises(ConfigError, match="ssh_transport"):
        SiteConfig.load(path)
    layout = UserLayout(tmp_path / ".dxflow", "login")
    with pytest.raises(ConfigError, match="ssh_transport"):
        transport_setting(SiteConfig(ssh_transport="rsh"), layout)


# -- the ControlMaster's files and commands ------------------------------------------------------------

def test_control_sockets_live_in_a_private_folder_per_login_host(short_tmp):
    a = UserLayout(short_tmp / ".dxflow", "login1")
    b = UserLayout(short_tmp / ".dxflow", "login2")
    folder = control.ensure_control_dir(a)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert control.control_path("n1", a) != control.control_path("n1", b)
    assert control.control_path("n1", a).parent == folder
    assert control.control_path("n1", a) != control.control_path("n2", a)


def test_a_jobs_control_socket_is_its_own_and_as_short_as_the_nodes(short_tmp):
    """Under pam_slurm_adopt each job's agents on a node get a ControlMaster of their own (docs/ssh.md)."""
    layout = UserLayout(short_tmp / ".dxflow", "login")
    node = control.control_path("n1", layout)
    own = [control.control_path("n1", layout, job) for job in ("7", "8")]
    assert len({node, *own}) == 3 and all(p.parent == node.parent for p in own)
    assert all(len(str(p).encode()) == len(str(node).encode()) <= control.MAX_PATH for p in own)
    assert control.control_path("n1", layout, "7") != control.control_path("n17", layout)


def test_a_control_path_too_long_for_a_socket_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="too long"):
        control.control_path("n1", UserLayout(tmp_path / ("x" * 80) / ".dxflow", "login"))


def test_control_commands_are_argv_and_never_fall_back_to_a_connection_of_their_own():
    argv = control.channel_argv("n1", Path("/h/.dxflow/hosts/l/ssh/ab%c"), "127.0.0.1", 8080)
    assert argv[:3] == ["ssh", "-S", "/h/.dxflow/hosts/l/ssh/ab%%c"]
    assert argv[-3:] == ["-W", "127.0.0.1:8080", "n1"]
    assert "BatchMode=yes" in argv and "ProxyCommand=/bin/false" in argv
    assert "BatchMode=yes" in control.master_argv("n1", Path("/c"))
    assert "BatchMode=yes" not in control.login_argv("n1", Path("/c"))   # the terminal's: prompts allowed


@pytest.mark.parametrize("stderr, prompt", [
    ("carol@n1: Permission denied (keyboard-interactive).\r\n", True),
    ("Permission denied (publickey,password).", True),
    ("carol@n1: Permission denied (publickey).", False),
    ("Host key verification failed.", False),
])
def test_a_login_that_needs_a_person_is_told_apart(stderr, prompt):
    assert control.needs_prompt(stderr) is prompt


def test_master_pid_from_check():
    assert control.master_pid("Master running (pid=4242)\r\n") == 4242
    assert control.master_pid("Control socket connect(/x): No such file or directory") is None


# -- the choice per node ----------------------------------------------------------------------------

def test_auto_sends_a_host_paramiko_cannot_honour_to_openssh(tmp_path, short_tmp):
    cfg = config(tmp_path, "Host viaproxy\n  ProxyCommand /bin/false\n")
    pool = tunnels.TunnelPool(cfg, transport="auto")
    pool.openssh._layout = UserLayout(short_tmp / ".dxflow", "login")
    with pytest.raises(AgentUnreachable):   # OpenSSH runs the (failing) ProxyCommand: nothing to reach
        pool.connect("viaproxy")
    assert pool.uses_openssh("viaproxy")
    assert pool.status()["viaproxy"]["transport"] == "openssh"


def test_forced_paramiko_says_why_it_cannot(tmp_path):
    cfg = config(tmp_path, "Host viaproxy\n  ProxyCommand /bin/false\n")
    pool = tunnels.TunnelPool(cfg, transport="paramiko")
    with pytest.raises(AgentUnreachable, match="ssh_transport is paramiko.*ProxyCommand"):
        pool.connect("viaproxy")
    assert not pool.uses_openssh("viaproxy")


def test_a_proxyjump_loop_is_refused(tmp_path):
    cfg = config(tmp_path, "Host a\n  HostName 127.0.0.1\n  Port 1\n  ProxyJump b\n"
                           "Host b\n  HostName 127.0.0.1\n  Port 1\n  ProxyJump a\n")
    pool = tunnels.TunnelPool(cfg, transport="paramiko")
    with pytest.raises(AgentUnreachable, match="loop"):
        pool.connect("a")


# -- the CLI's login in a terminal ---------------------------------------------------------------------

def test_without_a_terminal_the_error_stands_and_nothing_is_asked(monkeypatch):
    """A script (no terminal) gets the master's error; no ssh runs, the command is not run again."""
    from dxflow.cli import sshlogin

    calls = []

    def command(args):
        calls.append(args)
        raise AgentUnreachable("n1: SSH asks for more than keys: run any dxflow command in a terminal")

    monkeypatch.setattr(sshlogin, "interactive", lambda: False)
    monkeypatch.setattr(sshlogin, "log_in", lambda node: pytest.fail("no login without a terminal"))
    with pytest.raises(AgentUnreachable, match="terminal"):
        sshlogin.run(command, "args")
    assert calls == ["args"]


@pytest.mark.parametrize("text, job", [
    ("6:freezer:/dxlab/n1/slurm_n1/uid_1003/job_89/step_extern\n4:memory:/x\n0::/\n", "89"),
    ("4:memory:/slurm/uid_1003/job_1234/step_extern\n", "1234"),
    ("0::/system.slice/slurmstepd.scope/job_7/step_extern/user/task_0\n", "7"),
    ("9:name=systemd:/\n4:memory:/user.slice\n0::/\n", None),
    ("4:memory:/slurm/uid_1003/job_5/step_0\n", None),   # a job step's task, not an adopted SSH session
])
def test_which_job_a_connection_was_adopted_into(text, job):
    from dxflow.ssh.transport import adopted_job
    assert adopted_job(text) == job
