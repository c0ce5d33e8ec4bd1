"""JOB[:NODES] targets (dxflow/cli/targets.py) and node sets (dxflow/schedulers/hostlist.py): every
malformed form is a UsageError (exit 2) before anything is contacted; node sets expand and fold with
ClusterShell; resolution against the master's agent list names ended jobs and foreign nodes."""

import io
import subprocess
import sys

import pytest

from dxflow.cli import targets
from dxflow.cli.fanout import Lines, NodeResult, gathered, summary
from dxflow.cli.targets import Resolved, Target, parse, port_pair, resolve
from dxflow.errors import NotFound, UsageError
from dxflow.schedulers.hostlist import expand_hostlist, fold, node_set


@pytest.mark.parametrize("text, job, nodes, bare", [
    ("12", "12", None, False),
    ("12:n2", "12", "n2", False),
    ("12:n[1-4,7]", "12", "n[1-4,7]", False),
    ("12:n1,n2,n3", "12", "n[1-3]", False),
    ("12:n[1-8]!n3", "12", "n[1-2,4-8]", False),
    ("12:all", "12", "all", False),
    ("12:*", "12", "all", False),
    ("12_3:n1", "12_3", "n1", False),
    ("12+1:n1", "12+1", "n1", False),
    ("12[4].pbs-server:n1", "12[4].pbs-server", "n1", False),
    ("341162.dxlab", "341162.dxlab", None, False),
    ("n2", "n2", None, True),
])
def test_parse_accepts_and_folds(text, job, nodes, bare):
    assert parse(text) == Target(text, job, nodes, bare)


@pytest.mark.parametrize("bad", [
    "", " ", ":", ":n1", "12:", "12:n1:x", "12:n[1-", "12:n]1[", "12:n[a-b]", "12:n[2-1]", "12:@rack1",
    "12:n[1-100000000]", "12:n[1-1000]-[1-1000]", "12:a/b", "12 :n1", "12:n1,,n2", "abc:n1", "ab c",
    "../x", "12:n1!",
])
def test_parse_refuses_malformed(bad):
    with pytest.raises(UsageError):
        parse(bad)


def test_non_numeric_job_with_a_node_is_refused_unless_a_by_hand_job(monkeypatch):
    monkeypatch.setattr(targets, "by_hand_jobs", lambda: {"mywork"})
    assert parse("mywork:vm") == Target("mywork:vm", "mywork", "vm", True)
    with pytest.raises(UsageError, match="not a job id"):
        parse("other:vm")


def test_one_node_commands_refuse_sets():
    assert parse("12:n1", several=False).nodes == "n1"
    for text in ("12:all", "12:*", "12:n[1-2]"):
        with pytest.raises(UsageError, match="one node"):
            parse(text, several=False, command="shell")


@pytest.mark.parametrize("text, want", [("8888", (None, 8888)), ("9000:8888", (9000, 8888)),
                                        ("1:65535", (1, 65535))])
def test_port_pair(text, want):
    assert port_pair(text) == want


@pytest.mark.parametrize("bad", ["0", "65536", "-1", "x", "8888:", ":8888", "1:2:3", "99999:80", "80:0", ""])
def test_port_pair_refuses(bad):
    with pytest.raises(UsageError):
        port_pair(bad)


def test_node_sets_fold_and_expand():
    assert node_set("n[1-4,7]") == ["n1", "n2", "n3", "n4", "n7"]
    assert fold(["n7", "n1", "n2", "n3", "n4"]) == "n[1-4,7]"
    assert fold(["n10", "n9", "gpu01"]) == "gpu01,n[9-10]"
    # the scheduler's own lists keep their order and refuse clush's operators
    assert expand_hostlist("n[1-2,5],gpu[08-10]") == ["n1", "n2", "n5", "gpu08", "gpu09", "gpu10"]
    with pytest.raises(UsageError):
        expand_hostlist("n[1-4]!n2")


class FakeClient:
    """The master's ``/api/agents?all=1`` answer; it cannot say more of a job's nodes (an older master)."""

    def __init__(self, agents):
        self.agents = agents
        self.asked = 0

    def json(self, method, path, body=None, timeout=None):
        assert path.startswith("/api/agents?all=1")
        self.asked += 1
        return self.agents

    def job_nodes(self, job):
        return None


def agent(job, node, state="ready", detail=""):
    return {"job": job, "node": node, "state": state, "detail": detail}


@pytest.fixture
def no_wait(monkeypatch):
    monkeypatch.setattr(targets, "LOOK_AGAIN", 0.0)


def test_resolve_all_and_sets(no_wait):
    client = FakeClient([agent("12", "n2"), agent("12", "n1"), agent("12", "n10", "lost"), agent("13", "n1")])
    assert resolve(client, parse("12:all")) == Resolved("12", ["n1", "n2", "n10"])
    assert resolve(client, parse("12:n[1-2]")) == Resolved("12", ["n1", "n2"])
    assert resolve(client, parse("12")) == Resolved("12", [None])
    assert resolve(client, parse("12:all")).where == "job 12 node n[1-2,10]"


def test_resolve_names_an_ended_job(no_wait):
    client = FakeClient([agent("12", "n1", "gone", "job ending"), agent("12", "n2", "gone", "job ending")])
    with pytest.raises(NotFound, match=r"job 12 has ended: its agents on n\[1-2\] are gone \(job ending\)"):
        resolve(client, parse("12:all"))
    with pytest.raises(NotFound, match="job 99 is not running"):
        resolve(client, parse("99"))


