"""A CPU checkpoint engine for verl: trainer rank 0 broadcasts the weights to every rollout worker over gloo.

Registered in verl's ``CheckpointEngineRegistry`` as "cpu_gloo" when this module is imported; point verl at it
with ``checkpoint_engine.backend=cpu_gloo`` and ``checkpoint_engine.custom_backend_module`` naming this module.

It follows verl's NCCL engine: ``prepare`` allocates the bucket and (on the master) picks the rendezvous
address, ``init_process_group`` builds a process group of its own (a TCPStore rendezvous, then gloo) that
blocks until every member joins, the weights travel in fixed-size buckets, and ``finalize`` frees the bucket and
destroys the group. So it has the real failure modes of a collective: a member that never joins, or stops
receiving, leaves the others blocked until the group's timeout.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncGenerator, Generator
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from verl.checkpoint_engine.base import (
    CheckpointEngine,
    CheckpointEngineRegistry,
    TensorMeta,
    merge_weight_chunks,
    split_weight_chunks,
)
from verl.utils.net_utils import get_free_port

BACKEND_NAME = "cpu_gloo"
# verl's merge_weight_chunks reinterprets a byte view of the bucket as the tensor's dtype, which needs the view
# to start at a multiple of the element size: every chunk starts on this boundary.
_ALIGNMENT = 16


def _aligned(offset: int) -> int:
    return (offset + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT


@CheckpointEngineRegistry.register(BACKEND_NAME)
class GlooCheckpointEngine(CheckpointEngine):
    """Bucketed broadcast from trainer rank 0 (the only sender) to all rollout workers."""

    def __init__(self, bucket_size: int, is_master: bool = False, group_timeout_s: float = 300.0) -> None:
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.group_timeout = timedelta(seconds=group_timeout_s)
        self.bucket: torch.Tensor | None = None
        self.rank: int | None = None
        self._store: dist.TCPStore | None = None
        self._group: Any = None
        self._listener: socket.socket | None = None
        """The master's port, held from ``prepare`` until its store binds it."""

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def prepare(self) -> dict[str, Any]:
        self.bucket = torch.empty(self.bucket_size, dtype=torch.uint8)
        if not self.is_master:
            return {"master": None}
        host = ray.util.get_node_ip_address().strip("[]")
        # verl's engines close the probe socket here and bind the port after the metadata's round trip through
        # the manager (nccl_checkpoint_engine.py:254, verl/utils/net_utils.py:73 get_free_port): any process on
        # the machine can take the port in between, and the sync fails with EADDRINUSE or waits in the
        # rendezvous. Seen 2 times in about 350 syncs on a busy machine. A failure nobody injected spoils runs
        # that compare launchers on the same failures, so this engine holds the port until its store binds it.
        # (Handing the socket itself to the store, master_listen_fd, failed when tried: with torch's libuv
        # store, a second store made so in the same process right after the first was destroyed could not be
        # reached.)
        self._close_listener()
        port, self._listener = get_free_port(host, with_alive_sock=True)
        return {"master": {"host": host, "port": port}}

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict[str, Any]]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        master = metadata[0]["master"]
        if master is None:
            raise RuntimeError("cpu_gloo: trainer rank 0 must be the checkpoint engine master (is_master=True)")
        world_size = 1 + rollout_world_size
        actor_kwargs = {
            "rank": [0] + [-1] * (actor_wg_world_size - 1),
            "world_size": [world_size] * actor_wg_world_size,
            "master": [master] * actor_wg_world_size,
        }
        rollout_kwargs = {
            "rank": list(range(1, world_size)),
            "world_size": [world_size] * rollout_world_size,
            "master": [master] * rollout_world_size,
        }
        return actor_kwargs, rollout_kwargs

    def init_process_group(self, rank: int, world_size: int, master: dict[str, Any]) -> None:
        self.rank = rank
        if rank < 0:
            return  # trainer ranks other than 0 sit the broadcast out, as in verl's single-sender NCCL mode
        self._close_listener()  # a microsecond's window left, not the metadata's round trip
        self._store = dist.TCPStore(
            master["host"], master["port"], world_size, is_master=rank == 0, timeout=self.group_timeout
        )
        self._group = dist.ProcessGroupGloo(self._store, rank, world_size, self.group_timeout)

    def finalize(self) -> None:
        self._close_listener()
        self._group = None
        self._store = None
        self.bucket = None
        self.rank = None

    async def send_weights(
        self, weights: Generator[tuple[str, torch.Tensor], None, None], global_steps: int | None = None
    ) -> dict[str, Any]:
        if self.rank != 0:
            return {}
        self._require_group()
        metas: list[TensorMeta] = []
        used = 0
        buckets = 0
        async for meta, chunk in split_weight_chunks(weights, self.bucket_size):
            start = _aligned(used)
            if start + meta.chunk_size > self.bucket_size:
                self._broadcast_bucket(metas, used, last=False)
                buckets += 1
                metas, start = [], 0
            self.bucket[start : start + meta.chunk_size].copy_(chunk)
            meta.offset = start
            metas.append(meta)
            used = start + meta.chunk_size
        self._broadcast_bucket(metas, used, last=True)
        return {"checkpoint_engine/buckets": buckets + 1}

    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        self._require_group()
        async for name, tensor in merge_weight_chunks(self._receive_chunks(), self.bucket_size):
            yield name, tensor

    async def _receive_chunks(self) -> AsyncGenerator[tuple[TensorMeta, torch.Tensor], None]:
        last = False
        while not last:
            metas, last = self._receive_bucket()
            for meta in metas:
                yield meta, self.bucket[meta.offset : meta.offset + meta.chunk_size]

    def _require_group(self) -> None:
        if self._group is None or self.bucket is None:
            raise RuntimeError("cpu_gloo: prepare and init_process_group must run before sending or receiving")

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._group.broadcast([tensor], options).wait()

    def _broadcast_bucket(self, metas: list[TensorMeta], used: int, last: bool) -> None:
        header = json.dumps({"last": last, "used": used, "metas": [_meta_to_json(m) for m in metas]}).encode()
        self._broadcast(torch.tensor([len(header)], dtype=torch.int64))
        self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        if used:
            self._broadcast(self.bucket[:used])

    def _receive_bucket(self) -> tuple[list[TensorMeta], bool]:
        size = torch.zeros(1, dtype=torch.int64)
        self._broadcast(size)
        raw = torch.empty(int(size.item()), dtype=torch.uint8)
        self._broadcast(raw)
        header = json.loads(raw.numpy().tobytes())
        if header["used"]:
            self._broadcast(self.bucket[: header["used"]])
        return [_meta_from_json(m) for m in header["metas"]], header["last"]


def _meta_to_json(meta: TensorMeta) -> dict[str, Any]:
    return {
        "name": meta.name,
        "shape": list(meta.shape),
        "dtype": str(meta.dtype).removeprefix("torch."),
        "chunk_offset": meta.chunk_offset,
        "chunk_size": meta.chunk_size,
        "offset": meta.offset,
    }


def _meta_from_json(data: dict[str, Any]) -> TensorMeta:
    return TensorMeta(
        name=data["name"],
        shape=torch.Size(data["shape"]),
        dtype=getattr(torch, data["dtype"]),
        chunk_offset=data["chunk_offset"],
        chunk_size=data["chunk_size"],
        offset=data["offset"],
    )
