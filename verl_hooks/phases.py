"""The phases of verl's weight sync, and which cleanup steps a failure in each one calls for.

verl 0.9.1's ``CheckpointEngineManager.update_weights`` runs these phases in order (see
../shared/reference/VERL_AND_RAY_FACTS.md). The "naive" backend (colocated trainer and rollout) is a single
phase of its own. Nothing here imports verl or Ray: the cleanup plan is a pure function so that it can be
tested as a table.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from enum import Enum


class SyncPhase(str, Enum):
    """A phase of ``CheckpointEngineManager.update_weights``, in the order verl runs them."""

    NAIVE = "naive"
    """Colocated path: one ``ray.get(actor_wg.update_weights(mode="naive"))``."""
    ABORT = "abort"
    """Pause generation on every replica (unfinished requests kept for partial rollout)."""
    RELEASE_KV_CACHE = "release_kv_cache"
    """Free the replicas' KV cache; weights stay in place."""
    BUILD_PROCESS_GROUP = "build_process_group"
    """``prepare`` on every checkpoint engine, then ``init_process_group`` (a blocking rendezvous)."""
    UPDATE_WEIGHTS = "update_weights"
    """Weights copied from trainer to rollout in buckets, in place."""
    FINALIZE = "finalize"
    """Free the buckets (and the group, when it is rebuilt each sync) on both sides."""
    RESUME_KV_CACHE = "resume_kv_cache"
    """Re-allocate the replicas' KV cache."""
    RESUME_GENERATION = "resume_generation"
    """Let the replicas generate again."""
    UNKNOWN = "unknown"
    """The failure came before the first phase was entered (it should not happen with verl 0.9.1)."""


MULTI_PHASE_ORDER: tuple[SyncPhase, ...] = (
    SyncPhase.ABORT,
    SyncPhase.RELEASE_KV_CACHE,
    SyncPhase.BUILD_PROCESS_GROUP,
    SyncPhase.UPDATE_WEIGHTS,
    SyncPhase.FINALIZE,
    SyncPhase.RESUME_KV_CACHE,
    SyncPhase.RESUME_GENERATION,
)


class CleanupStep(str, Enum):
    """A best-effort step that puts the rollout back into a running state after a failed sync."""

    FINALIZE_ENGINES = "finalize_engines"
    """``execute_checkpoint_engine(["finalize"])`` on trainer and rollout workers: frees buckets and groups."""
    RESUME_KV_CACHE = "resume_kv_cache"
    RESUME_GENERATION = "resume_generation"
    WAKE_UP = "wake_up"
    """Naive path: the rollout was put to sleep before the sync; waking it restores weights and KV cache."""


# Each cleanup step undoes what one phase started, and is needed until the phase that normally undoes it has
# finished: (step, phase that made it necessary, phase that normally does it). Listed in the order they run,
# the reverse of the order in which the sync set things up.
_UNDO_RULES: tuple[tuple[CleanupStep, SyncPhase, SyncPhase], ...] = (
    (CleanupStep.FINALIZE_ENGINES, SyncPhase.BUILD_PROCESS_GROUP, SyncPhase.FINALIZE),
    (CleanupStep.RESUME_KV_CACHE, SyncPhase.RELEASE_KV_CACHE, SyncPhase.RESUME_KV_CACHE),
    (CleanupStep.RESUME_GENERATION, SyncPhase.ABORT, SyncPhase.RESUME_GENERATION),
    (CleanupStep.WAKE_UP, SyncPhase.NAIVE, SyncPhase.NAIVE),
)


def plan_cleanup(entered: Sequence[SyncPhase], completed: Collection[SyncPhase]) -> list[CleanupStep]:
    """The cleanup steps a failed sync needs, in the order to run them.

    A step runs when the sync got far enough to need it (the phase that made it necessary was entered) and did
    not finish the phase that would have done it. That includes the failed phase itself: a failed
    ``resume_kv_cache`` is tried once more, bounded by its timeout, because a rollout with its KV cache back is
    worth one more attempt and the attempt cannot hang the job.
    """
    entered_set = set(entered)
    return [step for step, needs, done_by in _UNDO_RULES if needs in entered_set and done_by not in completed]
