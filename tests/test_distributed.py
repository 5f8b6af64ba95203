"""deepmodels.gns under torch.distributed: DDP on 2 CPU processes (gloo) with gradient accumulation
over M = 2 micro-batches gives the same estimates, step after step, as one process that runs the
same 4 micro-batches in a row (with DDP's gradients as bucket views too, and given the bare module
instead of the wrapper); processes that ran different numbers of micro-batches are
refused on every process (no hang); and a step that one process skips (GradientNoiseScale.skip) while
the other updates completes on both."""

from __future__ import annotations

import contextlib
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from deepmodels.gns import GradientNoiseScale
from processes import free_port, run_processes

WORLD, M, B, STEPS, LR = 2, 2, 4, 3, 0.2


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _data():
    """Per step, WORLD * M micro-batches of B examples: process r takes micro-batches r*M .. r*M+M-1."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, WORLD * M, B, 6, generator=g), torch.randint(0, 3, (STEPS, WORLD * M, B), generator=g)


def _sgd_step(model):
    """Plain SGD by hand (torch.optim's first step imports torch._dynamo: seconds in every process)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-LR)
    model.zero_grad()


def _worker(rank, out_dir):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        x, y = _data()
        out = {}
        for view in (False, True):  # DDP's default, and .grad as views into its all-reduce buckets
            ddp = DDP(_model(), gradient_as_bucket_view=view)
            rows, rows_bare = [], []
            # the DDP wrapper (all-reduce started in DDP's synchronizing backward) and the bare module
            # (the default process group, all-reduce in update) on the same run
            with GradientNoiseScale(ddp) as gns, GradientNoiseScale(ddp.module) as gns_bare:
                for step in range(STEPS):
                    for m in range(M):
                        j = rank * M + m
                        with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
                            (F.cross_entropy(ddp(x[step, j]), y[step, j]) / M).backward()
                    rows.append(gns.update(micro_batch_size=B).as_dict())
                    rows_bare.append(gns_bare.update(micro_batch_size=B).as_dict())
                    _sgd_step(ddp.module)
            out[view] = {"rows": rows, "rows_bare": rows_bare,
                         "params": [p.detach().clone() for p in ddp.module.parameters()]}
        # different numbers of micro-batches: rank 0 one backward, rank 1 two (one all-reduce each)
        with GradientNoiseScale(ddp) as gns:
            for m in range(rank + 1):
                with ddp.no_sync() if m < rank else contextlib.nullcontext():
                    F.cross_entropy(ddp(x[0, m]), y[0, m]).backward()
            try:
                gns.update(micro_batch_size=B)
                out["refused"] = ""
            except ValueError as err:
                out["refused"] = str(err)
        # skip() on process 0 while process 1 updates (the wrapper's all-reduce started in the backward
        # pass, the bare module's in update/skip): it joins, so nobody waits; then both update
        ddp.zero_grad()
        with GradientNoiseScale(ddp) as gns, GradientNoiseScale(ddp.module) as gns_bare:
            one_sided = []
            for step in range(2):
                for m in range(M):
                    j = rank * M + m
                    with ddp.no_sync() if m < M - 1 else contextlib.nullcontext():
                        (F.cross_entropy(ddp(x[step, j]), y[step, j]) / M).backward()
                for est in (gns, gns_bare):
                    if step == 0 and rank == 0:
                        est.skip()
                    else:
                        one_sided.append(est.update(micro_batch_size=B).as_dict())
                ddp.zero_grad()
            out["one_sided"] = one_sided
            out["ema_steps"] = (gns.ema.t, gns_bare.ema.t)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process():
    model = _model()
    x, y = _data()
    n = WORLD * M
    rows = []
    with GradientNoiseScale(model) as gns:
        for step in range(STEPS):
            for j in range(n):
                (F.cross_entropy(model(x[step, j]), y[step, j]) / n).backward()
            rows.append(gns.update(micro_batch_size=B).as_dict())
            _sgd_step(model)
    return rows, list(model.parameters())


def test_ddp_equals_single_process(tmp_path, monkeypatch):
    ref_rows, ref_params = _single_process()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    run_processes(_worker, (str(tmp_path),), WORLD)  # spawned, with a deadline (tests/processes.py)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for view in (False, True):
        runs = [g[view] for g in got]
        assert runs[0]["rows"] == runs[1]["rows"]  # every process reports the same numbers
        for run in runs:
            for row, bare in zip(run["rows"], run["rows_bare"]):
                assert row == pytest.approx(bare, rel=1e-12)
        for step, (row, ref) in enumerate(zip(runs[0]["rows"], ref_rows)):
            assert row["batch_size"] == WORLD * M * B and row["n_micro_batches"] == WORLD * M
            for k, v in ref.items():
                # float32 gradients summed in another order; the estimates are differences of O(1) norms
                assert row[k] == pytest.approx(v, rel=1e-4, abs=1e-6 * abs(ref["grad_norm_sq_micro"])), (view, step, k)
        for p, q in zip(runs[0]["params"], ref_params):
            torch.testing.assert_close(p, q.detach())
    for r in range(WORLD):
        assert "same number of backward passes on every process" in got[r]["refused"]
    # one-sided skip: process 0 left step 0 out (its EMA has one step), process 1 did not; step 1's
    # own estimates agree on both processes and between the wrapper and the bare module
    assert got[0]["ema_steps"] == (1, 1) and got[1]["ema_steps"] == (2, 2)
    last = [got[0]["one_sided"][-2:], got[1]["one_sided"][-2:]]
    for k in ("grad_norm_sq_micro", "grad_norm_sq_step", "trace_cov", "noise_scale_unbiased"):
        values = [row[k] for rows in last for row in rows]
        assert values == pytest.approx([values[0]] * 4, rel=1e-6), k
    assert all(row["n_micro_batches"] == WORLD * M for rows in last for row in rows)
