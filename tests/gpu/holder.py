"""A process that holds GPU memory until it is ended, as a rollout engine's worker does; with ``--child``, it also
starts a child the way vLLM's ``mp`` executor starts its workers (multiprocessing, spawn), which holds memory too.

    python holder.py MB [--child]

Prints ``holding <role> <pid>`` once its memory is allocated, then waits (the parent on stdin, the child forever).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys


def hold(megabytes: int, role: str) -> object:
    import torch

    block = torch.empty(megabytes * 2**20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print(f"holding {role} {os.getpid()}", flush=True)
    return block


def child(megabytes: int) -> None:
    block = hold(megabytes, "child")  # noqa: F841 - held until the process ends
    signal.pause()


if __name__ == "__main__":
    size = int(sys.argv[1])
    if "--child" in sys.argv:
        worker = multiprocessing.get_context("spawn").Process(target=child, args=(size,))
        worker.start()
    block = hold(size, "parent")
    sys.stdin.read()
