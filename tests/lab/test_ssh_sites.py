"""SSH as real sites run it (issue #10 item 1): each lab SSH profile, then `dxflow ls`, exec and cp work.

Each test brings one profile up (``dxflow lab profile up NAME``: extra sshd on a node, and the
client side of the profiles' user carol), runs a job of carol's on the profile's node, and uses it
through dxflow. The transport the master chose is read from ``dxflow master status --json``.
"""

from __future__ import annotations

import hashlib
import os
import pty
import select
import time
from pathlib import Path

import pytest

from dxflow.ssh.transport import adopted_job

from conftest import DXFLOW, Jobs, as_user, dxflow, dxflow_json, popen_as, run, stop, wait_agents, wait_for

CAROL = "carol"
HOME = Path("/home/carol")
TOTP = Path("/var/lib/dxflow-lab/ssh-profiles/totp/carol")


def profile(name: str) -> None:
    run([DXFLOW, "lab", "profile", "up", name], timeout=180)


@pytest.fixture
def carol(lab) -> Jobs:
    """carol's jobs, her transport setting cleared before and after, and no ControlMaster left over."""
    (HOME / ".dxflow" / "config").unlink(missing_ok=True)
    end_control_masters()   # one left by another profile's test would be taken for this one's (same socket)
    j = Jobs()
    yield j
    j.cancel_all()
    (HOME / ".dxflow" / "config").unlink(missing_ok=True)
    run(["runuser", "-u", CAROL, "--", DXFLOW, "master", "stop"], check=False)
    end_control_masters()


def end_control_masters() -> None:
    """End carol's ControlMasters (a stopped master leaves them, for the next one: ControlPersist ends them)."""
    for sock in HOME.glob(".dxflow/hosts/*/ssh/*"):
        as_user(CAROL, ["ssh", "-S", str(sock), "-O", "exit", "n1"], check=False)


def force(transport: str) -> None:
    """carol's own ``ssh_transport`` (~/.dxflow/config, which wins over the site's)."""
    as_user(CAROL, ["mkdir", "-p", str(HOME / ".dxflow")])
    as_user(CAROL, ["sh", "-c", f"echo 'ssh_transport = \"{transport}\"' > ~/.dxflow/config"])


def transport_to(node: str) -> dict:
    tunnels = dxflow_json(CAROL, "master", "status")["tunnels"]
    return tunnels[node]


def start_job(jobs: Jobs, node: str) -> str:
    job = jobs.submit(CAROL, "sleep 600", "-w", node)
    jobs.wait_running(job, timeout=180)  # the lab's nodes have two CPUs, shared with other tests
    return job


def ls_exec_cp(job: str, node: str, tmp: str) -> None:
    """The three things a user does first: list the agent, run a command there, copy a file both ways."""
    wait_agents(CAROL, job, 1, timeout=60)
    assert dxflow(CAROL, "exec", job, "hostname").stdout.strip() == node
    as_user(CAROL, ["sh", "-c", f"head -c 300000 /dev/urandom > /tmp/{tmp}.up"])
    dxflow(CAROL, "cp", "-q", f"/tmp/{tmp}.up", f"{job}:{tmp}.remote")
    dxflow(CAROL, "cp", "-q", f"{job}:{tmp}.remote", f"/tmp/{tmp}.down")
    assert Path(f"/tmp/{tmp}.up").read_bytes() == Path(f"/tmp/{tmp}.down").read_bytes()
    for p in (f"/tmp/{tmp}.up", f"/tmp/{tmp}.down", HOME / f"{tmp}.remote"):
        Path(p).unlink(missing_ok=True)


