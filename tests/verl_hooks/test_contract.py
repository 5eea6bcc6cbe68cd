"""The job/supervisor contract: one module both sides import, and the only one the supervisor imports."""

from __future__ import annotations

import ast
import json

import pytest

from tests.conftest import REPO_ROOT
from verl_hooks.contract import (
    HEARTBEAT_FIELDS,
    ErrorRecord,
    HeartbeatKind,
    JobExitCode,
    RecordSource,
    exception_chain,
    heartbeat_kind,
    heartbeat_payload,
    record_from_payload,
    root_cause,
)


def test_the_supervisor_imports_nothing_of_verl_hooks_but_the_contract() -> None:
    imported = set()
    for path in (REPO_ROOT / "supervisor").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add((node.module, path.relative_to(REPO_ROOT).as_posix()))
            elif isinstance(node, ast.Import):
                imported.update((alias.name, path.relative_to(REPO_ROOT).as_posix()) for alias in node.names)
    hooks = sorted((module, where) for module, where in imported if module.split(".")[0] == "verl_hooks")
    assert hooks, "the supervisor reads the contract"
    assert {module for module, _ in hooks} == {"verl_hooks.contract"}, hooks


def test_environment_variable_names_are_spelled_only_in_the_contract() -> None:
    spelled = []
    for package in ("supervisor", "verl_hooks"):
        for path in (REPO_ROOT / package).rglob("*.py"):
            if path.name == "contract.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                is_text = isinstance(node, ast.Constant) and isinstance(node.value, str)
                if is_text and node.value.startswith(("VERL_SUPERVISOR_", "VERL_HOOKS_")) and node.value.isupper():
                    spelled.append(f"{path.relative_to(REPO_ROOT)}: {node.value}")
    assert not spelled


def test_a_heartbeat_carries_its_kinds_fields_and_no_others() -> None:
    beat = heartbeat_payload(HeartbeatKind.SYNC_PHASE, 2, step=3, phase="finalize")
    assert (beat["kind"], beat["attempt"], beat["step"], beat["phase"]) == ("sync_phase", 2, 3, "finalize")
    assert heartbeat_kind(beat) is HeartbeatKind.SYNC_PHASE
    assert heartbeat_kind({"kind": "from_a_newer_job"}) is None
    with pytest.raises(ValueError, match="carries no phse"):
        heartbeat_payload(HeartbeatKind.SYNC_PHASE, 2, step=3, phse="finalize")
    assert set(HEARTBEAT_FIELDS) == set(HeartbeatKind)


def test_an_error_record_travels_as_json_and_a_foreign_one_is_refused() -> None:
    record = ErrorRecord(
        error_type="X", message="m", source=RecordSource.LAUNCHER, exit_code=JobExitCode.WEIGHT_SYNC_FATAL
    )
    assert record_from_payload(json.loads(record.to_json())) == record
    assert record_from_payload(json.loads(record.to_json())).source is RecordSource.LAUNCHER
    assert record_from_payload({**record.to_dict(), "source": "someone-else"}) is None
    assert record_from_payload({**record.to_dict(), "schema_version": 99}) is None
    assert record_from_payload("not a record") is None


def test_the_exception_chain_follows_rays_cause_and_stops_at_cycles() -> None:
    inner = ValueError("inner")
    wrapper = RuntimeError("ray task error")
    wrapper.cause = inner  # what RayTaskError carries
    outer = KeyError("outer")
    outer.__cause__ = wrapper
    inner.__cause__ = outer  # a cycle
    assert [type(e) for e in exception_chain(outer)] == [KeyError, RuntimeError, ValueError]
    assert root_cause(outer) is inner
