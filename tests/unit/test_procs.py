"""Process trees (:mod:`dxflow.procs`): stopping everything a job's user started, and never root's."""

from __future__ import annotations

import os
import pwd
import subprocess
import time

import pytest

from dxflow.procs import read_proc, stop_tree, tree


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start processes as another user")
def test_stop_tree_gets_daemonized_and_setsid_children():
    nobody = _nobody()
    # a leader with a child, a grandchild that setsid()s, and one that daemonizes (double fork)
    script = ("import os,subprocess,time\n"
              "subprocess.Popen(['sleep','300'])\n"
              "subprocess.Popen(['setsid','sleep','301'])\n"
              "subprocess.Popen(['sh','-c','sleep 302 & exit 0'])\n"
              "time.sleep(300)\n")
    leader = subprocess.Popen(["/usr/bin/python3", "-c", script], user=nobody.pw_uid, group=nobody.pw_gid,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the daemonized sleep 302 is re-parented to init but keeps the leader's session id
        deadline = time.time() + 5
        while len(tree(leader.pid, nobody.pw_uid)) < 4 and time.time() < deadline:
            time.sleep(0.05)
        members = tree(leader.pid, nobody.pw_uid)
        assert len(members) >= 4
        assert tree(leader.pid, 12345) == set()  # uid filter: nobody's processes only
        left = stop_tree(leader.pid, nobody.pw_uid, timeout=2)
        leader.wait(timeout=2)
        assert left == set()
        assert all(read_proc(p) is None for p in members)
    finally:
        if leader.poll() is None:
            leader.kill()


def test_stop_tree_refuses_root():
    with pytest.raises(ValueError):
        stop_tree(os.getpid(), 0)
