"""The documentation: the site builds, its links resolve, and getting-started runs.

* The site builds with Sphinx, warnings as errors, in a subprocess into a
  temporary directory; every page of docs/ is in the output; the API page
  documents every public name; every relative link between pages (and every
  ``#anchor``) resolves in the built site; importing the package for autodoc
  starts no tracker. These tests need the ``docs`` extra (part of the
  ``test`` extra): without Sphinx they fail, they never skip.
* Every ``python`` code block of docs/getting-started.md runs as a program of
  its own, and prints what the page says it prints (the ``text`` block that
  follows it, if any): the newcomer's path works as written.
* Every ``python`` block of docs/ and the README that starts processes has
  the ``__main__`` guard, and the guarded programs of docs/pool.md and
  docs/manager.md run under spawn and forkserver.
* The error messages docs/troubleshooting.md quotes are the code's (those
  that need no root, no other user and no small tmpfs to reproduce).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

import pytest
from helpers import ROOT, _program_env

DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(f"{DOCS}/*.md"))

# Modules whose public names (their __all__) the API page must document, under
# the module's own name or, for names re-exported by the package, as mpshm.<name>.
API_MODULES = [
    "mpshm",
    "mpshm.shared_memory",
    "mpshm.backends",
    "mpshm.managers",
    "mpshm.pool",
    "mpshm.reduction",
    "mpshm.numpy",
    "mpshm.tracking",
]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(markdown: str) -> list[str]:
    """Targets of the Markdown links in *markdown* that stay in the repository."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


# --------------------------------------------------------------------------
# The built site


