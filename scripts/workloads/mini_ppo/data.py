"""The job's data iterator: batches of observations, reshuffled every epoch, with a resumable position.

It plays the part of verl's ``StatefulDataLoader``: its ``state_dict`` is what the trainer saves as ``data.pt``,
and a job resumed from a checkpoint sees exactly the batches the uninterrupted job would have seen. The order of
an epoch depends only on (seed, epoch), never on how many batches were drawn before, so the position is all the
state there is.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers: the same in every process and every run (unlike ``hash``)."""
    digest = hashlib.sha256(",".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchIterator:
    """Endless batches of ``batch_size`` rows of ``observations``; the last partial batch of an epoch is dropped,
    as verl's train dataloader does (``drop_last=True``)."""

    def __init__(self, observations: torch.Tensor, batch_size: int, seed: int) -> None:
        if not 0 < batch_size <= len(observations):
            raise ValueError(f"batch_size must be in 1..{len(observations)} (the dataset size), got {batch_size}")
        self.observations = observations
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.observations) // self.batch_size

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(len(self.observations), generator=generator)

    def next_batch(self) -> torch.Tensor:
        start = self.position * self.batch_size
        batch = self.observations[self._order[start : start + self.batch_size]]
        self.position += 1
        if self.position == self.batches_per_epoch:
            # Roll over at once, so that a state saved after an epoch's last batch already names the next epoch.
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A different batch size or seed would resume a different stream: refuse rather than diverge silently.
        for key in ("batch_size", "seed"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"data state was saved with {key}={state[key]}, this run has {getattr(self, key)}")
        position = int(state["position"])
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"data state position {position} is outside 0..{self.batches_per_epoch - 1}")
        self.epoch = int(state["epoch"])
        self.position = position
        self._order = self._epoch_order(self.epoch)
