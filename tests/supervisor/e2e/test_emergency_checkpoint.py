"""The supervisor and the real mini-PPO job: the work a failure costs is the step in flight, not the steps since the
last periodic save.

With ``trainer.save_freq=3``, the sync of step 5 fails: when the trainer side had finished, the trainer saves
step 5 before the job ends and the relaunch resumes there (nothing redone); when a trainer task was still in
flight, nothing is saved over it and the relaunch resumes from step 3, the record saying why. A supervisor
stopped by SIGTERM with ``restart.save_on_stop_s`` saves the step the job is at, and a supervisor started again on
the run resumes from it. Every run ends with the weights of a run that never failed.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.supervisor.e2e.conftest import (
    FAST,
    events_of,
    final_of,
    run_supervisor,
    run_supervisor_with_faults,
    start_supervisor,
    wait_until,
)

pytestmark = pytest.mark.ray

# The reference run's job (tests/supervisor/e2e/conftest.py JOB_ARGS) with saves due at 3 and 6: the saves
# change no bit of the weights, so its final digest is this job's too.
JOB = ("trainer.total_training_steps=6", "trainer.save_freq=3", "seed=11", "trainer.n_workers=1")
MULTI_PHASE = ("rollout.backend=cpu_gloo", "rollout.num_replicas=1")


def record_of(run_dir: Path, attempt: int) -> dict:
    return json.loads((run_dir / "attempts" / str(attempt) / "error.json").read_text())


@pytest.mark.parametrize(
    ("backend", "fault"),
    [
        # -m slow: the default suite's naive failure test (test_mini_ppo.py) resumes at its emergency step too.
        pytest.param((), "naive:raise@5#1", id="naive", marks=pytest.mark.slow),
        # The rollout side raising once the weights are in: every trainer task of the sync has finished.
        pytest.param(MULTI_PHASE, "resume_generation:raise@5#1", id="multi-phase", marks=pytest.mark.slow),
    ],
)
def test_a_failed_sync_whose_trainer_side_finished_resumes_at_its_step_with_nothing_redone(
    runs, reference, backend: tuple[str, ...], fault: str
) -> None:
    run_dir = runs.new()
    proc = run_supervisor_with_faults(run_dir, fault, job_args=(*JOB, *backend))
    assert proc.returncode == 0, proc.stderr[-4000:]

    exited = events_of(run_dir, "attempt_exited")
    saved = exited[0]["emergency_checkpoint"]
    assert (saved["status"], saved["trigger"], saved["step"]) == ("saved", "sync_failure", 5)
    assert record_of(run_dir, 1)["emergency_checkpoint"] == saved
    started = events_of(run_dir, "attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (5, 1)]
    verified = events_of(run_dir, "resume_verified")
    assert [(e["resume_step"], e["first_step"]) for e in verified] == [(5, 6)]
    assert final_of(run_dir)["steps_run"] == 1, "only step 6 ran again: 0 steps redone"
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]
    assert "emergency checkpoint: saved step 5" in proc.stderr


STEP_FAILURES = [
    # The generation of step 5 raises on the trainer's side, once its batch is drawn: step 4 is whole in the
    # trainer, and is saved with the dataloader as it was at step 4's sync.
    # -m slow: the decision and the save on verl's own trainers are in the default suite (test_emergency_save.py),
    # and so is the outcome's way through Ray into the record (test_guard_policy.py).
    pytest.param("generate:raise@5#1", (), id="generate-raise", marks=pytest.mark.slow),
    pytest.param("reward:raise@5#1", (), id="reward-raise", marks=pytest.mark.slow),
    # A standalone rollout replica's process SIGKILLed as step 5's generation starts: the trainer survives.
    pytest.param("generate:exit@5#1", MULTI_PHASE, id="generate-exit", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("fault", "backend"), STEP_FAILURES)
def test_a_failure_outside_the_sync_saves_the_last_completed_step_and_resumes_there(
    runs, reference, fault: str, backend: tuple[str, ...]
) -> None:
    run_dir = runs.new()
    proc = run_supervisor_with_faults(run_dir, fault, job_args=(*JOB, *backend))
    assert proc.returncode == 0, proc.stderr[-4000:]

    saved = events_of(run_dir, "attempt_exited")[0]["emergency_checkpoint"]
    assert (saved["status"], saved["trigger"], saved["step"], saved["failed_step"]) == (
        "saved",
        "step_failure",
        4,
        5,
    ), saved
    record = record_of(run_dir, 1)
    assert record["emergency_checkpoint"] == saved
    assert record["global_step"] == 5, "the record names the step that failed"
    started = events_of(run_dir, "attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (4, 1)]
    verified = events_of(run_dir, "resume_verified")
    assert [(e["resume_step"], e["first_step"]) for e in verified] == [(4, 5)]
    assert final_of(run_dir)["steps_run"] == 2, "steps 5 and 6 ran again: the failed step only"
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]


@pytest.mark.slow
def test_a_trainer_task_that_raised_saves_nothing_and_the_record_says_why(runs, reference) -> None:
    run_dir = runs.new()
    proc = run_supervisor_with_faults(run_dir, "train:raise@5#1", job_args=JOB)
    assert proc.returncode == 0, proc.stderr[-4000:]

    skipped = events_of(run_dir, "attempt_exited")[0]["emergency_checkpoint"]
    assert (skipped["status"], skipped["trigger"], skipped["failed_step"]) == ("skipped", "step_failure", 5)
    assert skipped["reason"] == "trainer task(s) raised (_update_actor): a worker may be left inside a collective"
    assert record_of(run_dir, 1)["emergency_checkpoint"] == skipped
    started = events_of(run_dir, "attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (3, None)]
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]


@pytest.mark.slow
def test_a_failed_sync_with_a_trainer_task_in_flight_saves_nothing_and_resumes_from_the_periodic_step(
    runs, reference
) -> None:
    """The trainer's init_process_group tasks wait in the group's rendezvous for a rollout that never joins."""
    run_dir = runs.new()
    proc = run_supervisor_with_faults(run_dir, "build_process_group:strand@5#1", job_args=(*JOB, *MULTI_PHASE))
    assert proc.returncode == 0, proc.stderr[-4000:]

    skipped = events_of(run_dir, "attempt_exited")[0]["emergency_checkpoint"]
    assert (skipped["status"], skipped["step"]) == ("skipped", 5)
    assert skipped["reason"].startswith("the trainer side is not idle: ")
    assert "still running" in skipped["reason"]
    assert record_of(run_dir, 1)["emergency_checkpoint"] == skipped
    started = events_of(run_dir, "attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (3, None)]
    assert not events_of(run_dir, "checkpoint_set_aside"), "nothing half-written"
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]


@pytest.mark.slow  # two supervisors on one run (the trainer's side of a stop: test_emergency_save.py)
def test_sigterm_with_save_on_stop_saves_the_step_and_the_next_supervisor_resumes_there(runs, reference) -> None:
    run_dir = runs.new()
    # The trainer learns of the stop from the answers to its next sync's beats: the step it saves depends on the
    # machine's pace, so no periodic save (save_freq beyond the run: only the last step) may have taken it first.
    job = (*JOB, "trainer.save_freq=100", "trainer.extra_step_time_s=1")
    supervisor = start_supervisor(run_dir, *FAST, "restart.save_on_stop_s=120", job_args=job)
    beats = run_dir / "attempts" / "1" / "heartbeats.jsonl"

    def synced(step: int) -> bool:
        lines = beats.read_text().splitlines() if beats.exists() else []
        return any(b.get("kind") == "sync_end" and b.get("step") == step for b in map(json.loads, lines))

    wait_until(lambda: synced(1), 240, "the weight sync of step 1")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=240) == 143

    (asked,) = events_of(run_dir, "save_on_stop_requested")
    assert asked["wait_s"] == 120
    (stopped,) = events_of(run_dir, "save_on_stop")
    saved = stopped["emergency_checkpoint"]
    assert stopped["exited"] is True
    assert (saved["status"], saved["trigger"]) == ("saved", "stop_request")
    assert 2 <= saved["step"] < 6, "a sync after the signal: step 1's had ended before it"
    exited = events_of(run_dir, "attempt_exited")
    assert [(e["exit_code"], e["rule"]) for e in exited] == [(143, "interrupted")]
    assert record_of(run_dir, 1)["error_type"] == "verl_hooks.errors.StopRequested"
    assert events_of(run_dir, "run_finished")[-1]["exit_code"] == 143

    again = run_supervisor(run_dir, *FAST, job_args=JOB)
    assert again.returncode == 0, again.stderr[-4000:]
    started = events_of(run_dir, "attempt_started")
    assert [(e["resume_step"], e["emergency_of"]) for e in started] == [(None, None), (saved["step"], 1)]
    assert final_of(run_dir)["weights_sha256"] == reference["final"]["weights_sha256"]
