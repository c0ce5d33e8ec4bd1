"""SSH as real sites run it, added to a running lab: ``dxflow lab profile up|down|status [NAME]``.

Each profile is one or two extra sshd on a node (its own port and sshd_config, started inside the
node's namespaces next to the lab's own sshd, which stays as it is) and the client side of the
profiles' user, ``carol`` (alice and bob keep the lab's plain keys, and their tests run alongside):
her ``~/.ssh`` is rewritten for the profile brought up last (one at a time).

========== ============================================================================================
certs      n1:2201 presents a host certificate signed by the lab's CA; carol's known_hosts holds only
           the ``@cert-authority`` line (paramiko cannot check it: OpenSSH is chosen)
hostbased  n2:2202 lets carol in by hostbased authentication only (``ssh-keysign``, the login host's
           key in ``/etc/ssh/ssh_known_hosts2``, ``/etc/ssh/shosts.equiv``); carol has no key at all
mfa        n1:2203 asks for her key, then a TOTP code (``libpam-google-authenticator``, PAM service
           ``sshd-dxlab-mfa``); the secret is root's (tests compute codes with ``oathtool``)
jump       n1:2204 admits carol only from n2, n2:2205 only from n1: reached only as ``ProxyJump hop1,hop2``
include    no server: carol's only key is ``~/.ssh/lab_key``, named in a file her config ``Include`` s
adopt      n1:2207 runs ``pam_slurm_adopt`` (``libpam-slurm-adopt``): a login needs a job of carol's on n1,
           joins it, and ends with it
========== ============================================================================================

The sshd pid files are ``sshd-profile-*.pid`` in the lab's run folder, so ``dxflow lab down``
stops them with the lab's own sshd. docs/lab.md and docs/ssh.md describe the profiles.
"""

from __future__ import annotations

import base64
import logging
import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dxflow.errors import UsageError
from dxflow.lab import network, procs, users
from dxflow.lab import state as lab_state
from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import LabError, run, start_daemon

log = logging.getLogger(__name__)

USER = "carol"
PAM_SERVICE = "sshd-dxlab-mfa"            # sshd names its PAM service after the program it runs as
SSHD = Path("/usr/sbin/sshd")
SSHD_MFA = Path("/usr/local/sbin") / PAM_SERVICE
PAM_FILE = Path("/etc/pam.d") / PAM_SERVICE
ADOPT_SERVICE = "sshd-dxlab-adopt"
SSHD_ADOPT = Path("/usr/local/sbin") / ADOPT_SERVICE
ADOPT_PAM_FILE = Path("/etc/pam.d") / ADOPT_SERVICE
KEYSIGN_CONF = Path("/etc/ssh/ssh_config.d/dxflow-lab.conf")
SHOSTS_EQUIV = Path("/etc/ssh/shosts.equiv")
KNOWN_HOSTS2 = Path("/etc/ssh/ssh_known_hosts2")
BEGIN, END = "# BEGIN dxflow-lab ssh profiles", "# END dxflow-lab ssh profiles"


@dataclass(frozen=True)
class Daemon:
    """One extra sshd: on node ``node`` (index), port ``port``, with ``options`` before the common ones."""

    node: int
    port: int
    options: tuple[str, ...] = ()
    program: Path = SSHD


