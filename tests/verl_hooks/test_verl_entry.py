"""verl's own entry point as users run it, through our launcher, as far as it goes on a machine without GPU: every
trainer module imports (the `verl` extra has what they need), and the preset composes with verl's Hydra config,
the hook in ray_init's runtime_env and the checkpoint callback in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from supervisor.mechanisms.ray_cluster import LocalRayCluster
from tests.conftest import REPO_ROOT

# Every trainer that calls CheckpointEngineManager.update_weights in verl 0.9.1 (see the README's compatibility
# notes): the V1 trainer and its modes, the legacy trainer, the fully-async one.
TRAINER_MODULES = (
    "verl.trainer.main_ppo",
    "verl.trainer.ppo.v1.trainer_base",
    "verl.trainer.ppo.v1.trainer_sync",
    "verl.trainer.ppo.v1.trainer_separate_async",
    "verl.trainer.ppo.v1.trainer_colocate_async",
    "verl.trainer.ppo.ray_trainer",
    "verl.experimental.fully_async_policy.fully_async_trainer",
)


def test_every_trainer_module_of_verl_imports_with_the_verl_extra() -> None:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\nprint('imported')"
    done = subprocess.run(
        [sys.executable, "-c", code, *TRAINER_MODULES], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("imported")


@pytest.mark.parametrize("users_callback", [None, "tests.mini_ppo.user_callback.RecordingCallback"])
def test_main_ppo_through_the_launcher_composes_the_preset(tmp_path: Path, users_callback: str | None) -> None:
    preset = yaml.safe_load((REPO_ROOT / "conf" / "job" / "verl_ppo.yaml").read_text())["job"]
    argv = [sys.executable if part == "{python}" else part for part in preset["argv"]]
    extra = [f"trainer.checkpoint_callback_class={users_callback}"] if users_callback else []
    args = [*preset["args"], *extra, f"trainer.default_local_dir={tmp_path}", "trainer.total_training_steps=3"]
    done = subprocess.run(
        [*argv, "--cfg", "job", *args], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    config = yaml.safe_load(done.stdout[done.stdout.index("data:") :])
    assert config["ray_kwargs"]["ray_init"]["runtime_env"]["worker_process_setup_hook"] == "verl_hooks.install"
    trainer = config["trainer"]
    assert trainer["checkpoint_callback_class"] == "verl_hooks.checkpoint_callback.SupervisorCheckpointCallback"
    assert (trainer["default_local_dir"], trainer["total_training_steps"]) == (str(tmp_path), 3)


def write_tiny_model_and_data(folder: Path) -> None:
    """What verl reads before it asks for GPUs: a model's config.json and tokenizer (its weights are loaded on the
    GPU workers, never reached here) and GSM8K-shaped parquet files. Made here: nothing can be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config

    folder.mkdir(parents=True)
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    Qwen2Config(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=0,
        eos_token_id=1,
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(folder)
    import pandas as pd

    rows = [
        {
            "data_source": "toy",
            "prompt": [{"role": "user", "content": "w1 w2 w3"}],
            "ability": "toy",
            "reward_model": {"style": "rule", "ground_truth": "w4"},
            "extra_info": {"index": i},
        }
        for i in range(16)
    ]
    for split in ("train", "test"):
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet")


@pytest.mark.ray
def test_main_ppo_on_cpu_runs_until_verl_asks_for_a_gpu_and_ends_with_our_exit_code_and_record(
    tmp_path: Path, ray_cluster: LocalRayCluster
) -> None:
    """verl's own main_ppo, with the preset and a GRPO quick-start's overrides (a tiny local model), composes its
    config, starts its TaskRunner with the hook, builds the TransferQueue and its trainer, then stops where it needs
    a GPU: verl/single_controller/ray/base.py, ResourcePoolManager._check_resource_available (verl 0.9.1, ~line
    240). The stop is verl's, reported as a plain failure: launcher exit 1, an error record naming it."""
    model = tmp_path / "tiny"
    write_tiny_model_and_data(model)
    preset = yaml.safe_load((REPO_ROOT / "conf" / "job" / "verl_ppo.yaml").read_text())["job"]
    argv = [sys.executable if part == "{python}" else part for part in preset["argv"]]
    overrides = [
        "algorithm.adv_estimator=grpo",
        f"data.train_files={model / 'train.parquet'}",
        f"data.val_files={model / 'test.parquet'}",
        "data.train_batch_size=8",
        "data.max_prompt_length=16",
        "data.max_response_length=16",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.n=2",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        "trainer.logger=[console]",
        f"trainer.default_local_dir={tmp_path / 'checkpoints'}",
        # TransferQueue's default of 8 storage units, 1 CPU each, would wait forever on a small cluster.
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=2",
    ]
    error_file = tmp_path / "error.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VERL_HOOKS_", "VERL_SUPERVISOR_", "RAY_"))},
        **ray_cluster.env(),
        "PYTHONPATH": str(REPO_ROOT),
        "VERL_SUPERVISOR_ERROR_FILE": str(error_file),
    }
    done = subprocess.run(
        [*argv, *preset["args"], *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-4000:]
    assert "Total available GPUs 0 is less than total desired GPUs 1" in output
    assert "verl/single_controller/ray/base.py" in output, "the stop is verl's own check"
    assert "TaskRunnerV1" in output, "verl's TaskRunner ran"
    record = json.loads(error_file.read_text())
    assert (record["error_type"], record["exit_code"], record["source"]) == ("ValueError", 1, "launcher")
    assert "Total available GPUs 0" in record["message"]
    assert "_check_resource_available" in record["traceback"]
