"""Decode throughput of every mixer layer: tokens/s of one-token steps from a cache.

    .venv/bin/python examples/decode_throughput.py                      # CPU, small sizes
    python examples/decode_throughput.py --device cuda --dtype bfloat16 --hidden-size 2048 \
        --batch-sizes 1,64 --csv benchmarks/results/layers_decode.csv   # on a GPU

For each mixer and batch size: prefill a short prompt with use_cache=True, then time `--steps`
single-token forward calls (eval mode, no_grad; the recurrent decode kernels), after warm-up.
Prints a table and optionally appends rows to a CSV (mixer, batch, hidden, dtype, device,
ms/step, tokens/s, torch version, date).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import layers  # noqa: E402


def layer_kwargs(name: str, d: int) -> dict:
    """Published-model shapes scaled to hidden size d (head dims 64-128)."""
    heads = max(1, d // 128)
    return {
        "gla": dict(num_heads=max(1, d // 256), expand_k=0.5, expand_v=1.0),
        "deltanet": dict(num_heads=heads),
        "gated_deltanet": dict(num_heads=max(1, d // 256), head_dim=128, expand_v=2.0),
        "mamba": dict(d_state=16, expand=2),
        "mamba2": dict(d_state=128, headdim=64, expand=2),
        "lightning": dict(num_heads=heads),
    }[name]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def measure(name, batch, args, device, dtype):
    torch.manual_seed(0)
    layer = layers.make_mixer(name, args.hidden_size, **layer_kwargs(name, args.hidden_size))
    layer = layer.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, args.prompt, args.hidden_size, device=device, dtype=dtype)
    tok = torch.randn(batch, 1, args.hidden_size, device=device, dtype=dtype)
    _, cache = layer(x, use_cache=True)
    for _ in range(args.warmup):
        _, cache = layer(tok, cache=cache)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        _, cache = layer(tok, cache=cache)
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    return dict(mixer=name, batch=batch, hidden=args.hidden_size, dtype=args.dtype,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                ms_per_step=dt * 1e3, tokens_per_s=batch / dt, torch=torch.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mixers", default=",".join(layers.MIXERS))
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--prompt", type=int, default=16, help="prefill length")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = []
    for name in [m.strip() for m in args.mixers.split(",") if m.strip()]:
        for b in [int(s) for s in args.batch_sizes.split(",")]:
            r = measure(name, b, args, device, dtype)
            rows.append(r)
            print(f"{name:>15}  B={b:<4} {r['ms_per_step']:8.3f} ms/step "
                  f"{r['tokens_per_s']:12,.0f} tok/s", flush=True)
    if args.csv:
        new = not os.path.exists(args.csv)
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
