"""Reading verl's configuration wherever it comes from, without failing on what is not there.

verl hands its trainer and callbacks a ``DictConfig``; its workers turn sections into dataclasses
(``omega_conf_to_dataclass``); the mini-PPO job keeps a dataclass. The hooks only read a few keys of it, and a key
that is absent or cannot be read (a ``???`` value, an interpolation that does not resolve) means "unknown".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

ABSENT = object()
"""What ``get`` and ``select`` return for a key that is not there or cannot be read."""


def is_section(node: Any) -> bool:
    return isinstance(node, Mapping) or (dataclasses.is_dataclass(node) and not isinstance(node, type))


def get(node: Any, key: str) -> Any:
    """``node[key]`` for a section (a DictConfig, a dict or a dataclass); ``ABSENT`` when ``node`` is no section,
    or the key is not there or cannot be read."""
    if not is_section(node):
        return ABSENT
    try:
        if isinstance(node, Mapping):
            return node.get(key, ABSENT)
        return getattr(node, key, ABSENT)
    except Exception:  # noqa: BLE001 - OmegaConf raises its own errors for MISSING and broken interpolations
        return ABSENT


def select(node: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        node = get(node, key)
    return node
