"""``verl-supervisor check``: what the supervisor finds in the environment it is installed into, and whether it
is what the supervisor was verified with: the Ray (token authentication, the GCS calls it makes without importing
Ray), the verl (its version and ``update_weights`` fingerprint: would the guard patch it), torch, NVML.

verl is looked at in a child process (``python -m verl_hooks.compat``): importing it takes seconds and much
memory, and the supervisor imports nothing of ``verl_hooks`` but the contract.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from dataclasses import dataclass

from supervisor.config import TOKEN_AUTH_SINCE, AuthMode, token_auth_problem

VERL_CHECK_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Finding:
    what: str
    found: str
    ok: bool = True
    """False: the supervisor would refuse it, or run without a promise it makes."""


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_ray() -> list[Finding]:
    version = _version("ray")
    if version is None:
        return [Finding("ray", "not installed", ok=False)]
    since = ".".join(map(str, TOKEN_AUTH_SINCE))
    findings = [Finding("ray", version)]
    problem = token_auth_problem(AuthMode.token, version)
    findings.append(
        Finding("ray token authentication", f"available (Ray {since}+)" if problem is None else problem, ok=not problem)
    )
    try:
        from supervisor.mechanisms.ray_wire import gcs_protos, generated

        gcs_protos()
        generated("autoscaler_pb2_grpc").AutoscalerStateServiceStub  # noqa: B018 - the drain's call must exist
        findings.append(Finding("ray GCS calls (kill, remove, drain by id)", "the installed Ray's messages load"))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        findings.append(Finding("ray GCS calls (kill, remove, drain by id)", f"{type(exc).__name__}: {exc}", ok=False))
    return findings


def check_verl(python: str = sys.executable) -> list[Finding]:
    if _version("verl") is None:
        return [Finding("verl", "not installed (job=verl_ppo needs it; other jobs run without the guard)")]
    try:
        done = subprocess.run(  # our own module, argv fixed
            [python, "-m", "verl_hooks.compat"], capture_output=True, text=True, timeout=VERL_CHECK_TIMEOUT_S
        )
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as exc:
        return [Finding("verl", f"could not be examined: {type(exc).__name__}", ok=False)]
    tested = ", ".join(report["tested"])
    findings = [Finding("verl", f"{report['version']} (tested: {tested})", ok=report["version"] in report["tested"])]
    fingerprint = report.get("fingerprint") or "unavailable"
    verified = report.get("verified")
    findings.append(
        Finding(
            "verl update_weights",
            f"fingerprint {fingerprint[:16]}: " + (f"verified ({verified})" if verified else "NOT verified"),
            ok=bool(verified),
        )
    )
    findings.append(
        Finding(
            "weight-sync guard",
            "would be installed" if report["guardable"] else f"would refuse: {report['problem']}",
            ok=bool(report["guardable"]),
        )
    )
    return findings


def check_gpus() -> list[Finding]:
    from supervisor.mechanisms.gpu_health import read_node

    reading = read_node()
    if reading.skipped is not None:
        return [Finding("NVML", f"{reading.skipped} (the fence's GPU checks and node health are skipped)")]
    names = [f"GPU {g.index}" + (f" ({g.uuid})" if g.uuid else "") for g in reading.gpus]
    return [Finding("NVML", f"{len(reading.gpus)} GPU(s): {', '.join(names)}")]


def findings() -> list[Finding]:
    supervisor_version = _version("verl-supervisor") or "not installed as a package (run from a checkout)"
    return [
        Finding("verl-supervisor", supervisor_version),
        Finding("python", platform.python_version()),
        *check_ray(),
        Finding("torch", _version("torch") or "not installed"),
        *check_verl(),
        *check_gpus(),
    ]


def main() -> int:
    found = findings()
    width = max(len(f.what) for f in found)
    for finding in found:
        print(f"{'  ' if finding.ok else '! '}{finding.what:<{width}}  {finding.found}")
    problems = [f for f in found if not f.ok]
    if problems:
        print(f"{len(problems)} problem(s), marked '!'", file=sys.stderr)
        return 2
    print("everything the supervisor relies on is here and verified")
    return 0
