"""The documentation against the code: the generated reference pages are what the code generates today, every
module has its line in "How the code is laid out", the packages' layers import only downwards, the site builds
with warnings as errors, and the README's first screen says what a new user needs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.reference import pages
from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
LAYOUT = DOCS / "code-layout.md"


@pytest.mark.parametrize("name", sorted(pages()))
def test_the_generated_reference_pages_are_up_to_date(name: str) -> None:
    committed = (DOCS / "reference" / name).read_text()
    assert committed == pages()[name], (
        f"docs/reference/{name} differs from what the code generates: run "
        f"`python -m supervisor.reference docs/reference` and commit the result"
    )


def _modules() -> list[str]:
    return sorted(
        path.relative_to(REPO_ROOT).as_posix()
        for package in ("supervisor", "verl_hooks")
        for path in (REPO_ROOT / package).rglob("*.py")
    )


def test_every_module_has_its_line_in_the_code_layout_and_every_line_a_module() -> None:
    named = set(re.findall(r"^\| `((?:supervisor|verl_hooks)/[\w/]+\.py)` \|", LAYOUT.read_text(), re.MULTILINE))
    modules = set(_modules())
    assert not modules - named, f"modules without a line in docs/code-layout.md: {sorted(modules - named)}"
    assert not named - modules, f"docs/code-layout.md names modules that do not exist: {sorted(named - modules)}"


LAYERS = [
    {"outcomes", "clock"},
    {"config"},
    {"mechanisms", "checkpoints", "run", "job"},
    {"policy"},
    {"backends"},
    {"attempt_watch", "preemption_watch", "stop_signals", "loop", "cli", "check", "reference", "__main__", "__init__"},
]
"""The supervisor's layers, lowest first (docs/code-layout.md): a module imports from its own layer and those
below it, never above, so that decisions and values never pull in what acts on processes, Ray or files."""


def _area(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "supervisor" and len(parts) > 1 else None


def test_the_supervisors_layers_import_only_downwards() -> None:
    layer_of = {area: index for index, areas in enumerate(LAYERS) for area in areas}
    upward = []
    for path in (REPO_ROOT / "supervisor").rglob("*.py"):
        here = _area(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts))
        assert here in layer_of, f"{path}: its area {here!r} has no layer in LAYERS"
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                there = _area(name)
                if there is not None and layer_of[there] > layer_of[here]:
                    upward.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert not upward


def test_the_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs is not None, "mkdocs is installed with the dev extra (scripts/setup_venv.sh)"
    built = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "exit-codes" / "index.html").is_file()


def test_the_readmes_first_screen_says_what_it_is_how_to_install_it_and_the_command() -> None:
    first_screen = "\n".join((REPO_ROOT / "README.md").read_text().splitlines()[:50])
    assert "fail-fast supervisor for [verl]" in first_screen
    assert "pip install" in first_screen
    assert "verl-supervisor job=verl_ppo" in first_screen
    assert "python -m verl.trainer.main_ppo" in first_screen
    assert "scripts/demo.sh" in first_screen
    assert "scripts/test.sh" in first_screen
