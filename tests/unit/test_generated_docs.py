"""The docs that come from one source each say what that source says today: the site config keys
(from ``SiteConfig``) and the exit codes (from the error classes), in README.md and
docs/admin-slurm.md, as ``scripts/gendocs.py`` writes them."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from dxflow.config import SiteConfig, site_config_keys, site_config_table
from dxflow.errors import DxflowError, exit_code_table, exit_codes

ROOT = Path(__file__).resolve().parents[2]


def gendocs():
    spec = importlib.util.spec_from_file_location("gendocs", ROOT / "scripts" / "gendocs.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_generated_parts_of_the_docs_are_up_to_date():
    stale = gendocs().outdated()
    assert not stale, f"{stale}: run scripts/gendocs.py"


def test_every_file_has_its_generated_parts():
    readme, slurm = (ROOT / "README.md").read_text(), (ROOT / "docs" / "admin-slurm.md").read_text()
    assert site_config_table() in readme and exit_code_table() in readme
    assert site_config_table() in slurm


def test_a_changed_source_makes_the_docs_out_of_date(monkeypatch):
    docs = gendocs()
    monkeypatch.setitem(docs.GENERATORS, "python -m dxflow.config --markdown", lambda: "| a key nobody wrote |\n")
    assert "README.md" in docs.outdated() and "docs/admin-slurm.md" in docs.outdated()


def test_every_site_config_key_is_documented_with_its_default():
    keys = site_config_keys()
    assert [k for k, _, _ in keys] == [f.name for f in fields(SiteConfig)]
    assert not [k for k, _, doc in keys if not doc], "a SiteConfig field without a `#:` comment above it"
    assert dict((k, d) for k, d, _ in keys)["runtime_dir"] == '"/run/dxflow"'


def test_exit_codes_cover_every_error_class_and_the_shells_own():
    codes = {code for code, _, _ in exit_codes()}
    assert {0, 1, 2, 3, 130, 141, 255} <= codes
    assert {cls.exit_code for cls in DxflowError.__subclasses__()} <= codes
    assert "`dxflow master status`" in dict((c, m) for c, _, m in exit_codes())[3]


def test_no_error_class_outside_errors_py_has_an_exit_code_the_table_lacks():
    """The table lists dxflow/errors.py's classes: one elsewhere may add a name, not a code."""
    codes = {code for code, _, _ in exit_codes()}
    import dxflow

    for info in pkgutil.walk_packages(dxflow.__path__, "dxflow."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    todo, own = [DxflowError], []
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__ != "dxflow.errors" and cls.exit_code not in codes:
            own.append(f"{cls.__module__}.{cls.__name__}")
    assert not own


def test_the_generators_run_as_documented():
    for module, table in (("dxflow.config", site_config_table()), ("dxflow.errors", exit_code_table())):
        out = subprocess.run([sys.executable, "-m", module, "--markdown"], capture_output=True, text=True,
                             cwd=ROOT, check=True).stdout
        assert out == table
