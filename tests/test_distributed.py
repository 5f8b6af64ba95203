"""deepmodels.gns under torch.distributed: DDP on 2 CPU processes (gloo) with gradient accumulation
over M = 2 micro-batches gives the same estimates, step after step, as one process that runs the
same 4 micro-batches in a row; and processes that ran different numbers of micro-batches are
refused on every process (no hang)."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from deepmodels.gns import GradientNoiseScale

WORLD, M, B, STEPS, LR = 2, 2, 4, 3, 0.2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _data():
    """Per step, WORLD * M micro-batches of B examples: process r takes micro-batches r*M .. r*M+M-1."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, WORLD * M, B, 6, generator=g), torch.randint(0, 3, (STEPS, WORLD * M, B), generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        x, y = _data()
        rows = []
        with GradientNoiseScale(ddp) as gns:
            for step in range(STEPS):
                for m in range(M):
                    j = rank * M + m
                    with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
                        (F.cross_entropy(ddp(x[step, j]), y[step, j]) / M).backward()
                rows.append(gns.update(micro_batch_size=B).as_dict())
                opt.step()
                opt.zero_grad()
            # different numbers of micro-batches: rank 0 one backward, rank 1 two (one all-reduce each)
            for m in range(rank + 1):
                with ddp.no_sync() if m < rank else contextlib.nullcontext():
                    F.cross_entropy(ddp(x[0, m]), y[0, m]).backward()
            try:
                gns.update(micro_batch_size=B)
                refused = ""
            except ValueError as err:
                refused = str(err)
        torch.save({"rows": rows, "refused": refused,
                    "params": [p.detach().clone() for p in ddp.module.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = _data()
    n = WORLD * M
    rows = []
    with GradientNoiseScale(model) as gns:
        for step in range(STEPS):
            for j in range(n):
                (F.cross_entropy(model(x[step, j]), y[step, j]) / n).backward()
            rows.append(gns.update(micro_batch_size=B).as_dict())
            opt.step()
            opt.zero_grad()
    return rows, list(model.parameters())


def test_ddp_equals_single_process(tmp_path, monkeypatch):
    ref_rows, ref_params = _single_process()  # first: forked children inherit what its first optimizer step imports
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    # fork where the platform has it: the children inherit the imported modules (a spawned child
    # imports torch and deepmodels again, 10+ s on a loaded machine); spawn elsewhere
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True, start_method=method)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert got[0]["rows"] == got[1]["rows"]  # every process reports the same numbers
    for step, (row, ref) in enumerate(zip(got[0]["rows"], ref_rows)):
        assert row["batch_size"] == WORLD * M * B and row["n_micro_batches"] == WORLD * M
        for k, v in ref.items():
            # float32 gradients summed in another order; the estimates are differences of O(1) norms
            assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * abs(ref["grad_norm_sq_micro"])), (step, k)
    for p, q in zip(got[0]["params"], ref_params):
        torch.testing.assert_close(p, q.detach())
    for r in range(WORLD):
        assert "same number of backward passes on every process" in got[r]["refused"]
