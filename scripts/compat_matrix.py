"""The compatibility matrix: the supervisor installed into environments that already hold a given Ray and verl,
as a verl user's does, and its end-to-end tests run there.

    python scripts/compat_matrix.py [--only NAME ...] [--out DIR] [--envs DIR] [--torch SPEC]

For each combination (``COMBINATIONS``): a fresh virtual environment with that Python; torch (``--torch``), then
``ray[default]==R`` and ``verl==V`` with what verl imports on a CPU machine, as the user's environment would hold
them; ``pip freeze`` of it; then the supervisor itself (``pip install -e .``, no extra), and ``pip freeze`` again:
the install must change no package that was there (the supervisor's own dependencies that were missing may be
added). Then the test tools, and in that environment:

- the end-to-end restart test: an embedded cluster with token auth, a weight-sync failure, a resume from the
  emergency checkpoint, weights bit-identical to a fault-free run
  (``tests/supervisor/e2e/test_mini_ppo.py::...[naive]``);
- the security tests (``tests/supervisor/e2e/test_security.py``);
- ``ray.mode=address`` against a two-node cluster started with that Ray
  (``tests/supervisor/e2e/test_existing_cluster.py::...[address]``);
- ``verl-supervisor check``.

Writes ``results.json`` and ``results.md`` (the table docs/compatibility.md copies) into ``--out``. A combination whose
environment cannot be built here (no torch wheel for that Python short of a multi-GB CUDA build) is reported as
not run, with the reason. Environments are kept in ``--envs`` (default ``.compat/``, ignored by git) and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent

# What verl 0.9.x imports on a CPU machine beyond its declared requirements, and the test tools: the project's
# own `verl` and `dev` extras (the verl pin itself left out: each combination names its verl).
EXTRAS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
VERL_CPU_EXTRAS = [spec for spec in EXTRAS["verl"] if not spec.startswith("verl")]
TEST_TOOLS = [spec for spec in EXTRAS["dev"] if not spec.startswith("ruff")]
TESTS = [
    "tests/supervisor/e2e/test_mini_ppo.py::"
    "test_weight_sync_failure_is_restarted_from_its_emergency_checkpoint_bit_identical[naive]",
    "tests/supervisor/e2e/test_security.py",
    "tests/supervisor/e2e/test_existing_cluster.py::"
    "test_weight_sync_failure_on_an_existing_cluster_is_fenced_and_resumed[address]",
]
WATCHED = ("ray", "verl", "torch")


@dataclass(frozen=True)
class Combination:
    python: str
    ray: str
    verl: str

    @property
    def name(self) -> str:
        return f"py{self.python}-ray{self.ray}-verl{self.verl}"


COMBINATIONS = [
    Combination("3.11", "2.52.1", "0.9.0"),  # the oldest Ray with token authentication, the oldest verl 0.9
    Combination("3.11", "2.56.1", "0.9.1"),  # the middle of the supported Rays
    Combination("3.11", "2.60.0", "0.9.1"),  # the newest
    Combination("3.10", "2.52.1", "0.9.0"),
    Combination("3.12", "2.60.0", "0.9.1"),
]


@dataclass
class Result:
    combination: Combination
    ran: bool = False
    why_not: str = ""
    installed: dict[str, str] = field(default_factory=dict)
    changed_by_install: list[str] = field(default_factory=list)
    tests: dict[str, str] = field(default_factory=dict)
    """Test id to passed / failed / skipped / error."""
    check_exit: int | None = None
    minutes: float = 0.0

    @property
    def passed(self) -> bool:
        outcomes = set(self.tests.values())
        return self.ran and bool(self.tests) and outcomes <= {"passed"} and not self.changed_by_install


def run(argv: list[str], log: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        return subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, text=True, check=False, **kwargs)


def freeze(python: Path) -> dict[str, str]:
    done = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
    packages = {}
    for line in done.stdout.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            packages[name.lower().replace("_", "-")] = version
    return packages


def interpreter(version: str) -> str | None:
    """A working ``python{version}``: on PATH, or one pyenv installed (its shim only runs the selected version)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(str(p) for p in (Path.home() / ".pyenv" / "versions").glob(f"{version}.*/bin/python{version}"))
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True, check=False).returncode == 0:
            return candidate
    return None


