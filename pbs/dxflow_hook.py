"""dxflow: PBS Professional / OpenPBS hook — the job's agent on every host of the job.

Runs inside pbs_mom's pbs_python on each execution host (primary and sisters), as root
(hook attribute user=pbsadmin), and calls the same routine as the classic scripts,
``dxflow hook prolog|epilog --scheduler pbs -- JOB_ID USER GROUP``, so a host that also has
the classic pbs/prologue keeps one agent: the routine finds the first one alive.

Events (CONTRACTS.md §2.2):
  execjob_begin      every host, when the job reaches it          -> start the agent
  execjob_prologue   primary host; sisters when a task starts     -> start the agent
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

Written for pbs_python (Python 3 in OpenPBS 20+; no f-strings, nothing but the standard library).
"""

import os
import subprocess

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


def run_routine(phase, job):
    dxflow = next((p for p in DXFLOW if os.access(p, os.X_OK)), None)
    if dxflow is None:
        pbs.logmsg(pbs.LOG_DEBUG, "dxflow hook: no dxflow at %s" % " or ".join(DXFLOW))
        return
    argv = [dxflow, "hook", phase, "--scheduler", "pbs", "--",
            text(job.id), text(getattr(job, "euser", None)), text(getattr(job, "egroup", None))]
    with open(os.devnull, "r+b") as null:
        subprocess.call(argv, stdin=null, stdout=null, stderr=null, env=routine_env(job),
                        cwd="/", close_fds=True, timeout=TIMEOUT)


def main():
    event = pbs.event()
    try:
        phase = phase_of(event.type)
        if phase:
            run_routine(phase, event.job)
    except Exception as e:  # the job runs whatever happens to dxflow
        pbs.logmsg(pbs.LOG_DEBUG, "dxflow hook: %s: %s" % (type(e).__name__, e))
    event.accept()


main()
