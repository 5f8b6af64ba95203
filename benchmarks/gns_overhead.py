"""Benchmark: cost of the gradient noise scale estimator (deepmodels.gns) in a DDP step with gradient accumulation.

    python benchmarks/gns_overhead.py [--world 2] [--accum 4] [--repeat 100] [--models mlp,transformer]
                                      [--sync-every 1,10]

Two gloo processes on the CPU (``--world``), each running M = ``--accum`` micro-batches per step
(``no_sync`` on all but the last), then an SGD update.  "plain" is that DDP step; "gns" is the same
step on an identical copy of the model with a :class:`deepmodels.gns.GradientNoiseScale` attached
(its hook in every backward pass, and ``update()`` before the optimizer step), one per entry N of
``--sync-every``: the processes are joined (an all-reduce of a few numbers) every N-th step, the
others deferred (``update(..., sync=False)``, as ``deepmodels.callbacks`` does between rows of
``every=N``); N = 1 joins every step.  The variants are timed in turn, step by step, after a
barrier, so a change of machine load hits all; prints, from process 0, the median time of each and
the ratio gns / plain per step over a cycle of N steps (the mean over the N positions in the cycle
of the median per-step ratio there; for N = 1 the median per-step ratio; target of issue 15:
<= 1.1; use ``--repeat`` of 10 N or more), and the same ratio of the CPU time of process 0 (all
its threads, gloo's included; no waiting), which a loaded machine disturbs less than the wall-clock
time.  Models: an MLP 64-512-512-10 on 32-example micro-batches and a small transformer encoder
(embedding 256 x 128, 2 pre-LayerNorm layers of 4 heads, feed-forward 512, sequences of 64 tokens,
8 per micro-batch), random inputs (timing only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, ".")
from deepmodels.gns import GradientNoiseScale  # noqa: E402


class _Transformer(nn.Module):
    def __init__(self, vocab=256, d=128, heads=4, layers=2, ff=512, ctx=64):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.zeros(ctx, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.blocks(self.emb(x) + self.pos[: x.shape[1]], mask=mask, is_causal=True))


def _setup(name, accum, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        make = lambda: nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x, y = torch.randn(accum, 32, 64, generator=g), torch.randint(0, 10, (accum, 32), generator=g)
        loss = lambda out, t: F.cross_entropy(out, t)
        b = 32
    else:
        make = _Transformer
        x = torch.randint(0, 256, (accum, 8, 64), generator=g)
        y = torch.randint(0, 256, (accum, 8, 64), generator=g)
        loss = lambda out, t: F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))
        b = 8
    return make, x, y, loss, b


def _cycle_ratio(plain, gns, n, first=3):
    """The cost of ``gns`` relative to ``plain`` per step over a cycle of ``n`` steps (one joined,
    the next with the all-reduce launched in its backward pass wasted, the others deferred): the
    mean over the positions k mod n of the median ratio of the steps at that position (step k is
    the ``k - first``-th entry); for n = 1 the median of the per-step ratios."""
    by_position = {}
    for k, (p, q) in enumerate(zip(plain, gns), start=first):
        by_position.setdefault(k % n, []).append(q / p)
    return statistics.fmean(statistics.median(v) for v in by_position.values())


def _worker(rank, world, names, accum, repeat, sync_every, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        for name in names:
            make, x, y, loss_fn, b = _setup(name, accum, seed=rank)
            torch.manual_seed(0)
            models = [DDP(make()) for _ in range(1 + len(sync_every))]
            opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in models]
            gns = [None] + [GradientNoiseScale(m) for m in models[1:]]

            def step(i, k):
                model, opt = models[i], opts[i]
                for m in range(accum):
                    with model.no_sync() if m < accum - 1 else contextlib.nullcontext():
                        (loss_fn(model(x[m]), y[m]) / accum).backward()
                if i > 0:
                    gns[i].update(micro_batch_size=b, sync=k % sync_every[i - 1] == 0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            times, cpu = [[] for _ in models], [[] for _ in models]
            for k in range(repeat + 3):  # 3 warm-up rounds
                for i in range(len(models)):
                    dist.barrier()
                    t, c = time.perf_counter(), time.process_time()
                    step(i, k)
                    if k >= 3:
                        times[i].append(time.perf_counter() - t)
                        cpu[i].append(time.process_time() - c)
            for est in gns[1:]:
                est.remove()
            if rank == 0:
                n_params = sum(p.numel() for p in models[0].parameters())
                for i, n in enumerate(sync_every, start=1):
                    results.put((name, n, n_params, statistics.median(times[0]), statistics.median(times[i]),
                                 _cycle_ratio(times[0], times[i], n), _cycle_ratio(cpu[0], cpu[i], n)))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--models", default="mlp,transformer")
    p.add_argument("--sync-every", default="1,10", help="comma-separated N: join the processes every N-th step")
    args = p.parse_args(argv)
    sync_every = [int(v) for v in args.sync_every.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    names = args.models.split(",")
    print(f"world {args.world} (gloo, CPU, 1 thread each), accumulation M={args.accum}, {args.repeat} rounds "
          f"(the variants in turn), sync every {sync_every} steps; load average before: "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    mp.start_processes(_worker, args=(args.world, names, args.accum, args.repeat, sync_every, port, results),
                       nprocs=args.world, join=True, start_method="spawn")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"{'model':<12} {'sync every':>10} {'params':>9} {'plain ms':>9} {'gns ms':>9} {'ratio':>6} "
          f"{'cpu ratio':>9}")
    while not results.empty():
        name, every, n, t0, t1, r, rc = results.get()
        print(f"{name:<12} {every:>10} {n:>9} {1e3 * t0:>9.2f} {1e3 * t1:>9.2f} {r:>6.3f} {rc:>9.3f}")


if __name__ == "__main__":
    main()