def test_resolve_refuses_nodes_not_of_the_job(no_wait):
    client = FakeClient([agent("12", "n1"), agent("12", "n2"), agent("12", "n3", "gone", "registration removed")])
    with pytest.raises(NotFound, match=r"job 12 runs on n\[1-2\]: n\[3-4\] is not one of its nodes \(its agent on "
                                       r"n3 is gone\)"):
        resolve(client, parse("12:n[1-4]"))


def test_bare_node_name(no_wait):
    client = FakeClient([agent("12", "n1"), agent("12", "n2"), agent("13", "n2"), agent("14", "n3", "gone"),
                         agent("mywork", "vm")])
    assert resolve(client, parse("n1")) == Resolved("12", ["n1"])
    with pytest.raises(UsageError, match="several of your jobs run on n2: 12, 13"):
        resolve(client, parse("n2"))
    with pytest.raises(NotFound, match="none of your jobs runs on a node"):
        resolve(client, parse("n3"))
    assert resolve(client, parse("mywork")) == Resolved("mywork", [None])  # a by-hand job's name wins


def test_resolution_looks_again_for_a_job_not_seen_yet(monkeypatch):
    monkeypatch.setattr(targets, "LOOK_AGAIN", 5.0)
    client = FakeClient([])
    real = client.json

    def later(*a, **kw):  # the agent registers while the command looks
        if client.asked >= 2:
            client.agents = [agent("12", "n1")]
        return real(*a, **kw)

    client.json = later
    assert resolve(client, parse("12")) == Resolved("12", [None])


def test_lines_keep_nodes_apart():
    out, err = io.BytesIO(), io.BytesIO()
    lines = Lines(out=out, err=err)
    lines.write("n1", "stdout", b"hel")
    lines.write("n2", "stdout", b"other\n")
    lines.write("n1", "stdout", b"lo\nwor")
    lines.write("n1", "stderr", b"oops\n")
    lines.close("n1")
    assert out.getvalue() == b"n2: other\nn1: hello\nn1: wor\n"
    assert err.getvalue() == b"n1: oops\n"


def test_gather_and_summary_fold_nodes():
    rs = [NodeResult(n, 0, "ok", stdout=bytearray(b"same\n")) for n in ("n1", "n2", "n4")]
    rs += [NodeResult("n3", 3, "failed", stdout=bytearray(b"odd\n")), NodeResult("n5", None, "lost", "connection reset"),
           NodeResult("n6", 3, "failed")]
    assert gathered(rs) == ("---------------\nn[1-2,4] (3)\n---------------\nsame\n"
                            "---------------\nn3 (1)\n---------------\nodd\n")
    assert summary(rs) == "n[3,6]: exit 3; n5: lost: connection reset"


@pytest.mark.parametrize("argv", [
    ["exec", "12:n[1-", "--", "true"], ["exec", "abc:n1", "--", "true"], ["logs", "12:"],
    ["cp", "12:n[1-:/x", "."], ["info", "12:@g"], ["ports", "1:2:3"], ["forward", "12", "70000"],
    ["forward", "12", "0:8888"], ["shell", "12:all"], ["exec", "--fanout", "0", "12:all", "--", "true"],
])
def test_cli_exits_2_before_contacting_anything(tmp_path, argv):
    # HOME is an empty folder: had the command looked for (or started) a master, it would leave ~/.dxflow
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "dxflow", *argv], capture_output=True, text=True, env=env,
                          timeout=60)
    started = list(tmp_path.rglob("master.log"))
    if started:  # the test failed: do not leave the master it started running
        subprocess.run([sys.executable, "-m", "dxflow", "master", "stop"], env=env, capture_output=True, timeout=60)
    assert not started, f"a master was started: {proc.stderr}"
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_broken_clustershell_config_in_the_environment_is_not_read(tmp_path):
    # a hook runs as root in an environment dxflow does not choose: ClusterShell reads defaults.conf when
    # imported, and one named by $CLUSTERSHELL_CFGDIR or under $HOME must not break (or steer) dxflow
    for folder in (tmp_path / "cfg", tmp_path / "home" / ".local" / "etc" / "clustershell"):
        folder.mkdir(parents=True)
        (folder / "defaults.conf").write_text("garbage[[\n[nodeset]\nfold_axis=x\n")
    env = {"CLUSTERSHELL_CFGDIR": str(tmp_path / "cfg"), "HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    code = ("import os; from dxflow.schedulers.hostlist import expand_hostlist, fold; "
            "print(expand_hostlist('n[1-2]'), fold(['n1', 'n2']), os.environ['HOME'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout.split() == ["['n1',", "'n2']", "n[1-2]", str(tmp_path / "home")], proc.stderr


def test_parse_target_hands_on_a_comma_list():
    from dxflow.cli.util import parse_target

    assert parse_target("12") == ("12", None)
    assert parse_target("12:all") == ("12", None)
    assert parse_target("12:n[1-3]") == ("12", "n1,n2,n3")
    with pytest.raises(UsageError):
        parse_target("12:n[1-")


def test_log_path_pattern_per_node():
    from dxflow.cli.logfan import expand

    assert expand("out-%j-%N.log", "12", "n2") == "out-12-n2.log"
    assert expand("100%%-%N-%t", "12", "n2") == "100%-n2-%t"  # %t (a task) is left as written
