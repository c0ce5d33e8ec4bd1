"""Stand-in for the ``pbs`` module pbs_mom gives a hook (pbs_python), as much as dxflow's hook uses.

The event comes from the environment: FAKE_PBS_EVENT (execjob_begin, execjob_prologue,
execjob_epilogue, execjob_end) and FAKE_PBS_JOB, a JSON object of job attributes (id,
euser, egroup, Output_Path, Error_Path, Variable_List). ``accept()`` ends the hook the way
pbs_python does (SystemExit); logmsg writes to stderr.
"""
import json
import os
import sys

EXECJOB_BEGIN, EXECJOB_PROLOGUE, EXECJOB_LAUNCH, EXECJOB_EPILOGUE, EXECJOB_END = 1, 2, 3, 4, 5
LOG_DEBUG, LOG_ERROR = 4, 1
_EVENTS = {"execjob_begin": EXECJOB_BEGIN, "execjob_prologue": EXECJOB_PROLOGUE,
           "execjob_launch": EXECJOB_LAUNCH, "execjob_epilogue": EXECJOB_EPILOGUE, "execjob_end": EXECJOB_END}


class _Job:
    def __init__(self, attrs):
        for key, value in attrs.items():
            setattr(self, key, value)


class _Event:
    hook_name = "dxflow"

    def __init__(self):
        self.type = _EVENTS[os.environ["FAKE_PBS_EVENT"]]
        self.job = _Job(json.loads(os.environ["FAKE_PBS_JOB"]))

    def accept(self):
        sys.exit(0)

    def reject(self, msg=""):
        sys.stderr.write("rejected: %s\n" % msg)
        sys.exit(1)


def event():
    return _Event()


def logmsg(level, msg):
    sys.stderr.write("pbs.logmsg(%s): %s\n" % (level, msg))
