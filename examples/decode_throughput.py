"""Decode throughput of every mixer layer: tokens/s of one-token steps from a cache.

    .venv/bin/python examples/decode_throughput.py --threads 1          # CPU, small sizes
    python examples/decode_throughput.py --device cuda --dtype bfloat16 --hidden-size 2048 \
        --batch-sizes 1,64 --csv benchmarks/results/layers_decode.csv   # on a GPU

For each mixer and batch size: prefill a `--prompt`-token prompt, then time `--steps` one-token
calls (eval mode, no_grad: the layers' recurrent decode path), after `--warmup` untimed ones.
Each layer is driven through its own public decode contract, as code written for its peer
would drive it:
  * fla's (GLA, DeltaNet, Gated DeltaNet, KDA, Lightning, HGRN-2, Hedgehog, MoM, log-linear
    Mamba-2 and log-linear Gated DeltaNet):
    `o, _, cache = layer(x, past_key_values=cache, use_cache=True)` with a `layers.Cache`
    (MoM returns a fourth value, its router logits; the log-linear layers cache a tuple of
    level states and offsets);
  * mamba-ssm's (Mamba, Mamba2): `out = layer(x, inference_params=params)` with a
    `layers.InferenceParams`, the caller advancing `params.seqlen_offset` by the tokens fed.
Prints a table and optionally appends rows to a CSV (mixer, batch, hidden, dtype, device,
threads, ms/step, tokens/s, torch version, date).
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

try:  # the MQAR demo's thread picker
    from mqar import auto_threads  # noqa: E402
except ImportError:  # run from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mqar import auto_threads  # noqa: E402


def layer_kwargs(name: str, d: int) -> dict:
    """Published-model shapes scaled to hidden size d (head dims 64-128; at least one head).
    The layers' own defaults are for d = 1024-2048 (see layers.make_mixer)."""
    heads = max(1, d // 128)
    return {
        "gla": dict(num_heads=max(1, d // 256), expand_k=0.5, expand_v=1.0),
        "deltanet": dict(num_heads=heads),
        "gated_deltanet": dict(num_heads=max(1, d // 256), head_dim=128, expand_v=2.0),
        # Kimi Linear: head_dim 128, expand_v 1, a head per 128 channels of width
        "kda": dict(num_heads=heads, head_dim=128, expand_v=1.0),
        "mamba": dict(d_state=16, expand=2),
        "mamba2": dict(d_state=128, headdim=64, expand=2),
        "lightning": dict(num_heads=heads),
        # fla's expand_ratio 128 (num_heads = d // 128), smaller only below d = 128
        "hgrn2": dict(expand_ratio=min(128, d)),
        "hedgehog": dict(num_heads=heads),
        # fla's MoM has head_dim 256 x expand_v 2 x 8 memories at d = 2048: scaled down
        "mom": dict(num_heads=max(1, d // 256), head_dim=128, expand_v=1.0, num_memories=4,
                    topk=2),
        # fla's LogLinearMamba2Config (Mamba-2's: head_dim 64, state 128, expand 2; heads =
        # expand * d / head_dim) and 15 levels (16K tokens)
        "log_linear_mamba2": dict(num_heads=max(1, 2 * d // 64), head_dim=min(64, 2 * d),
                                  state_size=128, expand=2),
        # the authors' log-linear Gated DeltaNet: Gated DeltaNet's shapes plus the levels
        "log_linear_gated_deltanet": dict(num_heads=max(1, d // 256), head_dim=128,
                                          expand_v=2.0),
    }[name]


SUPPORTED = ["gla", "deltanet", "gated_deltanet", "kda", "mamba", "mamba2", "lightning",
             "hgrn2", "hedgehog", "mom", "log_linear_mamba2", "log_linear_gated_deltanet"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Decoder:
    """One layer's decode session through its public contract: `prefill(x)`, then `step(x)`
    per token; both return the layer's output [B, T, hidden]."""

    def __init__(self, layer: torch.nn.Module, batch: int, max_seqlen: int):
        self.layer = layer
        if isinstance(layer, layers.MambaMixer):
            self.params = layers.InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch)
            self.cache = None
        elif isinstance(layer, layers.FlaMixer):
            self.params, self.cache = None, layers.Cache()
        else:
            raise TypeError(f"{type(layer).__name__} has neither fla's nor mamba-ssm's decode "
                            f"contract")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.params is not None:  # mamba-ssm: the caller advances seqlen_offset
            out = self.layer(x, inference_params=self.params)
            self.params.seqlen_offset += x.shape[1]
            return out
        res = self.layer(x, past_key_values=self.cache, use_cache=True)
        self.cache = res[2]  # (o, None, cache) or MoM's (o, None, cache, router_logits)
        return res[0]

    prefill = step = __call__

    def seen(self) -> int:
        if self.params is not None:
            return self.params.seqlen_offset
        return self.cache.get_seq_length(self.layer.layer_idx)


@torch.no_grad()
def measure(name, batch, args, device, dtype):
    torch.manual_seed(0)
    layer = layers.make_mixer(name, args.hidden_size, layer_idx=0,
                              **layer_kwargs(name, args.hidden_size))
    layer = layer.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, args.prompt, args.hidden_size, device=device, dtype=dtype)
    toks = torch.randn(batch, args.warmup + args.steps, 1, args.hidden_size, device=device,
                       dtype=dtype)
    dec = Decoder(layer, batch, args.prompt + args.warmup + args.steps)
    out = dec.prefill(x)
    for i in range(args.warmup):
        out = dec.step(toks[:, i])
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        out = dec.step(toks[:, i])
    sync(device)
    dt = (time.perf_counter() - t0) / max(args.steps, 1)
    if tuple(out.shape) != (batch, 1, args.hidden_size) or not torch.isfinite(out).all():
        raise RuntimeError(f"{name}: decode step gave {tuple(out.shape)} "
                           f"(finite: {bool(torch.isfinite(out).all())})")
    if dec.seen() != args.prompt + args.warmup + args.steps:
        raise RuntimeError(f"{name}: the cache counted {dec.seen()} tokens, fed "
                           f"{args.prompt + args.warmup + args.steps}")
    return dict(mixer=name, batch=batch, hidden=args.hidden_size, dtype=args.dtype,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                threads=torch.get_num_threads(), ms_per_step=dt * 1e3,
                tokens_per_s=batch / dt if dt > 0 else float("inf"), torch=torch.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mixers", default=",".join(SUPPORTED),
                   help=f"comma-separated subset of {SUPPORTED}, or 'all'")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--prompt", type=int, default=16, help="prefill length")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: the physical cores that other processes "
                        "leave free, at least 1)")
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 1")
    if args.prompt < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--prompt and --steps must be >= 1, --warmup >= 0")
    names = (SUPPORTED if args.mixers.strip() == "all" else
             [m.strip() for m in args.mixers.split(",") if m.strip()])
    for n in names:
        if n not in SUPPORTED:
            p.error(f"no decode settings for mixer {n!r} here; choose from {SUPPORTED}")
    try:
        batches = [int(s) for s in args.batch_sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    why = ""
    if not args.threads:
        args.threads, why = auto_threads()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"decode: hidden {args.hidden_size}, prompt {args.prompt}, {args.warmup} warm-up + "
          f"{args.steps} timed steps; {device.type} {args.dtype}, {args.threads} thread(s)"
          f"{why}", flush=True)
    rows = []
    for name in names:
        for b in batches:
            r = measure(name, b, args, device, dtype)
            rows.append(r)
            print(f"{name:>15}  B={b:<4} {r['ms_per_step']:8.3f} ms/step "
                  f"{r['tokens_per_s']:12,.0f} tok/s", flush=True)
    if args.csv and rows:
        new = not os.path.exists(args.csv)
        if not new:
            with open(args.csv, newline="") as f:
                header = next(csv.reader(f), None)
            if header != list(rows[0]):
                raise SystemExit(f"{args.csv} has columns {header}, this script writes "
                                 f"{list(rows[0])}: pass a new file")
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