def test_host_certificate_with_only_a_cert_authority_line(carol):
    """known_hosts holds only `@cert-authority`: paramiko cannot verify the host, OpenSSH can, and is chosen."""
    profile("certs")
    assert (HOME / ".ssh/known_hosts").read_text().startswith("@cert-authority")
    job = start_job(carol, "n1")
    ls_exec_cp(job, "n1", "certs")
    t = transport_to("n1")
    assert t["transport"] == "openssh" and t["connected"]
    # channels (the agent's heartbeat stream among them) go through the ControlMaster's mux socket, not
    # through an `ssh -W` process each
    assert run(["pgrep", "-u", CAROL, "-f", "ssh .*-W "], check=False).stdout.strip() == ""


def test_a_cert_authority_line_does_not_stop_paramiko_for_other_hosts(carol, tmp_path):
    """With `@cert-authority` in her known_hosts, a node with a plain key still goes through paramiko."""
    profile("include")   # plain keys on port 22
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "ca")])
    with open(HOME / ".ssh/known_hosts", "a") as f:
        f.write(f"@cert-authority *.elsewhere {(tmp_path / 'ca.pub').read_text().strip()}\n")
    force("paramiko")
    job = start_job(carol, "n1")
    ls_exec_cp(job, "n1", "ca-line")
    assert transport_to("n1")["transport"] == "paramiko"


def test_hostbased_for_a_user_without_keys(carol):
    profile("hostbased")
    assert not list((HOME / ".ssh").glob("id_*")), "carol must have no key for this profile"
    job = start_job(carol, "n2")
    ls_exec_cp(job, "n2", "hostbased")
    assert transport_to("n2")["transport"] == "openssh"
    log = Path("/var/lib/dxflow-lab/log/sshd-profile-hostbased-2202.log").read_text()
    assert "Accepted hostbased for carol" in log


def test_two_proxyjump_hops_are_all_used(carol):
    """n1:2204 admits carol only from n2, n2:2205 only from n1: reachable only through both hops."""
    profile("jump")
    direct = as_user(CAROL, ["ssh", "-o", "BatchMode=yes", "-o", "ProxyJump=none", "n1", "true"], check=False)
    assert direct.returncode != 0   # the profile holds: no way in but through the hops
    job = start_job(carol, "n1")
    ls_exec_cp(job, "n1", "jump")
    assert transport_to("n1")["transport"] == "paramiko"   # keys and known hosts: paramiko follows both hops


def test_two_proxyjump_hops_through_openssh(carol):
    profile("jump")
    force("openssh")
    job = start_job(carol, "n1")
    ls_exec_cp(job, "n1", "jump-openssh")
    assert transport_to("n1")["transport"] == "openssh"


def test_a_key_named_in_an_included_file(carol):
    """carol's only key is named in a file her config Includes; paramiko (forced) finds it through ssh -G."""
    profile("include")
    force("paramiko")
    job = start_job(carol, "n1")
    ls_exec_cp(job, "n1", "include")
    assert transport_to("n1")["transport"] == "paramiko"


def _in_a_terminal(argv: list[str], secret: str, timeout: float = 90) -> tuple[int, str, int]:
    """Run argv as carol in a terminal of its own, typing a fresh TOTP code at each prompt:
    (exit code, what the terminal showed, how many prompts there were)."""
    env = ["env", "-i", f"HOME={HOME}", "PATH=/usr/local/bin:/usr/bin:/bin", f"USER={CAROL}", f"LOGNAME={CAROL}"]
    # runuser -u, not -l: `-l ... -c` starts a new session without the terminal, where ssh cannot prompt
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp("runuser", ["runuser", "-u", CAROL, "--", *env, *argv])
    shown, prompts, deadline = b"", 0, time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1)
        if not ready:
            continue
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        shown += data
        if shown.count(b"Verification code") > prompts:
            prompts += 1
            code = run(["oathtool", "--totp", "-b", secret]).stdout.strip()
            os.write(fd, f"{code}\n".encode())
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace"), prompts


