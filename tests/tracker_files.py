"""Reading what experiment trackers wrote offline: an MLflow file store, tensorboard event files, wandb's
offline runs."""

from __future__ import annotations

import os
from pathlib import Path


def mlflow_runs(store: Path) -> tuple[list, object]:
    """Every run in the MLflow file store at ``store``, and a client of it."""
    from mlflow.tracking import MlflowClient

    # MLflow 3 refuses its file store unless asked (a database needs more than mlflow-skinny); read-only here.
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"

    client = MlflowClient(tracking_uri=store.as_uri())
    return [run for e in client.search_experiments() for run in client.search_runs([e.experiment_id])], client


def tensorboard_steps(folder: Path, tag: str = "loss") -> list[int]:
    """The steps of ``tag`` in every event file under ``folder``, sorted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        steps += [scalar.step for scalar in accumulator.Scalars(tag)]
    return sorted(steps)


def wandb_offline_runs(wandb_dir: Path) -> list[str]:
    """The names of wandb's offline run folders (``offline-run-<time>-<run id>``)."""
    return sorted(p.name for p in (wandb_dir / "wandb").glob("offline-run-*"))