def _sphinx_missing() -> str | None:
    for module in ("sphinx", "myst_parser", "furo"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


# Build, then report whether importing the package for autodoc started a tracker.
BUILD = """
import os, sys
from sphinx.cmd.build import main
status = main(sys.argv[1:])
from mpshm import tracking
print("IMPORTED", "mpshm.numpy" in sys.modules and "mpshm.tracking" in sys.modules)
print("TRACKER", tracking.tracker_pid(), os.environ.get(tracking.ENV_VAR))
sys.exit(status)
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the site once for this module's tests; return its directory."""
    missing = _sphinx_missing()
    if missing is not None:
        pytest.fail(f"{missing} is not installed: pip install -e '.[docs]'")
    out = str(tmp_path_factory.mktemp("site"))
    # A script file, not ``python -c``: Python 3.13 files -c's source in linecache
    # under "<string>", the file name of namedtuple's generated methods too, and
    # autodoc then reads the wrong source for their signatures.
    script = tmp_path_factory.mktemp("build") / "build_docs.py"
    script.write_text(BUILD)
    env = dict(os.environ)
    env.pop("MPSHM_TRACKER", None)
    result = subprocess.run(
        [sys.executable, str(script), "-W", "--keep-going", "-q", "-b", "html", DOCS, out],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, f"the docs build failed:\n{result.stderr}{result.stdout}"
    assert "IMPORTED True" in result.stdout, result.stdout
    assert "TRACKER None None" in result.stdout, (
        f"building the docs started an mpshm tracker:\n{result.stdout}"
    )
    return out


class _Page(HTMLParser):
    """The ids and the links of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if tag == "a" and name == "href" and value:
                self.links.append(value)


def _parse(path: str) -> _Page:
    page = _Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    return page


def test_every_page_is_built(site: str) -> None:
    assert {"index", "getting-started", "api"} <= set(PAGES)
    missing = [p for p in PAGES if not os.path.isfile(os.path.join(site, f"{p}.html"))]
    assert not missing, f"pages missing from the built site: {missing}"


def test_api_page_documents_the_public_names(site: str) -> None:
    documented = _parse(os.path.join(site, "api.html")).ids
    missing = []
    for module_name in API_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            candidates = {f"{module_name}.{name}"}
            if getattr(sys.modules["mpshm"], name, None) is getattr(module, name):
                candidates.add(f"mpshm.{name}")  # re-exported: documented once, there
            if not candidates & documented:
                missing.append(f"{module_name}.{name}")
    assert not missing, f"public names missing from docs/api.md: {missing}"


def test_links_between_pages_resolve(site: str) -> None:
    broken = []
    ids: dict[str, set[str]] = {}  # page -> its ids, parsed once
    for page in PAGES:
        parsed = _parse(os.path.join(site, f"{page}.html"))
        for href in parsed.links:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or not (parts.path or parts.fragment):
                continue
            target = os.path.normpath(os.path.join(site, unquote(parts.path or f"{page}.html")))
            if not target.startswith(site) or not os.path.exists(target):
                broken.append(f"{page}: {href}")
            elif parts.fragment and target.endswith(".html"):
                if target not in ids:
                    ids[target] = _parse(target).ids
                if parts.fragment not in ids[target]:
                    broken.append(f"{page}: {href} (no such anchor)")
    assert not broken, "broken links in the built site:\n" + "\n".join(broken)


# --------------------------------------------------------------------------
# The Markdown sources (no Sphinx needed)


def test_relative_links_point_at_files() -> None:
    """Every relative link of docs/*.md names a file that exists (as on GitHub)."""
    broken = []
    for page in PAGES:
        with open(os.path.join(DOCS, f"{page}.md"), encoding="utf-8") as f:
            for target in _relative_links(f.read()):
                path = target.split("#", 1)[0]
                if path and not os.path.exists(os.path.join(DOCS, path)):
                    broken.append(f"{page}.md: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


with open(os.path.join(DOCS, "getting-started.md"), encoding="utf-8") as _f:
    # A python block, and the text block right after it (what it prints), if any.
    GETTING_STARTED = re.findall(
        r"```python\n(.*?)```\n(?:\s*```text\n(.*?)```)?", _f.read(), re.S
    )


def test_getting_started_reaches_a_pool() -> None:
    assert len(GETTING_STARTED) >= 3
    assert any("Pool(" in code for code, _ in GETTING_STARTED), "no Pool in getting-started"
    assert all(expected for code, expected in GETTING_STARTED if "print(" in code), (
        "every block that prints shows what it prints"
    )


@pytest.mark.parametrize("index", range(len(GETTING_STARTED)))
def test_getting_started_block_runs(index: int, tmp_path: str) -> None:
    code, expected = GETTING_STARTED[index]
    script = os.path.join(tmp_path, f"getting_started_{index}.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(code)
    result = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=120,
        env=_program_env(None), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if expected:
        assert result.stdout == expected


# Programs in the pages (and the README) that start processes: pools, executors,
# managers, Process objects. Under spawn and forkserver (the default on Linux from
# Python 3.14 on) every child imports the main module, so each needs the guard.
STARTS_PROCESSES = re.compile(
    r"^\s*(with .*|\w+ = .*)\b(Pool|ProcessPoolExecutor|Process)\("
    r"|^\s*with .*SharedMemoryManager\(|\.start\(\)", re.M
)
GUARD = 'if __name__ == "__main__":'


def _python_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [textwrap.dedent(block) for block in
                re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", f.read(), re.S | re.M)]


def test_blocks_that_start_processes_have_the_main_guard() -> None:
    unguarded = [
        f"{os.path.relpath(path, ROOT)}: {block.splitlines()[0]}"
        for path in [*sorted(glob.glob(f"{DOCS}/*.md")), os.path.join(ROOT, "README.md")]
        for block in _python_blocks(path)
        if STARTS_PROCESSES.search(block) and GUARD not in block
    ]
    assert not unguarded, "blocks that would fail under spawn:\n" + "\n".join(unguarded)


# The guarded programs of these pages run as they stand (writing-a-backend.md's
# needs a backend module of the reader's own; getting-started.md's run above).
GUARDED = [
    (page, index)
    for page in ("pool", "manager")
    for index, block in enumerate(_python_blocks(os.path.join(DOCS, f"{page}.md")))
    if GUARD in block
]
# The start method is chosen before the page's code runs (force: a spawned
# child imports this module again, with its start method already set).
START_METHOD = "import multiprocessing\nmultiprocessing.set_start_method({!r}, force=True)\n"


def test_pool_and_manager_pages_have_programs() -> None:
    assert [page for page, _ in GUARDED].count("pool") >= 3
    assert ("pool", 0) in GUARDED, "docs/pool.md's first block is not a guarded program"
    assert "manager" in [page for page, _ in GUARDED]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize(("page", "index"), GUARDED)
def test_guarded_program_runs(page: str, index: int, method: str, tmp_path: str) -> None:
    block = _python_blocks(os.path.join(DOCS, f"{page}.md"))[index]
    script = os.path.join(tmp_path, f"{page}_{index}.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(START_METHOD.format(method) + block)
    result = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, timeout=240,
        env=_program_env(None), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# Messages that docs/troubleshooting.md quotes, as the code words them now:
# each case prints "Type: message"; the page must contain it (up to the
# temporary path, for the mmap directory checks).
MESSAGES = r"""
import os, tempfile, traceback
import mpshm

def show(call, cut=None):
    try:
        call()
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        print(text.split(cut)[0] if cut else text)
    else:
        raise SystemExit(f"no error from {call}")

for name in ("psm_0123456789abcdef", "sysv:0x12345678", "mmap:/tmp/nope/mpshm_x"):
    show(lambda: mpshm.SharedMemory(name))
show(lambda: mpshm.SharedMemory(create=True, size=10, dir="/tmp"))
os.environ["MPSHM_BACKEND"] = "memfd"
show(lambda: mpshm.SharedMemory(create=True, size=1))
del os.environ["MPSHM_BACKEND"]
with tempfile.TemporaryDirectory() as tmp:
    os.chmod(tmp, 0o777)
    show(lambda: mpshm.SharedMemory(create=True, size=4096, backend="mmap", dir=tmp), ": '/")
    os.chmod(tmp, 0o700)
    link = tmp + "-link"
    os.symlink(tmp, link)
    try:
        show(lambda: mpshm.SharedMemory(create=True, size=4096, backend="mmap", dir=link), ": '/")
    finally:
        os.unlink(link)
"""


def test_troubleshooting_quotes_current_messages() -> None:
    with open(os.path.join(DOCS, "troubleshooting.md"), encoding="utf-8") as f:
        page = f.read()
    result = subprocess.run(
        [sys.executable, "-c", MESSAGES], capture_output=True, text=True, timeout=60,
        env=_program_env({"MPSHM_BACKEND": ""}),
    )
    assert result.returncode == 0, result.stderr
    messages = result.stdout.splitlines()
    assert len(messages) == 7, result.stdout
    stale = [m for m in messages if m not in page]
    assert not stale, "docs/troubleshooting.md quotes these differently:\n" + "\n".join(stale)
