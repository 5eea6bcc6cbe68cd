"""``verl-supervisor check`` on this machine's environment: the installed Ray and verl, examined for real."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from supervisor import check
from tests.conftest import REPO_ROOT


def test_check_reports_the_installed_ray_verl_and_nvml_and_exits_0_when_all_is_verified() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "check"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line[2:].split("  ", 1)[0].strip(): line for line in done.stdout.splitlines() if line[:2] in ("  ", "! ")}
    import ray
    import verl

    assert ray.__version__ in lines["ray"]
    assert "available (Ray 2.52+)" in lines["ray token authentication"]
    assert verl.__version__ in lines["verl"]
    assert "verified (verl 0.9.0, 0.9.1" in lines["verl update_weights"]
    assert "would be installed" in lines["weight-sync guard"]
    assert "NVML" in lines


def test_a_ray_without_token_authentication_is_a_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "_version", lambda package: "2.49.2" if package == "ray" else None)
    ray, token, *_ = check.check_ray()
    assert (ray.found, ray.ok) == ("2.49.2", True)
    assert token.ok is False
    assert "Ray 2.49.2 has no token authentication" in token.found


def test_a_verl_the_guard_would_refuse_is_a_problem_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the child process reports for a verl whose update_weights body is not verified (its refusal itself is
    tests/verl_hooks/test_compat.py's)."""
    report = {
        "version": "0.9.2",
        "tested": ["0.9.0", "0.9.1"],
        "fingerprint": "ab" * 32,
        "verified": None,
        "guardable": False,
        "problem": "verl_hooks cannot guard the installed verl 0.9.2: its update_weights body is not verified",
    }

    def child(argv, **kwargs):
        assert argv[1:] == ["-m", "verl_hooks.compat"]
        return subprocess.CompletedProcess(argv, 0, json.dumps(report) + "\n", "")

    monkeypatch.setattr(check, "_version", lambda package: "0.9.2")
    monkeypatch.setattr(check.subprocess, "run", child)
    verl, body, guard = check.check_verl()
    assert (verl.found, verl.ok) == ("0.9.2 (tested: 0.9.0, 0.9.1)", False)
    assert (body.found, body.ok) == ("fingerprint abababababababab: NOT verified", False)
    assert guard.ok is False
    assert "would refuse: verl_hooks cannot guard the installed verl 0.9.2" in guard.found