def test_mfa_prompt_reaches_the_terminal_once(carol):
    """A TOTP code after the key: the master cannot answer; the first command asks in the user's terminal,
    once, and every later command (no terminal at all) goes through the connection made then."""
    profile("mfa")
    secret = TOTP.read_text().split()[0]
    job = start_job(carol, "n1")
    wait_for(lambda: any(a["job"] == job for a in dxflow_json(CAROL, "ls")), 60, what="carol's agent listed")
    without_terminal = dxflow(CAROL, "exec", job, "hostname", check=False)
    assert without_terminal.returncode != 0 and "terminal" in without_terminal.stderr
    code, shown, prompts = _in_a_terminal([DXFLOW, "exec", job, "hostname"], secret)
    assert code == 0, shown
    assert prompts == 1 and shown.rstrip().endswith("n1")
    ls_exec_cp(job, "n1", "mfa")       # no terminal, no prompt: the ControlMaster made in the terminal
    assert transport_to("n1")["transport"] == "openssh"


def test_bob_cannot_use_carols_ssh_connections(carol):
    """The ControlMaster sockets are carol's alone: bob can neither list nor use them (a 0700 folder)."""
    profile("certs")
    job = start_job(carol, "n1")
    wait_agents(CAROL, job, 1, timeout=60)
    dxflow(CAROL, "exec", job, "true")
    sockets = wait_for(lambda: list(HOME.glob(".dxflow/hosts/*/ssh/*")), 10, what="carol's ControlMaster socket")
    folder = sockets[0].parent
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert as_user("bob", ["ls", str(folder)], check=False).returncode != 0
    attempt = as_user("bob", ["ssh", "-S", str(sockets[0]), "-O", "check", "n1"], check=False)
    assert attempt.returncode != 0 and "Master running" not in attempt.stderr
    used = as_user("bob", ["ssh", "-S", str(sockets[0]), "-o", "BatchMode=yes", "-o", "ProxyCommand=/bin/false",
                           "n1", "id", "-un"], check=False)
    assert used.returncode != 0 and "carol" not in used.stdout


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_a_connection_adopted_into_a_job_is_known_as_such(carol, transport):
    """Under pam_slurm_adopt a connection joins one of the user's jobs and ends with it (issue #10 item 2):
    the master reads where its connection landed and says so; when that job ends, so does the connection.
    (OpenSSH: the node's first ControlMaster, on the node's socket, is filed under the job it landed in.)"""
    profile("adopt")
    force(transport)
    if not job_running_elsewhere():   # (an earlier test's job may still be ending: its step lets carol in)
        wait_for(lambda: as_user(CAROL, ["ssh", "-o", "BatchMode=yes", "n1", "true"], check=False).returncode != 0,
                 60, interval=2, what="pam_slurm_adopt to refuse carol without a job on n1")
    job = start_job(carol, "n1")
    ls_exec_cp(job, "n1", "adopt")
    t = transport_to("n1")
    assert t["job"] == job and t["connected"] and t["transport"] == transport
    run(["scancel", job])
    wait_for(lambda: not transport_to("n1")["connected"], 60, what="the connection to end with its job")


def job_socket(node: str, job: str) -> Path:
    """The socket of the ControlMaster of JOB's agents on NODE (dxflow.ssh.control.control_path)."""
    name = hashlib.sha256(f"{node}\0{job}".encode()).hexdigest()[:16]
    return wait_for(lambda: next(iter(HOME.glob(f".dxflow/hosts/*/ssh/{name}")), None), 10,
                    what=f"job {job}'s ControlMaster socket")


def bob_cannot_use(socket: Path) -> None:
    assert as_user("bob", ["ls", str(socket.parent)], check=False).returncode != 0
    attempt = as_user("bob", ["ssh", "-S", str(socket), "-O", "check", "n1"], check=False)
    assert attempt.returncode != 0 and "Master running" not in attempt.stderr
    used = as_user("bob", ["ssh", "-S", str(socket), "-o", "BatchMode=yes", "-o", "ProxyCommand=/bin/false",
                           "n1", "id", "-un"], check=False)
    assert used.returncode != 0 and "carol" not in used.stdout


