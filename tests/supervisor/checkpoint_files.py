"""Complete verl 0.9.1 FSDP step folders, written with torch.save as verl writes them (for the supervisor's tests)."""

from __future__ import annotations

from pathlib import Path

import torch


def write_step(root: Path, step: int, world_size: int = 2, *, critic: bool = False, payload: int = 64) -> Path:
    """Writes a complete verl 0.9.1 FSDP step folder, with the optional extras verl also writes."""
    folder = root / f"global_step_{step}"
    for role in ("actor", "critic") if critic else ("actor",):
        shards = folder / role
        (shards / "huggingface").mkdir(parents=True)
        (shards / "huggingface" / "config.json").write_text('{"model_type": "tiny"}')
        (shards / "fsdp_config.json").write_text(f'{{"FSDP_version": 1, "world_size": {world_size}}}')
        for rank in range(world_size):
            suffix = f"world_size_{world_size}_rank_{rank}.pt"
            torch.save({"w": torch.full((payload,), float(rank))}, shards / f"model_{suffix}")
            torch.save(
                {"state": {0: {"exp_avg": torch.zeros(8)}}, "param_groups": [{"lr": 1e-6}]}, shards / f"optim_{suffix}"
            )
            torch.save(
                {"lr_scheduler": {"last_epoch": step}, "rng": {"cpu": torch.zeros(4)}}, shards / f"extra_state_{suffix}"
            )
    torch.save({"epoch": 0, "batches_seen": step}, folder / "data.pt")
    return folder
