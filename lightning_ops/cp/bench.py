"""Context-parallel scaling: time and bytes communicated per rank vs sequence length.

    python -m lightning_ops.cp.bench --world 2 --backend gloo              # CPU ranks
    torchrun --nproc-per-node 8 -m lightning_ops.cp.bench --backend nccl   # one rank per GPU

Each rank holds T_local tokens of one dense sequence batch; per T_local, an op runs forward and
backward through lightning_ops.cp (one all-gather forward, one reduce back), timed as the median
of --reps calls; bytes are the exchange's own count (ctx.bytes_received: the all-gather, then the
gradient reduce). Without torchrun, --world gloo ranks are spawned on this machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _case(op, B, T, H, K, V, device, dtype):
    q = torch.randn(B, T, H, K, device=device, dtype=dtype, requires_grad=True)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, device=device, dtype=dtype), dim=-1)
    k.requires_grad_(True)
    v = torch.randn(B, T, H, V, device=device, dtype=dtype, requires_grad=True)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device, dtype=dtype))
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    import lightning_ops.cp as cp
    if op == "gla":
        gk = g[..., None].expand(B, T, H, K).contiguous()
        return lambda ctx: cp.chunk_gla(q, k, v, gk, cp_context=ctx)[0]
    if op == "gated_delta":
        return lambda ctx: cp.chunk_gated_delta_rule(q, k, v, g, beta, cp_context=ctx)[0]
    raise ValueError(op)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _bench(rank: int, world: int, args) -> None:
    import lightning_ops.cp as cp
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if args.backend == "nccl"
                          else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    if rank == 0:
        print(f"# {args.op}  world={world} backend={args.backend} device={device.type} "
              f"B={args.batch} H={args.heads} K={args.dim} V={args.dim}")
        print(f"{'T_local':>8} {'T_total':>8} {'ms fwd+bwd':>11} {'bytes/rank fwd':>15} "
              f"{'bytes/rank bwd':>15}")
    for T in args.lengths:
        torch.manual_seed(rank)
        f = _case(args.op, args.batch, T, args.heads, args.dim, args.dim, device, torch.float32)
        ctx = cp.build_cp_context(None)
        times = []
        for i in range(args.reps + 1):
            ctx.reset_stats()
            dist.barrier()
            _sync(device)
            t0 = time.perf_counter()
            o = f(ctx)
            fwd = ctx.bytes_received
            o.sum().backward()
            _sync(device)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
        ms = torch.tensor(statistics.median(times) * 1e3, device=device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"{T:>8} {T * world:>8} {ms.item():>11.2f} {fwd:>15} "
                  f"{ctx.bytes_received - fwd:>15}", flush=True)


def _spawned(rank, world, port, args):
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        _bench(rank, world, args)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="gla", choices=["gla", "gated_delta"])
    p.add_argument("--world", type=int, default=2, help="ranks to spawn (without torchrun)")
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096],
                   help="tokens per rank")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64, help="K = V")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    args = p.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group(args.backend)
        try:
            _bench(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    main()