@dataclass(frozen=True)
class Profile:
    name: str
    what: str
    daemons: tuple[Daemon, ...]
    client: str                     # carol's ~/.ssh/config
    known: tuple[str, ...] = ()     # host patterns carol's known_hosts gives the lab's host keys
    key: str | None = "id_ed25519"  # carol's key pair (None: no key at all)
    node: str = "n1"                # where her test job runs


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("certs", "host certificate signed by the lab CA; only an @cert-authority line in known_hosts",
            (Daemon(1, 2201, ("HostKey {dir}/certs/host_key", "HostCertificate {dir}/certs/host_key-cert.pub")),),
            "Host n1\n  Port 2201\n"),
    Profile("hostbased", "hostbased authentication (ssh-keysign) for a user without keys",
            (Daemon(2, 2202, ("HostbasedAuthentication yes", "HostbasedUsesNameFromPacketOnly yes",
                              "PubkeyAuthentication no")),),
            "Host n2\n  Port 2202\n  HostbasedAuthentication yes\n", ("[n2]:2202",), key=None, node="n2"),
    Profile("mfa", "public key, then a TOTP code (keyboard-interactive through PAM)",
            (Daemon(1, 2203, ("KbdInteractiveAuthentication yes",
                              "AuthenticationMethods publickey,keyboard-interactive"), SSHD_MFA),),
            "Host n1\n  Port 2203\n", ("[n1]:2203",)),
    Profile("jump", "reachable only through two hops: ProxyJump hop1,hop2",
            (Daemon(1, 2204, ("AllowUsers carol@10.77.0.12",)), Daemon(2, 2205, ("AllowUsers carol@10.77.0.11",))),
            "Host hop1\n  HostName 10.77.0.11\nHost hop2\n  HostName 10.77.0.12\n  Port 2205\n"
            "Host n1\n  Port 2204\n  ProxyJump hop1,hop2\n", ("[n1]:2204", "[10.77.0.12]:2205")),
    Profile("include", "the key is named only in an Include'd file", (),
            "Include ~/.ssh/config.d/*.conf\n", key="lab_key"),
    Profile("adopt", "pam_slurm_adopt: each SSH connection joins one of carol's jobs on the node, and dies with it",
            (Daemon(1, 2207, program=SSHD_ADOPT),), "Host n1\n  Port 2207\n", ("[n1]:2207",)),
)}
INCLUDED = "Host n1 n2\n  IdentityFile ~/.ssh/lab_key\n  IdentitiesOnly yes\n"


def folder(layout: Layout) -> Path:
    return layout.root / "ssh-profiles"


def pidfile(layout: Layout, profile: Profile, d: Daemon) -> Path:
    return layout.run_dir / f"sshd-profile-{profile.name}-n{d.node}-{d.port}.pid"


def get(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"no SSH profile {name!r}; profiles: {', '.join(PROFILES)}") from None


# -- the server side ------------------------------------------------------------------------------

def sshd_config(layout: Layout, profile: Profile, d: Daemon) -> str:
    node = Node(d.node)
    own = [o.format(dir=folder(layout)) for o in d.options]
    lines = [f"ListenAddress {node.addr}:{d.port}", f"PidFile {pidfile(layout, profile, d)}", *own]
    if not any(o.startswith("HostKey ") for o in own):
        lines += [f"HostKey {p}" for p in sorted(layout.ssh_dir.glob("ssh_host_*_key"))]
    if not any(o.startswith("AllowUsers ") for o in own):
        lines.append(f"AllowUsers {USER}")
    # UsePAM: the lab's users have locked passwords, which sshd without PAM refuses even for a key
    lines += ["UsePAM yes", "KbdInteractiveAuthentication no", "PasswordAuthentication no", "PrintMotd no",
              "LogLevel VERBOSE", "Subsystem sftp /usr/lib/openssh/sftp-server"]
    return "\n".join(lines) + "\n"   # sshd takes the first value of each keyword: the profile's come first


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, mode)


def _set_block(path: Path, lines: list[str]) -> None:
    """This module's marked block in a shared file (the lab's own block, with other markers, stays)."""
    old = path.read_text() if path.exists() else ""
    keep, inside = [], False
    for line in old.splitlines():
        if line.strip() == BEGIN:
            inside = True
        elif line.strip() == END:
            inside = False
        elif not inside:
            keep.append(line)
    body = keep + ([BEGIN, *lines, END] if lines else [])
    _write(path, "".join(f"{line}\n" for line in body))


def _ca(layout: Layout) -> Path:
    """The lab's SSH CA and n1's certified host key (made once)."""
    base = folder(layout)
    ca, host = base / "ca", base / "certs" / "host_key"
    host.parent.mkdir(parents=True, exist_ok=True)
    for key in (ca, host):
        if not key.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dxflow-lab {key.name}", "-f", str(key)],
                what=f"making {key}")
    if not Path(f"{host}-cert.pub").exists():
        run(["ssh-keygen", "-q", "-s", str(ca), "-I", "dxlab-n1", "-h", "-n", "n1,10.77.0.11", f"{host}.pub"],
            what="signing n1's host key with the lab CA")
    return Path(f"{ca}.pub")


def _login_names(layout: Layout) -> list[str]:
    return sorted({os.uname().nodename, os.uname().nodename.split(".")[0], layout.login_name})


def totp_file(layout: Layout, user: str = USER) -> Path:
    return folder(layout) / "totp" / user


