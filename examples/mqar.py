"""Multi-query associative recall (MQAR, Arora et al. 2023 "Zoology") with every mixer.

Each sequence lists key-value pairs, then asks for some keys again at random later positions;
the model must output each queried key's value. Keys come from the lower half of the vocabulary,
values from the upper half, token 0 fills the gaps. The loss and the accuracy count only the
query positions (predict the value right after seeing the key).

    .venv/bin/python examples/mqar.py                       # the default demo (< 5 min, 2 cores)
    .venv/bin/python examples/mqar.py --mixers all --steps 200   # all twelve (Mamba, MoM slow)
    .venv/bin/python examples/mqar.py --mixers hgrn2,hedgehog,mom --threads 1   # issue 16 rows
    .venv/bin/python examples/mqar.py --mixers gated_deltanet,kda --threads 1   # issue 15 row
    .venv/bin/python examples/mqar.py --threads 1 \
        --mixers log_linear_mamba2,log_linear_gated_deltanet,mamba2,gated_deltanet
    .venv/bin/python examples/mqar.py --mixers kda --kda-gate-init zeros --kda-output-gate off
    .venv/bin/python examples/mqar.py --mixers deltanet,mamba2 --num-kv-pairs 16 --seq-len 128

Prints a progress line every --log-every steps (loss, accuracy on the batch's queries, elapsed
time and ETA), then one row per mixer: parameters, recall accuracy on held-out sequences,
training throughput (tokens/s, forward + backward + optimizer) and wall time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import layers  # noqa: E402

ALL_MIXERS = ["deltanet", "gated_deltanet", "kda", "gla", "mamba", "mamba2", "lightning",
              "hgrn2", "hedgehog", "mom", "log_linear_mamba2", "log_linear_gated_deltanet"]
# the default run (make demo) has one mixer per family, so it finishes in a few minutes on a
# shared 2-core machine: the delta rule (DeltaNet), gated linear attention (GLA) and the
# state-space duality (Mamba-2). --mixers all adds Gated DeltaNet, KDA, Lightning, HGRN-2,
# Hedgehog, Mixture-of-Memories, log-linear Mamba-2 and Gated DeltaNet and Mamba-1 (whose CPU
# selective scan materialises [B, D, L, N]: slower than all the others together; MoM is the
# next slowest, its tokens go to top-k memories).
DEFAULT_MIXERS = ["deltanet", "gla", "mamba2"]
DEFAULT_STEPS = 150


def physical_cores() -> int:
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    seen = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/core_id") as f:
                core = f.read().strip()
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/physical_package_id") as f:
                seen.add((f.read().strip(), core))
        except OSError:
            return max(1, len(list(cpus)))
    return max(1, len(seen))


def auto_threads():
    """(threads, why): the physical cores minus those other processes keep busy (sampled for
    half a second), at least 1. On a shared machine, more threads than free cores makes every
    step wait for the slowest thread: many times slower, not a little."""
    cores = physical_cores()
    try:
        from benchmarks import load
        others = load.others_now(0.5)
    except Exception:  # noqa: BLE001 - no /proc: trust the core count
        return cores, ""
    if others != others:
        return cores, ""
    free = max(1, min(cores, int(cores - others + 0.5)))
    if free < cores:
        return free, (f" (of {cores} cores; other processes keep {others:.1f} busy; "
                      f"--threads overrides)")
    return cores, ""


def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """ETA of the whole demo: the current mixer's step rate for its remaining steps, and the
    mean time per step so far for the mixers still to come."""

    def __init__(self, mixers, steps):
        self.mixers, self.steps = list(mixers), steps
        self.t0 = time.perf_counter()
        self.done_steps = 0

    def eta(self, mixer_idx: int, step: int, mixer_elapsed: float) -> float:
        per_step = mixer_elapsed / max(step, 1)
        left_here = (self.steps - step) * per_step
        overall = (time.perf_counter() - self.t0) / max(self.done_steps, 1)
        left_after = (len(self.mixers) - mixer_idx - 1) * self.steps * overall
        return left_here + left_after


def mqar_batch(batch: int, vocab_size: int, num_kv_pairs: int, seq_len: int,
               generator: torch.Generator):
    """(inputs [batch, seq_len], labels [batch, seq_len]) with labels -100 except at queries."""
    P, ctx = num_kv_pairs, 2 * num_kv_pairs
    half = vocab_size // 2
    if half - 1 < P:
        raise ValueError(f"vocab_size {vocab_size} too small for {P} distinct keys "
                         f"(keys come from 1..{half - 1})")
    slots = (seq_len - ctx) // 2  # query slots: a key, then a gap where the value would go
    if slots < P:
        raise ValueError(f"seq_len {seq_len} too short: need >= {4 * P} for {P} pairs")
    keys = torch.rand(batch, half - 1, generator=generator).argsort(-1)[:, :P] + 1
    values = torch.randint(half, vocab_size, (batch, P), generator=generator)
    inputs = torch.zeros(batch, seq_len, dtype=torch.long)
    labels = torch.full((batch, seq_len), -100, dtype=torch.long)
    inputs[:, 0:ctx:2], inputs[:, 1:ctx:2] = keys, values
    order = torch.rand(batch, P, generator=generator).argsort(-1)       # which pair is asked
    where = torch.rand(batch, slots, generator=generator).argsort(-1)[:, :P]  # and where
    pos = ctx + 2 * where
    inputs.scatter_(1, pos, keys.gather(1, order))
    labels.scatter_(1, pos, values.gather(1, order))
    return inputs, labels


def mixer_kwargs(name: str, d_model: int) -> dict:
    """Small-model settings per mixer (head dims of 16-32 suit d_model 64-128). Gated
    DeltaNet runs without its output gate here: fla's small init of g_proj makes the swish gate
    ~0 at the start, which stalls this short run (26% instead of 99% after 200 steps; DeltaNet
    with use_gate=True behaves the same). MoM (gated-delta memories, same g_proj init) runs
    without it too, as the Gated DeltaNet row, with 4 memories of the same head size, top-2
    routing. KDA has Gated DeltaNet's row's sizes (heads, head dim, expand_v, short convs of
    width 4) and otherwise fla 0.6's layer as it is, init included (softplus(dt_bias)
    log-uniform in [1e-3, 1e-1], A = U(1, 16) per head) and its sigmoid output gate, which has
    no constructor switch: 35.5% after the default 150 steps, 99.8% after 500
    (examples/README.md). The log-linear Mamba-2 and Gated DeltaNet rows have the Mamba-2 and
    Gated DeltaNet rows' sizes and fla's / the authors' default 15 levels (the hierarchy then
    covers far more than the 64 tokens here). HGRN-2's state expansion (expand_ratio) is the
    per-head key size: d_model // heads, as the other mixers'
    heads; Hedgehog keeps its defaults (expand_k = expand_v = 1, normalised feature maps)."""
    heads = max(1, d_model // 32)
    return {
        "gla": dict(num_heads=heads, expand_k=0.5, expand_v=1.0, use_short_conv=True),
        "deltanet": dict(num_heads=heads),
        "gated_deltanet": dict(num_heads=heads, head_dim=d_model // heads, expand_v=1.0,
                               use_gate=False),
        "kda": dict(num_heads=heads, head_dim=d_model // heads, expand_v=1.0),
        "mamba": dict(d_state=16, expand=2),
        "mamba2": dict(d_state=32, headdim=16, expand=2, chunk_size=64),
        "lightning": dict(num_heads=heads),
        "hgrn2": dict(expand_ratio=d_model // heads),
        "hedgehog": dict(num_heads=heads),
        "mom": dict(num_heads=heads, head_dim=d_model // heads, expand_v=1.0, num_memories=4,
                    topk=2, use_output_gate=False),
        # the Mamba-2 row's sizes (head dim 16, state 32, expand 2, chunk 64) in fla's names
        "log_linear_mamba2": dict(num_heads=2 * d_model // 16, head_dim=16, state_size=32,
                                  expand=2, chunk_size=64),
        # the Gated DeltaNet row's sizes, output gate off as there
        "log_linear_gated_deltanet": dict(num_heads=heads, head_dim=d_model // heads,
                                          expand_v=1.0, use_gate=False),
    }[name]


def zero_dt_bias_init(model) -> int:
    """A control for KDA (--kda-gate-init zeros): set every KDA layer's dt_bias to 0, the init
    of fla 0.4's KimiDeltaAttention (and of this layer before it followed fla 0.6). With it
    g = -A softplus(f_proj(x)) is about -0.69 A at the start, A = U(1, 16): exp(g) below 1e-3
    per token at this demo's two heads, so the state forgets each token almost at once. fla 0.6
    (the layer's default) draws dt_bias as Gated DeltaNet does: softplus(dt_bias) log-uniform
    in [1e-3, 1e-1] per (value head, key channel), g between about -1.6 and -1e-3. Returns the
    number of layers changed."""
    n = 0
    for m in model.modules():
        if isinstance(m, layers.KimiDeltaAttention):
            with torch.no_grad():
                m.dt_bias.zero_()
            n += 1
    return n


def kda_output_gate_off(model) -> int:
    """A control for KDA (--kda-output-gate off): run every KDA layer without its output gate,
    as the Gated DeltaNet row runs without its own (use_gate=False). KDA has no constructor
    argument for it (fla's layer has none); the layer's output norm skips the gate when the
    instance's use_gate is False, so g_proj is then unused. Returns the number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, layers.KimiDeltaAttention):
            if not hasattr(m, "use_gate") or not hasattr(m, "g_proj"):
                raise RuntimeError("KimiDeltaAttention no longer has use_gate / g_proj: "
                                   "--kda-output-gate off needs updating")
            m.use_gate = False
            n += 1
    return n


def evaluate(model, data, batch_size):
    correct = total = 0
    model.eval()
    with torch.no_grad():
        inputs, labels = data
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i:i + batch_size], labels[i:i + batch_size]
            logits, _ = model(x)
            m = y != -100
            correct += (logits.argmax(-1)[m] == y[m]).sum().item()
            total += m.sum().item()
    model.train()
    return correct / max(total, 1)


def make_optimizer(model, args):
    """AdamW (no weight decay on biases / norms) with a linear warm-up over the first 10 % of
    args.steps and a cosine decay to 10 % of args.lr; returns (optimizer, scheduler)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr,
                            betas=(0.9, 0.98))
    warmup = max(1, args.steps // 10)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    return opt, sched


def train_one(name: str, args, device, dtype, progress=None, idx=0):
    torch.manual_seed(args.seed)
    model = layers.CausalLM(args.vocab_size, args.d_model, args.layers, mixer=name,
                            mixer_kwargs={**mixer_kwargs(name, args.d_model),
                                          **getattr(args, "overrides", {}).get(name, {})},
                            mlp_ratio=args.mlp_ratio).to(device=device, dtype=dtype)
    if getattr(args, "kda_gate_init", "fla") == "zeros":
        zero_dt_bias_init(model)
    if getattr(args, "kda_output_gate", "on") == "off":
        kda_output_gate_off(model)
    params = sum(p.numel() for p in model.parameters())
    opt, sched = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_gen = torch.Generator().manual_seed(12345)
    eval_data = mqar_batch(args.eval_examples, args.vocab_size, args.num_kv_pairs,
                           args.seq_len, eval_gen)
    eval_data = (eval_data[0].to(device), eval_data[1].to(device))
    tokens, train_time, t_start, loss_val = 0, 0.0, time.perf_counter(), float("nan")
    for step in range(args.steps):
        x, y = mqar_batch(args.batch_size, args.vocab_size, args.num_kv_pairs, args.seq_len,
                          gen)
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        loss_val = loss.item()
        if progress is not None:
            progress.done_steps += 1
        if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            with torch.no_grad():
                m = y != -100
                batch_acc = (logits.argmax(-1)[m] == y[m]).float().mean().item()
            el = time.perf_counter() - t_start
            eta = progress.eta(idx, step + 1, el) if progress is not None else float("nan")
            print(f"  {name:>15} step {step + 1:4d}/{args.steps}  loss {loss_val:.3f}  "
                  f"acc {batch_acc:6.1%} (batch)  {_fmt_s(el)} elapsed, ETA {_fmt_s(eta)}",
                  flush=True)
    acc = evaluate(model, eval_data, args.batch_size)
    return dict(mixer=name, params=params, loss=loss_val, acc=acc,
                tok_s=tokens / max(train_time, 1e-9), wall=time.perf_counter() - t_start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mixers", default=",".join(DEFAULT_MIXERS),
                   help=f"comma-separated subset of {ALL_MIXERS}, or 'all'")
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--num-kv-pairs", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: the physical cores that other processes "
                        "leave free, at least 1)")
    p.add_argument("--mixer-kwargs", default="",
                   help='JSON {mixer: {arg: value}} over the built-in small-model settings, '
                        'e.g. \'{"mom": {"num_memories": 1, "topk": 1}}\'')
    p.add_argument("--kda-gate-init", default="fla", choices=["fla", "zeros"],
                   help="KDA's dt_bias init: the layer's (fla 0.6's: softplus(dt_bias) "
                        "log-uniform in [1e-3, 1e-1]) or zeros (fla 0.4's: exp(g) < 1e-3 per "
                        "token at the start; a control, see zero_dt_bias_init)")
    p.add_argument("--kda-output-gate", default="on", choices=["on", "off"],
                   help="off: KDA without its sigmoid output gate (as the Gated DeltaNet row "
                        "runs without its own; a control, see kda_output_gate_off)")
    p.add_argument("--log-every", type=int, default=25,
                   help="a progress line every N steps (0: none)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 1")
    why = ""
    if not args.threads:
        args.threads, why = auto_threads()
    try:
        args.overrides = json.loads(args.mixer_kwargs) if args.mixer_kwargs else {}
    except json.JSONDecodeError as e:
        p.error(f"--mixer-kwargs is not JSON: {e}")
    if not isinstance(args.overrides, dict) or \
            not all(isinstance(v, dict) for v in args.overrides.values()):
        p.error("--mixer-kwargs must be a JSON object {mixer: {arg: value}}")
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    names = (ALL_MIXERS if args.mixers.strip() == "all" else
             [m.strip() for m in args.mixers.split(",") if m.strip()])
    for n in names:  # the mixers with small-model settings here (every one in layers.MIXERS)
        if n not in ALL_MIXERS:
            p.error(f"unknown mixer {n!r}; choose from {ALL_MIXERS}")
    for n in args.overrides:
        if n not in names:
            p.error(f"--mixer-kwargs names {n!r}, which is not among the mixers run")
    print(f"MQAR: vocab {args.vocab_size}, {args.num_kv_pairs} kv pairs, seq_len "
          f"{args.seq_len}; {args.layers} layers, d_model {args.d_model}, {args.steps} steps "
          f"x batch {args.batch_size}, lr {args.lr}; {device.type} {args.dtype}, "
          f"{args.threads} thread(s){why}; mixers: {', '.join(names)}", flush=True)
    for n, kw in args.overrides.items():
        print(f"  {n}: {mixer_kwargs(n, args.d_model) | kw}", flush=True)
    if (args.kda_gate_init != "fla" or args.kda_output_gate != "on") and "kda" not in names:
        p.error("--kda-gate-init / --kda-output-gate apply to the kda mixer, which is not among "
                "the mixers run")
    if args.kda_gate_init != "fla":
        print("  kda: dt_bias = 0, fla 0.4's init (--kda-gate-init zeros)", flush=True)
    if args.kda_output_gate != "on":
        print("  kda: no output gate (--kda-output-gate off)", flush=True)
    left_out = [m for m in ALL_MIXERS if m not in names]
    if left_out and args.mixers == ",".join(DEFAULT_MIXERS):
        print(f"  (the default run has one mixer per family; --mixers all adds "
              f"{', '.join(left_out)})", flush=True)
    rows = []
    t_all = time.perf_counter()
    progress = Progress(names, args.steps)
    for i, n in enumerate(names):
        r = train_one(n, args, device, dtype, progress, i)
        rows.append(r)
        print(f"  {n:>15}: accuracy {r['acc']:6.1%}  ({r['tok_s']:,.0f} tok/s train, "
              f"{r['wall']:.0f} s)", flush=True)
    print()
    w = max([15] + [len(r["mixer"]) for r in rows])  # the log-linear names are longer
    print(f"| {'mixer':<{w}} | {'params':>8} | {'final loss':>10} | {'recall acc':>10} | "
          f"{'train tok/s':>11} | {'time (s)':>8} |")
    print(f"|{'-' * (w + 2)}|{'-' * 9}:|{'-' * 11}:|{'-' * 11}:|{'-' * 12}:|{'-' * 9}:|")
    for r in rows:
        print(f"| {r['mixer']:<{w}} | {r['params']:>8,} | {r['loss']:>10.3f} | "
              f"{r['acc']:>10.1%} | {r['tok_s']:>11,.0f} | {r['wall']:>8.1f} |")
    print(f"\ntotal {_fmt_s(time.perf_counter() - t_all)}; chance is "
          f"1/{args.vocab_size - args.vocab_size // 2} ({1 / (args.vocab_size - args.vocab_size // 2):.1%})",
          flush=True)
    return rows


if __name__ == "__main__":
    main()
