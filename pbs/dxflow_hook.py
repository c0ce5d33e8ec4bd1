"""dxflow: PBS Professional / OpenPBS hook — the job's agent on every host of the job.

Runs inside pbs_mom's pbs_python on each execution host (primary and sisters), as root
(hook attribute user=pbsadmin), and calls the same routine as the classic scripts,
``dxflow hook prolog|epilog --scheduler pbs -- JOB_ID USER GROUP``, so a host that also has
the classic pbs/prologue keeps one agent: the routine finds the first one alive.

Events (docs/schedulers.md, PBS Pro hooks):
  execjob_begin      every host, when the job reaches it          -> start the agent
  execjob_prologue   primary host; sisters (18.1+) when a task starts there -> start the agent
  execjob_epilogue   after the job's processes were killed        -> stop the agent
  execjob_end        every host, at the very end (background)     -> stop the agent

pbs_mom forks the hook, calls setsid() and SIGKILLs that process group when a
synchronous hook returns; the agent is started in a session of its own and survives.
The hook always accepts the event: dxflow never rejects, requeues or delays a job.

Install, as root on the PBS server host (docs/admin-pbs.md):
  qmgr -c "create hook dxflow"
  qmgr -c "set hook dxflow event = 'execjob_begin,execjob_prologue,execjob_epilogue,execjob_end'"
  qmgr -c "set hook dxflow user = pbsadmin"
  qmgr -c "set hook dxflow alarm = 30"
  qmgr -c "set hook dxflow order = 900"
  qmgr -c "set hook dxflow fail_action = none"
  qmgr -c "import hook dxflow application/x-python default /etc/dxflow/hooks/pbs/dxflow_hook.py"
  qmgr -c "list hook dxflow"
Any execjob_prologue / execjob_epilogue hook makes pbs_mom skip the classic
mom_priv/prologue / epilogue: a site that keeps its own classic scripts sets
event = 'execjob_begin,execjob_end' instead.

Runs on every interpreter PBS embeds: Python 2.6/2.7 in PBS Professional up to 19.x (its
configure accepts only 2.6 or 2.7, m4/with_python.m4 @v19.1.3) and Python 3 in OpenPBS 20+
(3.5 to 3.7 at v20.0.0, later releases newer ones). So: nothing but the standard library, no
f-strings, no ``subprocess.call(timeout=…)`` (Python 3.3+; on 2.x it raised TypeError and no
agent ever started), no dict or set comprehensions (2.7+). ``tests/unit/test_schedulers_pbs_lsf.py``
refuses any construct or name that 2.6 lacks. Failures are logged with ``pbs.LOG_ERROR``: the
MoM log line then has severity LOG_ERR, as syslog and an admin's log watch see it, where
``pbs.LOG_DEBUG`` gave LOG_DEBUG (``pbsv1mod_meth_logmsg``, src/lib/Libpython/common_python_utils.c).
"""

import os
import subprocess
import time

import pbs

DXFLOW = ("/usr/local/bin/dxflow", "/opt/dxflow/venv/bin/dxflow")
START = ("EXECJOB_BEGIN", "EXECJOB_PROLOGUE")
STOP = ("EXECJOB_EPILOGUE", "EXECJOB_END")
#: pbs_mom's alarm for the hook is 30 s by default; dxflow's routine returns in well under one.
TIMEOUT = 20
#: Environment of the routine: nothing of pbs_mom's but where PBS keeps its configuration.
KEEP_ENV = ("PBS_CONF_FILE", "PBS_HOME", "PBS_EXEC", "PBS_SERVER")


def phase_of(event_type):
    """'prolog', 'epilog' or None for an event this hook does not handle."""
    for names, phase in ((START, "prolog"), (STOP, "epilog")):
        for name in names:
            if hasattr(pbs, name) and event_type == getattr(pbs, name):
                return phase
    return None


def text(value):
    """A job attribute as a string ('' when unset); never lets a NUL reach argv or the environment."""
    return "" if value is None else str(value).replace("\0", "")


def work_dir(job):
    try:
        return text(job.Variable_List["PBS_O_WORKDIR"])
    except Exception:  # unset, or an old pbs module without item access
        return ""


def routine_env(job):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
           "PBS_O_WORKDIR": work_dir(job),
           "DXFLOW_JOB_STDOUT": text(getattr(job, "Output_Path", None)),
           "DXFLOW_JOB_STDERR": text(getattr(job, "Error_Path", None))}
    for name in KEEP_ENV:
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def wait(proc, seconds):
    """The routine's exit code, or None after ``seconds`` (then it is killed): Popen.wait(timeout)
    is Python 3 only."""
    deadline = time.time() + seconds
    while proc.poll() is None:
        if time.time() >= deadline:
            proc.kill()
            proc.wait()
            return None
        time.sleep(0.02)
    return proc.returncode


def run_routine(phase, job):
    found = [p for p in DXFLOW if os.access(p, os.X_OK)]
    if not found:
        pbs.logmsg(pbs.LOG_ERROR, "dxflow hook: no dxflow at %s: no agent for job %s"
                   % (" or ".join(DXFLOW), text(job.id)))
        return
    argv = [found[0], "hook", phase, "--scheduler", "pbs", "--",
            text(job.id), text(getattr(job, "euser", None)), text(getattr(job, "egroup", None))]
    null = open(os.devnull, "r+b")
    try:
        proc = subprocess.Popen(argv, stdin=null, stdout=null, stderr=null, env=routine_env(job),
                                cwd="/", close_fds=True)
    finally:
        null.close()
    if wait(proc, TIMEOUT) is None:
        pbs.logmsg(pbs.LOG_ERROR, "dxflow hook: %s for job %s did not return within %d s: killed"
                   % (phase, text(job.id), TIMEOUT))


def main():
    event = pbs.event()
    try:
        phase = phase_of(event.type)
        if phase:
            run_routine(phase, event.job)
    except Exception as e:  # the job runs whatever happens to dxflow; an admin sees why in the MoM log
        pbs.logmsg(pbs.LOG_ERROR, "dxflow hook: %s: %s" % (type(e).__name__, e))
    event.accept()


main()