def totp_secret(layout: Layout | None = None, user: str = USER) -> str:
    """The base32 TOTP secret of ``user`` (root only): ``oathtool --totp -b SECRET`` gives a code."""
    return totp_file(layout or Layout(), user).read_text().splitlines()[0].strip()


def _mfa(layout: Layout) -> None:
    if not Path("/usr/lib/x86_64-linux-gnu/security/pam_google_authenticator.so").exists() \
            and shutil.which("google-authenticator") is None:
        raise LabError("the mfa profile needs libpam-google-authenticator (and oathtool for the tests): "
                       "apt-get install libpam-google-authenticator oathtool")
    if not SSHD_MFA.exists():
        SSHD_MFA.parent.mkdir(parents=True, exist_ok=True)
        SSHD_MFA.symlink_to(SSHD)
    _write(PAM_FILE, f"# dxflow lab, profile mfa: a TOTP code after the key (AuthenticationMethods)\n"
                     f"auth required pam_google_authenticator.so secret={folder(layout)}/totp/${{USER}} user=root\n"
                     "@include common-account\n@include common-session\n")
    secret_file = totp_file(layout)
    if not secret_file.exists():
        secret = base64.b32encode(secrets.token_bytes(10)).decode()
        secret_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(secret_file, f'{secret}\n" TOTP_AUTH\n', 0o400)


def _adopt() -> None:
    if not Path("/lib/security/pam_slurm_adopt.so").exists():
        raise LabError("the adopt profile needs Debian's libpam-slurm-adopt: apt-get install libpam-slurm-adopt")
    if not SSHD_ADOPT.exists():
        SSHD_ADOPT.parent.mkdir(parents=True, exist_ok=True)
        SSHD_ADOPT.symlink_to(SSHD)
    _write(ADOPT_PAM_FILE, "# dxflow lab, profile adopt: connections join the user's job on the node (none: refused)\n"
                           "@include common-auth\n"
                           # nodename= (and SLURM_CONF, where its sshd starts): the module finds n1's own
                           # cgroups (slurm_n1 under n1's CgroupMountpoint) and picks the newest job by
                           # their mtime, as on a real node; otherwise every stat fails and it takes
                           # whichever job slurmd lists last
                           f"account required pam_slurm_adopt.so log_level=debug service={ADOPT_SERVICE} "
                           "nodename=n1\n"
                           "@include common-account\n@include common-session\n")


def _hostbased(layout: Layout) -> None:
    _write(KEYSIGN_CONF, "# dxflow lab, profile hostbased: ssh-keysign may sign for hostbased logins\n"
                         "EnableSSHKeysign yes\n")
    names = _login_names(layout)
    _set_block(SHOSTS_EQUIV, names)
    _set_block(KNOWN_HOSTS2, [f"{','.join(names)},{layout.host_addr} {k}" for k in network.host_keys(layout.ssh_dir)])


