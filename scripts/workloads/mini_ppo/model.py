"""The policy model and the synthetic task of the mini-PPO job.

The task is a contextual bandit: an observation is a random vector, the correct action is the argmax of a fixed
random projection of it, and the reward is 1 for the correct action. Small enough for two CPU cores, yet a real
learning problem: the reward rises as the policy trains, and it only rises if the rollout generates with the
weights the trainer pushed to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PolicySpec:
    obs_dim: int = 16
    hidden_dim: int = 64
    num_actions: int = 8


def build_policy(spec: PolicySpec, seed: int) -> nn.Module:
    """The same initial weights for the same seed, in every process, whatever else used torch's RNG."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(spec.obs_dim, spec.hidden_dim),
        nn.Tanh(),
        nn.Linear(spec.hidden_dim, spec.num_actions),
    )
    with torch.no_grad():
        for param in model.parameters():
            scale = 1.0 / param.shape[-1] ** 0.5
            param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * scale)
    return model


def build_value_model(spec: PolicySpec, seed: int) -> nn.Module:
    """The critic: observation -> one value, initialised from a generator of its own (never torch's global RNG,
    whose state the checkpoints carry), so that adding it leaves every other random draw as it was."""
    generator = torch.Generator().manual_seed(seed + 104729)
    model = nn.Sequential(nn.Linear(spec.obs_dim, spec.hidden_dim), nn.Tanh(), nn.Linear(spec.hidden_dim, 1))
    with torch.no_grad():
        for param in model.parameters():
            scale = 1.0 / param.shape[-1] ** 0.5
            param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * scale)
    return model


def named_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Weights as verl's engines hand them to a checkpoint engine: (name, tensor) pairs, detached."""
    for name, param in model.named_parameters():
        yield name, param.detach()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter's name, dtype, shape and bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        contiguous = tensor.detach().contiguous()
        digest.update(f"{name}|{contiguous.dtype}|{tuple(contiguous.shape)}|".encode())
        digest.update(contiguous.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class BanditTask:
    """The fixed environment: a dataset of observations and the rule that scores actions."""

    def __init__(self, spec: PolicySpec, dataset_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed + 7919)
        self.observations = torch.randn(dataset_size, spec.obs_dim, generator=generator)
        self._projection = torch.randn(spec.obs_dim, spec.num_actions, generator=generator)

    def __len__(self) -> int:
        return self.observations.shape[0]

    def correct_actions(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs @ self._projection).argmax(dim=-1)

    def rewards(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return (actions == self.correct_actions(obs)).to(torch.float32)
