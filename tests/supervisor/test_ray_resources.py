"""Which of the cluster's resources the fence compares before and after an attempt."""

from __future__ import annotations

import pytest

from supervisor.mechanisms.ray_resources import still_held, tracked


@pytest.mark.parametrize(
    ("name", "compared"),
    [
        ("GPU", True),
        ("rollout_slot", True),  # a custom resource of the job's
        ("CPU", False),
        ("memory", False),
        ("object_store_memory", False),
        ("node:10.0.0.3", False),
        ("node:__internal_head__", False),
        ("accelerator_type:H100", False),
        ("GPU_group_0_3f2a", False),  # a placement group's bundle: counted inside its group
        ("GPU_group_3f2a", False),
    ],
)
def test_gpus_and_custom_resources_are_compared_cpus_and_labels_are_not(name: str, compared: bool) -> None:
    assert tracked(name) is compared


def test_what_is_still_held_is_what_before_had_and_now_lacks() -> None:
    before = {"GPU": 8.0, "rollout_slot": 2.0}
    assert still_held(before, {"GPU": 8.0, "rollout_slot": 2.0}) == {}
    assert still_held(before, {"GPU": 9.0, "rollout_slot": 2.0}) == {}, "more than before is fine"
    assert still_held(before, {"GPU": 6.0}) == {"GPU": 2.0, "rollout_slot": 2.0}
    assert still_held(before, {"GPU": 7.9999999, "rollout_slot": 2.0}) == {}, "float noise is not a held GPU"