def start(layout: Layout, profile: Profile) -> list[int]:
    """The profile's sshd, started unless running; their pids."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    pids = []
    for d in profile.daemons:
        pid = procs.daemon_pid(pidfile(layout, profile, d), "sshd")
        if pid is None:
            conf = folder(layout) / f"sshd_config.{profile.name}.{d.port}"
            _write(conf, sshd_config(layout, profile, d), 0o600)
            node = Node(d.node)
            log.info("starting sshd for profile %s on %s:%d", profile.name, node.name, d.port)
            logf = layout.log_dir / f"sshd-profile-{profile.name}-{d.port}.log"
            argv = [str(d.program), "-f", str(conf), "-E", str(logf)]
            if d.program == SSHD_ADOPT:  # pam_slurm_adopt reads the node's slurm.conf and cgroup.conf
                argv = ["env", f"SLURM_CONF={layout.node_slurm_conf(node)}", *argv]
            start_daemon(network.node_argv(layout, node, argv),
                         log_file=logf, what=f"sshd for profile {profile.name}")
            deadline = time.monotonic() + 10
            while pid is None and time.monotonic() < deadline:
                time.sleep(0.1)
                pid = procs.daemon_pid(pidfile(layout, profile, d), "sshd")
            if pid is None:
                raise LabError(f"sshd for profile {profile.name} did not stay up; see {logf}")
        pids.append(pid)
    return pids


# -- carol's side ----------------------------------------------------------------------------------

def _own(path: Path, entry: pwd.struct_passwd, mode: int) -> None:
    os.chown(path, entry.pw_uid, entry.pw_gid)
    os.chmod(path, mode)


def client(layout: Layout, profile: Profile) -> None:
    """carol's ``~/.ssh`` for the profile; her master and SSH connections of an earlier profile ended."""
    if users.ensure_user(USER):  # made for the lab: `lab down` removes her as it does alice and bob
        state = lab_state.load(layout.state_file)
        if state is not None:
            state.remember("users_created", USER)
            lab_state.save(state, layout.state_file)
    entry = pwd.getpwnam(USER)
    home = Path(entry.pw_dir)
    reset(layout)
    ssh = home / ".ssh"
    if ssh.exists():
        shutil.rmtree(ssh)
    ssh.mkdir(mode=0o700)
    authorized = []
    if profile.key:
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{USER}@dxflow-lab", "-f", str(ssh / profile.key)],
            what=f"making an SSH key for {USER}")
        authorized.append((ssh / f"{profile.key}.pub").read_text().strip())
    (ssh / "authorized_keys").write_text("".join(f"{k}\n" for k in authorized))
    (ssh / "config").write_text(profile.client)
    if profile.name == "include":
        (ssh / "config.d").mkdir(mode=0o700)
        (ssh / "config.d" / "lab.conf").write_text(INCLUDED)
    known = [f"{','.join(profile.known)} {k}" for k in network.host_keys(layout.ssh_dir)] if profile.known else []
    if profile.name == "certs":
        known.append(f"@cert-authority n1,[n1]:*,10.77.0.11 {_ca(layout).read_text().strip()}")
    (ssh / "known_hosts").write_text("".join(f"{line}\n" for line in known))
    for dirpath, dirnames, filenames in os.walk(ssh):
        _own(Path(dirpath), entry, 0o700)
        for f in filenames:
            _own(Path(dirpath) / f, entry, 0o644 if f.endswith(".pub") else 0o600)


def reset(layout: Layout) -> None:
    """Stop carol's master and her ControlMasters: the next command connects under the new profile."""
    if not users.exists(USER):
        return
    home = Path(pwd.getpwnam(USER).pw_dir)
    subprocess.run(["runuser", "-u", USER, "--", str(layout.bin_link), "master", "stop"],
                   capture_output=True, timeout=30, check=False)
    for sock in home.glob(".dxflow/hosts/*/ssh/*"):
        subprocess.run(["runuser", "-u", USER, "--", "ssh", "-S", str(sock), "-O", "exit", "x"],
                       capture_output=True, timeout=10, check=False)


# -- up, down, status --------------------------------------------------------------------------------

def up(name: str, layout: Layout | None = None) -> dict:
    layout = layout or Layout()
    profile = get(name)
    folder(layout).mkdir(mode=0o755, parents=True, exist_ok=True)
    if name == "certs":
        _ca(layout)
    elif name == "mfa":
        _mfa(layout)
    elif name == "hostbased":
        _hostbased(layout)
    elif name == "adopt":
        _adopt()
    start(layout, profile)
    client(layout, profile)
    return status(layout)[name]


def down(name: str, layout: Layout | None = None) -> None:
    layout = layout or Layout()
    profile = get(name)
    reset(layout)  # carol's connections through it end with it
    pids = [p for d in profile.daemons if (p := procs.daemon_pid(pidfile(layout, profile, d), "sshd"))]
    if pids:
        procs.terminate(pids, what=f"sshd for profile {name}")
    if name == "mfa":
        PAM_FILE.unlink(missing_ok=True)
    elif name == "adopt":
        ADOPT_PAM_FILE.unlink(missing_ok=True)
    elif name == "hostbased":
        KEYSIGN_CONF.unlink(missing_ok=True)
        _set_block(SHOSTS_EQUIV, [])
        _set_block(KNOWN_HOSTS2, [])


def status(layout: Layout | None = None) -> dict[str, dict]:
    layout = layout or Layout()
    out = {}
    for p in PROFILES.values():
        pids = [procs.daemon_pid(pidfile(layout, p, d), "sshd") for d in p.daemons]
        # "up": its sshd run (None for a profile without a server of its own: only carol's side)
        out[p.name] = {"what": p.what, "up": all(pids) if pids else None, "sshd": [f"n{d.node}:{d.port}" for d in p.daemons],
                       "node": p.node}
    return out
