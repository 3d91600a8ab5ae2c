"""Run the test suite on each supported Python: ``nox`` (all) or ``nox -s tests-3.9``."""

from __future__ import annotations

import glob
import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False

VERSIONS = ["3.9", "3.10", "3.11", "3.12", "3.13"]


def _add_pyenv_versions_to_path() -> None:
    """Put pyenv's interpreters (python3.9 ... python3.13) on PATH for nox to find."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    dirs = sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin")), reverse=True)
    os.environ["PATH"] = os.pathsep.join([*dirs, os.environ.get("PATH", "")])


_add_pyenv_versions_to_path()


@nox.session(python=VERSIONS)
def tests(session: nox.Session) -> None:
    """The README's test command, on one interpreter."""
    session.install("-q", "-e", ".[test]")
    session.run("python", "-m", "pytest", "-n", "auto", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy --strict."""
    session.install("-q", "-e", ".[dev]")
    session.run("ruff", "check", "mpshm", "tests", "examples", "benchmarks", "noxfile.py")
    session.run("mypy", "--strict", "mpshm")
