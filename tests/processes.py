"""Start the processes of a DDP test: spawned (a forked child inherits the parent's OpenMP thread
pool and can hang in its first parallel region: it did on a fresh CI run with the default thread
count), and never waited for forever."""

from __future__ import annotations

import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``MASTER_PORT``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(fn, args, nprocs: int, *, timeout_s: float = 300.0) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes; fail the test (killing them) if they have
    not all finished within ``timeout_s``, re-raise a child's exception."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=2.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} DDP processes did not finish within {timeout_s:g} s (killed).")