def job_running_elsewhere() -> bool:
    """carol had a job on n1 already when the refusal was tried (another test's, not yet gone)."""
    return bool(run(["squeue", "-h", "-u", CAROL, "-w", "n1", "-t", "PD,R"], check=False).stdout.strip())


def login_lands_in() -> str | None:
    """The job a plain login of carol's to n1 is adopted into (pam_slurm_adopt, profile ``adopt``)."""
    out = as_user(CAROL, ["ssh", "-o", "BatchMode=yes", "n1", "cat", "/proc/self/cgroup"], check=False).stdout
    return adopted_job(out)


def assert_newest_is_picked(newer: str) -> None:
    """What the tests rely on, as on a real node: with several jobs, a login lands in the newest."""
    assert login_lands_in() == newer, (
        "pam_slurm_adopt on n1:2207 did not put a login in the newest job: it finds the jobs' cgroup mtimes "
        "only with nodename=n1 on its PAM line and SLURM_CONF naming n1's slurm.conf (dxflow/lab/ssh_profiles.py)")


def jobs_connected(node: str) -> list[str]:
    """The jobs the master's live connections to NODE were adopted into, one entry per connection."""
    return sorted(str(c["job"]) for c in transport_to(node).get("connections", []))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
@pytest.mark.parametrize("copied_is_older", [True, False], ids=["copied-job-older", "copied-job-newer"])
def test_a_copy_survives_the_end_of_another_job_on_its_node(carol, copied_is_older, transport):
    """Two jobs of carol on n1 under pam_slurm_adopt: one connection each (a ControlMaster each, with OpenSSH),
    so cancelling one job mid-copy from the other's node breaks nothing of the copy (issue #10 item 2). With
    one connection per node, the connection lives in the older job (its agent connected first), so the "newer"
    case would break."""
    profile("adopt")
    force(transport)
    if not job_running_elsewhere():
        wait_for(lambda: as_user(CAROL, ["ssh", "-o", "BatchMode=yes", "n1", "true"], check=False).returncode != 0,
                 60, interval=2, what="pam_slurm_adopt to refuse carol without a job on n1")
    jobs = []
    for _ in range(2):  # the second starts once the first's agent is proven: each agent finds its job newest
        job = carol.submit(CAROL, "sleep 600", "-w", "n1", "--mem=200M")
        carol.wait_running(job, timeout=300)   # both of n1's CPUs: other tests' jobs may hold one for a while
        wait_agents(CAROL, job, 1, timeout=90)
        jobs.append(job)
    older, newer = jobs
    assert_newest_is_picked(newer)
    copied, cancelled = (older, newer) if copied_is_older else (newer, older)
    wait_for(lambda: jobs_connected("n1") == sorted(jobs), 60, what="one connection per job on n1")
    if transport == "openssh":   # the newer job's ControlMaster is on a socket of its own, as private as the rest
        bob_cannot_use(job_socket("n1", newer))
    # the copy goes into a fifo read here: it stays under way, held by this reader, until the cancelled job's
    # connection is seen gone (a fifo is written straight, without a part file: a break could not resume)
    big, fifo = HOME / "adopt-big", Path(f"/tmp/adopt-fifo-{copied}")
    as_user(CAROL, ["sh", "-c", f"head -c 300M /dev/urandom > {big} && mkfifo {fifo}"])
    try:
        cp = popen_as(CAROL, [DXFLOW, "cp", f"{copied}:{big.name}", str(fifo)])
        try:
            h = hashlib.sha256()
            with open(fifo, "rb") as f:
                h.update(f.read(4 << 20))
                run(["scancel", cancelled])
                wait_for(lambda: jobs_connected("n1") == [copied], 60, what="the cancelled job's connection to end")
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            _, err = cp.communicate(timeout=120)
        finally:
            stop(cp)
        assert cp.returncode == 0, err
        assert "resuming" not in err, f"the copy broke off when job {cancelled} ended: {err}"
        assert h.hexdigest() == sha256(big)
        assert dxflow(CAROL, "exec", copied, "hostname").stdout.strip() == "n1"
    finally:
        for p in (big, fifo):
            p.unlink(missing_ok=True)


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_a_job_on_another_jobs_connection_says_so_and_its_copy_resumes_when_that_job_ends(carol, transport):
    """A master started after both jobs: every login lands in the newer job, so the older job's agent borrows
    that connection (its note says so); when the newer job is cancelled mid-copy, the copy resumes (Range) on
    a connection of the older job's own, and logins landing in the ending job do not keep it from ending.
    (OpenSSH: the same with ControlMasters, the older job's own on its own socket.)"""
    profile("adopt")
    force(transport)
    if not job_running_elsewhere():
        wait_for(lambda: as_user(CAROL, ["ssh", "-o", "BatchMode=yes", "n1", "true"], check=False).returncode != 0,
                 60, interval=2, what="pam_slurm_adopt to refuse carol without a job on n1")
    older = carol.submit(CAROL, "sleep 600", "-w", "n1", "--mem=200M")
    carol.wait_running(older, timeout=300)
    wait_agents(CAROL, older, 1, timeout=90)
    run(["runuser", "-u", CAROL, "--", DXFLOW, "master", "stop"])
    end_control_masters()
    newer = carol.submit(CAROL, "sleep 600", "-w", "n1", "--mem=200M")
    carol.wait_running(newer, timeout=300)
    wait_for(lambda: run(["pgrep", "-f", f"dxflow.agent .*--job {newer} "], check=False).stdout.strip(), 60,
             what=f"job {newer}'s agent")
    assert_newest_is_picked(newer)
    wait_agents(CAROL, newer, 1, timeout=90)   # the first command starts a master: both jobs run already
    wait_agents(CAROL, older, 1, timeout=90)
    assert jobs_connected("n1") == [newer]
    note = next(a["detail"] for a in dxflow_json(CAROL, "ls") if a["job"] == older)
    assert f"through job {newer}'s SSH connection" in note
    big, down = HOME / "borrow-big", Path(f"/tmp/borrow-big-{older}")
    part = down.with_name(down.name + ".dxflow-part")
    as_user(CAROL, ["sh", "-c", f"head -c 300M /dev/urandom > {big}"])
    try:
        cp = popen_as(CAROL, [DXFLOW, "cp", f"{older}:{big.name}", str(down)])
        try:
            wait_for(lambda: part.exists() and part.stat().st_size > 0, 60, interval=0.05, what="the copy under way")
            run(["scancel", newer])
            _, err = cp.communicate(timeout=300)
        finally:
            stop(cp)
        assert cp.returncode == 0, err
        assert sha256(down) == sha256(big)
        wait_for(lambda: jobs_connected("n1") == [older], 60, what=f"job {older}'s own connection")
        # a check that ran while logins still landed in the ending job showed the agent lost with that reason
        # (docs/ssh.md): it is checked again every LOST_RETRY, and now on its own connection
        wait_for(lambda: next(a["detail"] for a in dxflow_json(CAROL, "ls") if a["job"] == older) == "", 30,
                 interval=1, what=f"job {older}'s agent ready on its own connection, with no note")
        # logins that landed in the ending job were closed at once: it ended by its signals, n1 was not drained
        assert "DRAIN" not in run(["scontrol", "show", "node", "n1"]).stdout
        log = Path("/var/lib/dxflow-lab/log/slurmd-n1.log").read_text()
        assert f"EXTERN STEP FOR {newer} STEPD TERMINATED" not in log
    finally:
        for p in (big, down, part):
            p.unlink(missing_ok=True)
