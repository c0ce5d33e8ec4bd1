"""Stand-in for the ``pbs`` module pbs_mom gives a hook (pbs_python), as much as dxflow's hook uses.

The event comes from the environment: FAKE_PBS_EVENT (execjob_begin, execjob_prologue,
execjob_epilogue, execjob_end) and FAKE_PBS_JOB, a JSON object of job attributes (id,
euser, egroup, Output_Path, Error_Path, Variable_List). ``accept()`` ends the hook the way
pbs_python does (SystemExit). ``logmsg`` checks its level as pbs_python does (TypeError for
anything else) and writes ``pbs.logmsg(LOG_ERROR): …`` lines to stderr; the constants have
pbs_python's values (SEVERITY_LOG_* in src/include/hook.h, module_pbs_v1.c).

FAKE_PBS_PYTHON=2.7 makes the interpreter look like the Python 2.7 that PBS Professional
18.x-19.x embed, as far as a hook's use of ``subprocess`` goes: the hook's ``subprocess`` (its
global, bound before ``import pbs``, and ``sys.modules`` for a later import) becomes a module
with 2.7's names only — no ``run``, ``DEVNULL``, ``TimeoutExpired`` — whose ``call``,
``check_call``, ``check_output``, ``Popen.wait`` and ``Popen.communicate`` take no ``timeout``
(a TypeError, as 2.7's signatures raise). The real module, which Python 3 itself uses, is
left alone.
"""
import json
import os
import subprocess
import sys
import types

EXECJOB_BEGIN, EXECJOB_PROLOGUE, EXECJOB_LAUNCH, EXECJOB_EPILOGUE, EXECJOB_END = 1, 2, 3, 4, 5
LOG_DEBUG, LOG_WARNING, LOG_ERROR = 5, 6, 7
_LEVELS = {LOG_DEBUG: "LOG_DEBUG", LOG_WARNING: "LOG_WARNING", LOG_ERROR: "LOG_ERROR"}
_EVENTS = {"execjob_begin": EXECJOB_BEGIN, "execjob_prologue": EXECJOB_PROLOGUE,
           "execjob_launch": EXECJOB_LAUNCH, "execjob_epilogue": EXECJOB_EPILOGUE, "execjob_end": EXECJOB_END}


#: subprocess.__all__ of Python 2.7, plus the two names hooks commonly use besides.
_PY27_NAMES = ("Popen", "PIPE", "STDOUT", "call", "check_call", "check_output", "CalledProcessError",
               "list2cmdline", "mswindows")


def _refuse_timeout(fn, name):
    def wrapper(*args, **kwargs):
        if "timeout" in kwargs:
            raise TypeError("%s() got an unexpected keyword argument 'timeout'" % name)
        return fn(*args, **kwargs)
    return wrapper


class _Popen27(subprocess.Popen):
    def wait(self, *args, **kwargs):
        if args or kwargs:
            raise TypeError("wait() takes exactly 1 argument (%d given)" % (1 + len(args) + len(kwargs)))
        return subprocess.Popen.wait(self)

    def communicate(self, input=None, **kwargs):
        if kwargs:
            raise TypeError("communicate() got an unexpected keyword argument %r" % sorted(kwargs)[0])
        return subprocess.Popen.communicate(self, input)


def _python27_subprocess():
    module = types.ModuleType("subprocess")
    for name in _PY27_NAMES:
        if hasattr(subprocess, name):
            setattr(module, name, getattr(subprocess, name))
    module.Popen = _Popen27
    for name in ("call", "check_call", "check_output"):
        setattr(module, name, _refuse_timeout(getattr(subprocess, name), name))
    sys.modules["subprocess"] = module
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "subprocess", None) is subprocess:
        main.subprocess = module


if os.environ.get("FAKE_PBS_PYTHON") == "2.7":
    _python27_subprocess()


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
    if level not in _LEVELS:
        raise TypeError("Invalid severity or eventtype value <%s>" % level)
    sys.stderr.write("pbs.logmsg(%s): %s\n" % (_LEVELS[level], msg))