def build(
    combo: Combination, envs: Path, torch_spec: str, log: Path, torch_from_index: bool = False
) -> tuple[Path | None, str, list[str]]:
    """The environment with the user's packages, then the supervisor installed into it; returns its python, why
    not (when it could not be built), and the packages the supervisor's install changed."""
    base = interpreter(combo.python)
    if base is None:
        return None, f"no python{combo.python} on this machine", []
    env = envs / combo.name
    python = env / "bin" / "python"
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "--quiet"]
    if not python.exists():
        if run([base, "-m", "venv", str(env)], log).returncode != 0:
            return None, "venv failed", []
        # torch first, its wheel from the local folder only (an index would hand a Python without a local CPU
        # wheel a CUDA build of several GB), then its dependencies from the index.
        wheels = os.environ.get("PIP_FIND_LINKS", "")
        if wheels and not torch_from_index:
            local = ["--no-deps", "--no-index", "--find-links", wheels]
            if run([*pip, "install", *local, torch_spec], log).returncode != 0:
                shutil.rmtree(env)
                return None, f"no CPU wheel of {torch_spec} for Python {combo.python} here (only a CUDA build)", []
        if run([*pip, "install", torch_spec], log).returncode != 0:
            return None, f"{torch_spec} did not install (see the log)", []
        user = [f"ray[default]=={combo.ray}", f"verl=={combo.verl}", *VERL_CPU_EXTRAS]
        if run([*pip, "install", *user], log).returncode != 0:
            return None, "the user's packages did not install (see the log)", []
    before = freeze(python)
    if run([*pip, "install", "-e", str(REPO)], log).returncode != 0:
        return None, "the supervisor did not install (see the log)", []
    after = freeze(python)
    changed = [f"{name} {before[name]} -> {after.get(name)}" for name in before if after.get(name) != before[name]]
    run([*pip, "install", *TEST_TOOLS], log)
    return python, "", changed


def test(python: Path, log: Path, junit: Path) -> dict[str, str]:
    argv = [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", f"--junitxml={junit}", *TESTS]
    run(argv, log, cwd=REPO)
    return junit_outcomes(junit)


def junit_outcomes(junit: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ElementTree

    if not junit.exists():
        return {"(no test ran)": "error"}
    outcomes = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[name] = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[name] = {"failure": "failed"}.get(outcomes[name], outcomes[name])
    return outcomes


def outcome_of(tests: dict[str, str], prefix: str) -> str:
    found = {outcome for name, outcome in tests.items() if name.startswith(prefix)}
    return "passed" if found == {"passed"} else (", ".join(sorted(found)) or "-")


def markdown(results: list[Result], when: str) -> str:
    lines = [
        f"Run on {when} (`python scripts/compat_matrix.py`; a CPU machine, tests as in the script's docstring).",
        "",
        "| Python | Ray | verl | install changed | restart e2e | security | address mode | check | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.combination
        if not r.ran:
            lines.append(f"| {c.python} | {c.ray} | {c.verl} | - | - | - | - | - | not run: {r.why_not} |")
            continue

        of = {prefix: outcome_of(r.tests, prefix) for prefix in ("test_mini_ppo", "test_security", "test_existing")}
        changed = ", ".join(r.changed_by_install) or "nothing"
        check = {0: "verified", None: "-"}.get(r.check_exit, f"exit {r.check_exit}")
        verdict = "**passed**" if r.passed else "**FAILED**"
        lines.append(
            f"| {c.python} | {c.ray} | {c.verl} | {changed} | {of['test_mini_ppo']} | {of['test_security']} | "
            f"{of['test_existing']} | {check} | {verdict} ({r.minutes:.0f} min) |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="combination names (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "compat-results")
    parser.add_argument("--envs", type=Path, default=REPO / ".compat")
    parser.add_argument("--torch", default=os.environ.get("TORCH_SPEC", "torch==2.13.0"))
    parser.add_argument(
        "--torch-from-index",
        action="store_true",
        help="take torch from the package index where no local wheel fits the Python (on Linux: a CUDA build of "
        "several GB, which runs on a CPU too)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.envs.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in COMBINATIONS if not args.only or c.name in args.only]
    results = []
    for combo in chosen:
        started = time.monotonic()
        log = args.out / f"{combo.name}.log"
        log.write_text("")
        result = Result(combo)
        python, why_not, changed = build(combo, args.envs, args.torch, log, args.torch_from_index)
        if python is None:
            result.why_not = why_not
        else:
            result.ran = True
            result.changed_by_install = changed
            result.installed = {k: v for k, v in freeze(python).items() if k in WATCHED}
            result.tests = test(python, log, args.out / f"{combo.name}.junit.xml")
            result.check_exit = run([str(python), "-m", "supervisor", "check"], log, cwd=REPO).returncode
        result.minutes = (time.monotonic() - started) / 60
        results.append(result)
        print(f"{combo.name}: {'passed' if result.passed else 'not run: ' + why_not if not result.ran else 'FAILED'}")
        (args.out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    when = time.strftime("%Y-%m-%d")
    (args.out / "results.md").write_text(markdown(results, when))
    print((args.out / "results.md").read_text())
    # A combination named with --only must run (CI names one); of the whole matrix, those this machine cannot
    # build are reported as not run.
    return 0 if all(r.passed or (not r.ran and not args.only) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
