"""Checkpoint step folders written by verl's own code, for tests that judge or read verl checkpoints.

    from tests.verl_fixtures import StepSpec, write_fsdp_step, write_fsdp_steps

    step_dir = write_fsdp_step(tmp_path / "ckpt", 1)                 # one step, verl's default save_contents
    dirs = write_fsdp_steps([                                       # several steps and variants, one subprocess
        StepSpec(tmp_path / "a", 1),
        StepSpec(tmp_path / "a", 2, save_contents=("model", "hf_model"), critic=True),
        StepSpec(tmp_path / "b", 5, tracker=False),                 # as an async save (or a crash) leaves it
    ])

What a step folder holds is what verl 0.9.1's V1 trainer writes (``verl/trainer/ppo/v1/trainer_base.py``,
``_save_checkpoint``, ~line 948-1030), in its order:

1. ``global_step_N/actor/``, by verl's ``FSDPCheckpointManager.save_checkpoint``
   (``verl/utils/checkpoint/fsdp_checkpoint_manager.py:272``) on a tiny ``LlamaForCausalLM`` sharded with FSDP2
   on CPU (``gloo``, world size 1): ``model_/optim_/extra_state_world_size_1_rank_0.pt`` as ``save_contents``
   asks, always ``huggingface/`` (config, generation config) and ``fsdp_config.json``, and the full HF weights in
   ``huggingface/`` with ``hf_model``;
2. ``global_step_N/critic/`` when ``critic`` is set, the same way on a tiny ``LlamaForTokenClassification``
   (``num_labels=1``: verl's critic is a token classifier);
3. ``global_step_N/data.pt``, a ``torch.save`` of a dataloader-like state dict;
4. ``latest_checkpointed_iteration.txt`` in the root, containing ``N``, unless ``tracker=False``.

Rotation (``max_ckpt_to_keep``) is verl's too: one manager per root, role and ``save_contents`` lives across the
specs of a call, so a later step deletes the ``actor/`` (and ``critic/``) of older ones exactly as in a run, leaving
their ``data.pt``; a spec with other ``save_contents`` is as a job restarted with a new config, whose manager starts
with an empty list (verl keeps it in memory only).

verl, torch and transformers are imported only in a fresh ``python`` subprocess (verl's import takes seconds and a
process group must not leak into the test process), so batch every step a test module needs into one
``write_fsdp_steps`` call, e.g. in a module-scoped fixture. Nothing here depends on the supervisor or on
``verl_hooks``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_SAVE_CONTENTS = ("model", "optimizer", "extra")
"""verl's default when ``checkpoint.save_contents`` is null (``verl/utils/checkpoint/checkpoint_manager.py:56-57``)."""

TRACKER_FILE = "latest_checkpointed_iteration.txt"
SUBPROCESS_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class StepSpec:
    """One ``global_step_{step}`` folder to write under ``root``."""

    root: Path
    step: int
    save_contents: tuple[str, ...] = DEFAULT_SAVE_CONTENTS
    """What verl's manager saves for each role (``model``, ``optimizer``, ``extra``, ``hf_model``)."""
    critic: bool = False
    """Also write ``critic/``, as a trainer with a critic (GAE) does."""
    tracker: bool = True
    """Write the tracker after the step, as a synchronous save does; False leaves the folder as an async save
    (or a crash between the folder and the tracker) does."""
    max_ckpt_to_keep: int | None = None
    """verl's rotation limit for this save (``trainer.max_actor_ckpt_to_keep``)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(Path(self.root).resolve()),
            "step": self.step,
            "save_contents": list(self.save_contents),
            "critic": self.critic,
            "tracker": self.tracker,
            "max_ckpt_to_keep": self.max_ckpt_to_keep,
        }

    @property
    def step_dir(self) -> Path:
        return Path(self.root) / f"global_step_{self.step}"


def write_fsdp_steps(specs: Sequence[StepSpec]) -> list[Path]:
    """Write every spec's step folder, in order, in one subprocess; returns the step folders.

    Raises ``RuntimeError`` with the subprocess's output if verl failed.
    """
    specs = list(specs)
    if not specs:
        return []
    with tempfile.TemporaryDirectory(prefix="verl-fixtures-") as scratch:
        env = {
            **os.environ,
            # CPU only and one thread: the same files on any test machine, and polite on a shared one.
            "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_OFFLINE": "1",
        }
        done = subprocess.run(
            [sys.executable, __file__, json.dumps([spec.to_json() for spec in specs]), scratch],
            env=env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"verl failed to write the checkpoint fixtures (exit {done.returncode}):\n{done.stderr}")
    return [spec.step_dir for spec in specs]


def write_fsdp_step(
    root: str | os.PathLike[str],
    step: int,
    save_contents: Sequence[str] = DEFAULT_SAVE_CONTENTS,
    critic: bool = False,
    *,
    tracker: bool = True,
) -> Path:
    """One step folder (see the module's docstring); prefer ``write_fsdp_steps`` for several."""
    spec = StepSpec(Path(root), step, tuple(save_contents), critic=critic, tracker=tracker)
    return write_fsdp_steps([spec])[0]


# --- the subprocess --------------------------------------------------------------------------------------------


def _tiny_model(role: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    sizes = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2}
    if role == "critic":
        config = LlamaConfig(**sizes, **heads, num_labels=1, architectures=["LlamaForTokenClassification"])
        return LlamaForTokenClassification(config)
    return LlamaForCausalLM(LlamaConfig(**sizes, **heads, architectures=["LlamaForCausalLM"]))


def _manager(role: str, save_contents: Sequence[str]) -> Any:
    import torch
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager

    model = _tiny_model(role)
    # FSDP2: verl's FSDP1 path refuses a CPU-only process.
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # One optimizer step, so that optim_*.pt holds real moments as in a run.
    model(torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    scheduler.step()
    checkpoint_config = OmegaConf.create(
        {"save_contents": list(save_contents), "load_contents": list(save_contents), "async_save": False}
    )
    return FSDPCheckpointManager(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        processing_class=None,
        checkpoint_config=checkpoint_config,
    )


def _write_all(specs: list[dict[str, Any]], scratch: str) -> None:
    import torch
    import torch.distributed as dist

    torch.manual_seed(0)
    # A file rendezvous: no port to pick on a machine other test runs share.
    dist.init_process_group("gloo", init_method=f"file://{scratch}/rendezvous", rank=0, world_size=1)
    try:
        managers: dict[tuple[str, str, tuple[str, ...]], Any] = {}
        for spec in specs:
            root = Path(spec["root"])
            step_dir = root / f"global_step_{spec['step']}"
            contents = tuple(spec["save_contents"])
            for role in ("actor", "critic") if spec["critic"] else ("actor",):
                key = (str(root), role, contents)
                if key not in managers:
                    managers[key] = _manager(role, contents)
                managers[key].save_checkpoint(
                    str(step_dir / role), None, spec["step"], max_ckpt_to_keep=spec["max_ckpt_to_keep"]
                )
            step_dir.mkdir(parents=True, exist_ok=True)
            # What StatefulDataLoader.state_dict() looks like, small.
            torch.save({"_num_yielded": spec["step"], "_sampler_iter_yielded": spec["step"]}, step_dir / "data.pt")
            if spec["tracker"]:
                (root / TRACKER_FILE).write_text(str(spec["step"]))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _write_all(json.loads(sys.argv[1]), sys.argv[2])
