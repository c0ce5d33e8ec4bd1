"""The hook routine never fails the job: every failure is logged and the exit code stays 0."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dxflow import hook


@pytest.fixture
def site(tmp_path, monkeypatch):
    cfg = tmp_path / "dxflow.toml"
    cfg.write_text(f'runtime_dir = "{tmp_path}/run"\nhook_log = "{tmp_path}/hooks.log"\n')
    monkeypatch.setattr("dxflow.config.SITE_CONFIG", cfg)
    # as root (the scheduler's hooks) these are the site's paths; a test run as a user keeps them there too,
    # instead of the user's real ~/.dxflow where a hook run as the job's user writes
    monkeypatch.setattr(hook, "hook_log", lambda site: Path(site.hook_log))
    monkeypatch.setattr(hook, "runtime_dir", lambda site: Path(site.runtime_dir))

    def drop():
        for h in list(hook.log.handlers):
            if getattr(h, "dxflow_site", False):
                hook.log.removeHandler(h)
                h.close()
    drop()
    yield tmp_path
    drop()


def run_hook(phase, env, monkeypatch):
    for k in ("DXFLOW_JOB", "DXFLOW_USER", "DXFLOW_NODE", "USER"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return getattr(hook, phase)("local")


@pytest.mark.skipif(os.geteuid() != 0, reason="the prolog as root: as a user it refuses another user's job "
                                              "before it looks for a home")
def test_prolog_missing_home_logs_and_exits_0(site, monkeypatch):
    assert run_hook("prolog", {"DXFLOW_JOB": "5", "DXFLOW_USER": "nobody", "DXFLOW_NODE": "n1"}, monkeypatch) == 0
    text = (site / "hooks.log").read_text()
    assert "job 5" in text and ("home" in text or "root" in text)
    assert not list((site / "run").glob("*.json")) if (site / "run").exists() else True


@pytest.mark.parametrize("env", [
    {},                                                       # no job at all
    {"DXFLOW_JOB": "5; touch /tmp/pwned", "DXFLOW_USER": "nobody"},
    {"DXFLOW_JOB": "5", "DXFLOW_USER": "no-such-user-here"},
    {"DXFLOW_JOB": "5", "DXFLOW_USER": "nobody", "DXFLOW_NODE": "../../etc"},
])
def test_hostile_or_missing_values_exit_0_and_start_nothing(site, monkeypatch, env):
    for phase in ("prolog", "epilog"):
        assert run_hook(phase, env, monkeypatch) == 0
    assert not os.path.exists("/tmp/pwned")
    assert "ERROR" in (site / "hooks.log").read_text()


def test_broken_site_config_exits_0(site, monkeypatch):
    (site / "dxflow.toml").write_text("not [toml")
    assert run_hook("prolog", {"DXFLOW_JOB": "5", "DXFLOW_USER": "nobody"}, monkeypatch) == 0


def test_epilog_without_record_is_fine(site, monkeypatch):
    assert run_hook("epilog", {"DXFLOW_JOB": "6", "DXFLOW_USER": "nobody", "DXFLOW_NODE": "n1"}, monkeypatch) == 0
    assert "nothing to stop" in (site / "hooks.log").read_text()


def test_a_hook_command_line_builds_the_hook_parser_alone_and_parses_as_the_whole_cli_does():
    from dxflow.cli import COMMAND_MODULES, HOOK_MODULE, build_parser, modules_for

    for argv in (["hook", "prolog", "--scheduler", "slurm"], ["-v", "hook", "epilog", "--scheduler", "pbs", "1.srv"]):
        assert modules_for(argv) == (HOOK_MODULE,)
        alone, whole = build_parser(modules_for(argv)).parse_args(argv), build_parser().parse_args(argv)
        assert {k: v for k, v in vars(alone).items()} == {k: v for k, v in vars(whole).items()}
    for argv in (["ls"], ["exec", "12:all", "--", "hook"], [], ["--version"]):
        assert modules_for(argv) == COMMAND_MODULES
