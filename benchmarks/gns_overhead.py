"""Benchmark: cost of the gradient noise scale estimator (deepmodels.gns) in a DDP step with gradient accumulation.

    python benchmarks/gns_overhead.py [--world 2] [--accum 4] [--repeat 40] [--models mlp,transformer]

Two gloo processes on the CPU (``--world``), each running M = ``--accum`` micro-batches per step
(``no_sync`` on all but the last), then an SGD update.  "plain" is that DDP step; "gns" is the same
step on an identical copy of the model with a :class:`deepmodels.gns.GradientNoiseScale` attached
(its hook in every backward pass, and ``update()`` with its all-reduce before the optimizer step).
The two are timed alternately, step by step, after a barrier, so a change of machine load hits both;
prints, from process 0, the median time of each and the median of the per-pair ratios gns / plain
(target of issue 15: <= 1.1), and the same ratio of the CPU time of process 0 (all its threads,
gloo's included; no waiting), which a loaded machine disturbs less than the wall-clock time.  Models: an MLP 64-512-512-10 on 32-example micro-batches and a small
transformer encoder (embedding 256 x 128, 2 pre-LayerNorm layers of 4 heads, feed-forward 512,
sequences of 64 tokens, 8 per micro-batch), random inputs (timing only).
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


def _worker(rank, world, names, accum, repeat, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    from torch.nn.parallel import DistributedDataParallel as DDP

    try:
        for name in names:
            make, x, y, loss_fn, b = _setup(name, accum, seed=rank)
            torch.manual_seed(0)
            models = [DDP(make()), DDP(make())]
            opts = [torch.optim.SGD(m.parameters(), lr=1e-3) for m in models]
            gns = GradientNoiseScale(models[1])

            def step(i):
                model, opt = models[i], opts[i]
                for m in range(accum):
                    with model.no_sync() if m < accum - 1 else contextlib.nullcontext():
                        (loss_fn(model(x[m]), y[m]) / accum).backward()
                if i == 1:
                    gns.update(micro_batch_size=b)
                opt.step()
                opt.zero_grad(set_to_none=True)

            times, cpu = ([], []), ([], [])
            for k in range(repeat + 3):  # 3 warm-up pairs
                for i in (0, 1):
                    dist.barrier()
                    t, c = time.perf_counter(), time.process_time()
                    step(i)
                    if k >= 3:
                        times[i].append(time.perf_counter() - t)
                        cpu[i].append(time.process_time() - c)
            gns.remove()
            if rank == 0:
                ratios = [q / p for p, q in zip(*times)]
                cpu_ratios = [q / p for p, q in zip(*cpu)]
                n_params = sum(p.numel() for p in models[0].parameters())
                results.put((name, n_params, statistics.median(times[0]), statistics.median(times[1]),
                             statistics.median(ratios), statistics.median(cpu_ratios)))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--repeat", type=int, default=40)
    p.add_argument("--models", default="mlp,transformer")
    args = p.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    names = args.models.split(",")
    print(f"world {args.world} (gloo, CPU, 1 thread each), accumulation M={args.accum}, {args.repeat} alternated "
          f"step pairs; load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    mp.start_processes(_worker, args=(args.world, names, args.accum, args.repeat, port, results),
                       nprocs=args.world, join=True, start_method="spawn")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print(f"{'model':<12} {'params':>9} {'plain ms':>9} {'gns ms':>9} {'ratio':>6} {'cpu ratio':>9}")
    while not results.empty():
        name, n, t0, t1, r, rc = results.get()
        print(f"{name:<12} {n:>9} {1e3 * t0:>9.2f} {1e3 * t1:>9.2f} {r:>6.3f} {rc:>9.3f}")


if __name__ == "__main__":
    main()
