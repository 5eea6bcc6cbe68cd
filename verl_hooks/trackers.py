"""verl's experiment trackers, continued across attempts: the job's side (the supervisor's is
``supervisor.job.trackers``).

Installed with the guard in every process of the job, this wraps ``verl.utils.tracking.Tracking.__init__``
(verl 0.9.1, verl/utils/tracking.py:62) in the process that opens the trackers (the TaskRunner):

- once MLflow is open, the run's id is posted to the supervisor (a ``tracker`` heartbeat), which gives it to
  every later attempt as ``MLFLOW_RUN_ID``;
- an attempt that attaches to that run would lose MLflow altogether in verl 0.9.1: ``Tracking`` logs the whole
  config as params after ``start_run(run_id=...)`` (tracking.py:112-119), the resumed attempt's config differs
  (``trainer.resume_mode``, ``trainer.resume_from_path``), MLflow refuses to change a param, and verl's retry
  loop ends "without MLflow tracking". So while ``Tracking`` opens an attached run, params the run already has
  are not logged again: the run keeps the first attempt's values, new keys are added.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from verl_hooks import heartbeat
from verl_hooks.contract import HeartbeatKind
from verl_hooks.settings import mlflow_run_id

logger = logging.getLogger(__name__)

TRACKING_MODULE = "verl.utils.tracking"
_MARK = "__verl_hooks_tracking__"


def _backends(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[str]:
    backend = kwargs.get("default_backend", args[2] if len(args) > 2 else "console")
    return [backend] if isinstance(backend, str) else list(backend or [])


@contextlib.contextmanager
def _params_of_the_first_attempt() -> Iterator[None]:
    import mlflow

    original = mlflow.log_params

    def log_params(params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        run = mlflow.active_run()
        if run is not None:
            logged = mlflow.get_run(run.info.run_id).data.params
            params = {key: value for key, value in params.items() if key not in logged}
        return original(params, *args, **kwargs)

    mlflow.log_params = log_params
    try:
        yield
    finally:
        mlflow.log_params = original


def _report_mlflow_run() -> None:
    import mlflow

    run = mlflow.active_run()
    if run is not None:
        # Synchronous: a short first attempt must not exit before the supervisor has the id.
        heartbeat.send_now(HeartbeatKind.TRACKER, backend="mlflow", run_id=run.info.run_id)


def patch_tracking(module: ModuleType) -> None:
    cls = getattr(module, "Tracking", None)
    if cls is None or getattr(cls.__init__, _MARK, False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        mlflow_wanted = "mlflow" in _backends(args, kwargs)
        attached = mlflow_wanted and mlflow_run_id() is not None
        with _params_of_the_first_attempt() if attached else contextlib.nullcontext():
            original(self, *args, **kwargs)
        if "mlflow" in getattr(self, "logger", {}):
            try:
                _report_mlflow_run()
            except Exception as exc:  # noqa: BLE001 - the trackers must never fail training
                logger.warning("verl_hooks: could not report the MLflow run to the supervisor: %r", exc)

    setattr(__init__, _MARK, True)
    cls.__init__ = __init__


def unpatch_tracking(module: ModuleType | None) -> None:
    """verl's own ``Tracking.__init__`` back (for tests)."""
    cls = getattr(module, "Tracking", None)
    if cls is not None and getattr(cls.__init__, _MARK, False):
        cls.__init__ = cls.__init__.__wrapped__
