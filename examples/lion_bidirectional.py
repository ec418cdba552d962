"""Masked-value recovery, a bidirectional task: LION (LIT / D / S) vs softmax attention.

Each sequence lists P distinct keys twice, as (key, value) pairs in random order; in one of the
two occurrences of every key (chosen at random) the value is replaced by a [MASK] token, and the
model must output the key's value at that [MASK]. Half of the time the unmasked occurrence comes
AFTER the mask, so a causal model can answer at most about half of the masks (plus chance on the
rest); a bidirectional one can answer all of them. The evaluation reports both halves:
"look-back" (the value was seen earlier) and "look-ahead" (it comes later).

    .venv/bin/python examples/lion_bidirectional.py                # default demo (~2 min, 1 core)
    .venv/bin/python examples/lion_bidirectional.py --models lion_s,sdpa --steps 400
    .venv/bin/python examples/lion_bidirectional.py --models all   # adds gla and deltanet (causal)

Models (same tiny encoder: token + previous-token embedding, 2 x (RMSNorm, mixer, RMSNorm,
SwiGLU MLP), head; no positional encoding, the previous-token embedding binds a value to its key):
  lion_lit, lion_d, lion_s   layers.LION (mask_type lit / decay / selective) over lightning_ops.lion_attn
  sdpa                       non-causal softmax attention (torch scaled_dot_product_attention)
  sdpa_causal                the same with is_causal=True: the causal control
  gla, deltanet              causal linear-attention mixers of this library (--models all)

Prints a progress line every --log-every steps (loss, batch accuracy, elapsed, ETA), then one
table row per model: parameters, final loss, held-out accuracy (all / look-back / look-ahead),
training throughput and wall time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import layers  # noqa: E402
from layers.lm import GatedMLP  # noqa: E402

try:  # the thread picker, ETA formatting and optimizer of the MQAR demo
    from mqar import _fmt_s, auto_threads, make_optimizer  # noqa: E402
except ImportError:  # run from elsewhere
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mqar import _fmt_s, auto_threads, make_optimizer  # noqa: E402

ALL_MODELS = ["lion_lit", "lion_d", "lion_s", "sdpa", "sdpa_causal", "gla", "deltanet"]
DEFAULT_MODELS = ["lion_lit", "lion_d", "lion_s", "sdpa", "sdpa_causal"]
PAD, MASK = 0, 1  # PAD: the "previous token" of position 0


def recovery_batch(batch: int, num_keys: int, num_values: int, num_pairs: int,
                   generator: torch.Generator):
    """(inputs [batch, 4P], labels [batch, 4P] (-100 except at masks), ahead [batch, 4P] bool
    (mask whose unmasked twin comes later)). Keys are tokens 2 .. 2+num_keys-1, values the
    next num_values tokens."""
    P = num_pairs
    if P > num_keys:
        raise ValueError(f"num_pairs {P} > num_keys {num_keys}: keys must be distinct")
    keys = torch.rand(batch, num_keys, generator=generator).argsort(-1)[:, :P] + 2
    values = torch.randint(0, num_values, (batch, P), generator=generator) + 2 + num_keys
    slots = torch.rand(batch, 2 * P, generator=generator).argsort(-1)  # slot -> occurrence
    pair = slots % P                      # which key sits in each of the 2P slots
    first_masked = torch.rand(batch, P, generator=generator) < 0.5
    occ = slots // P                      # 0 / 1: which of the two occurrences
    masked = (occ == 0) == first_masked.gather(1, pair)  # exactly one occurrence per key
    k = keys.gather(1, pair)
    v = values.gather(1, pair)
    inputs = torch.empty(batch, 4 * P, dtype=torch.long)
    inputs[:, 0::2] = k
    inputs[:, 1::2] = torch.where(masked, torch.full_like(v, MASK), v)
    labels = torch.full_like(inputs, -100)
    labels[:, 1::2] = torch.where(masked, v, torch.full_like(v, -100))
    # look-ahead: the unmasked twin's slot is after the masked one's
    slot_idx = torch.arange(2 * P).expand(batch, -1)
    pos_of = torch.zeros(batch, P, 2, dtype=torch.long)
    pos_of[torch.arange(batch)[:, None], pair, masked.long()] = slot_idx
    ahead_slot = masked & (pos_of[..., 0].gather(1, pair) > slot_idx)
    ahead = torch.zeros_like(inputs, dtype=torch.bool)
    ahead[:, 1::2] = ahead_slot
    return inputs, labels, ahead


class SoftmaxAttention(nn.Module):
    """Multi-head softmax attention with torch SDPA (no positional encoding), causal or not."""

    def __init__(self, hidden_size: int, num_heads: int, causal: bool):
        super().__init__()
        self.h, self.causal = num_heads, causal
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return (self.proj(o.transpose(1, 2).reshape(B, T, C)),)


def make_mixer(name: str, d: int, heads: int) -> nn.Module:
    if name.startswith("lion_"):
        mask = {"lion_lit": "lit", "lion_d": "decay", "lion_s": "selective"}[name]
        return layers.LION(hidden_size=d, num_heads=heads, mask_type=mask)
    if name in ("sdpa", "sdpa_causal"):
        return SoftmaxAttention(d, heads, causal=name == "sdpa_causal")
    if name == "gla":
        return layers.GatedLinearAttention(hidden_size=d, num_heads=heads, expand_k=0.5,
                                           expand_v=1.0, use_short_conv=True, layer_idx=0)
    if name == "deltanet":
        return layers.DeltaNet(hidden_size=d, num_heads=heads, layer_idx=0)
    raise ValueError(f"unknown model {name!r}; choose from {ALL_MODELS}")


class Encoder(nn.Module):
    """emb(x_t) + emb_prev(x_{t-1}) -> n x (x + mixer(norm x), x + mlp(norm x)) -> norm -> head."""

    def __init__(self, name, vocab, d, n_layers, heads, mlp_ratio):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.emb_prev = nn.Embedding(vocab, d)
        self.mixers = nn.ModuleList(make_mixer(name, d, heads) for _ in range(n_layers))
        self.norms1 = nn.ModuleList(layers.RMSNorm(d) for _ in range(n_layers))
        self.norms2 = nn.ModuleList(layers.RMSNorm(d) for _ in range(n_layers))
        self.mlps = nn.ModuleList(GatedMLP(d, int(mlp_ratio * d)) for _ in range(n_layers))
        self.norm = layers.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.normal_(self.emb_prev.weight, std=0.02)

    def forward(self, x):
        prev = F.pad(x[:, :-1], (1, 0), value=PAD)
        h = self.emb(x) + self.emb_prev(prev)
        for mix, n1, n2, mlp in zip(self.mixers, self.norms1, self.norms2, self.mlps):
            h = h + mix(n1(h))[0]
            h = h + mlp(n2(h))
        return self.head(self.norm(h))


def evaluate(model, data, batch_size):
    inputs, labels, ahead = data
    hit = {"all": [0, 0], "back": [0, 0], "ahead": [0, 0]}
    model.eval()
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch_size):
            x, y, a = (t[i:i + batch_size] for t in (inputs, labels, ahead))
            ok = model(x).argmax(-1) == y
            m = y != -100
            for key, sel in (("all", m), ("back", m & ~a), ("ahead", m & a)):
                hit[key][0] += (ok & sel).sum().item()
                hit[key][1] += sel.sum().item()
    model.train()
    return {k: c / max(n, 1) for k, (c, n) in hit.items()}


def train_one(name, args, t_all, idx, n_models):
    torch.manual_seed(args.seed)
    vocab = 2 + args.num_keys + args.num_values
    model = Encoder(name, vocab, args.d_model, args.layers, args.heads, args.mlp_ratio)
    params = sum(p.numel() for p in model.parameters())
    opt, sched = make_optimizer(model, args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    eval_data = recovery_batch(args.eval_examples, args.num_keys, args.num_values,
                               args.num_pairs, torch.Generator().manual_seed(12345))
    tokens, train_time, t_start, loss_val = 0, 0.0, time.perf_counter(), float("nan")
    for step in range(args.steps):
        x, y, _ = recovery_batch(args.batch_size, args.num_keys, args.num_values,
                                 args.num_pairs, gen)
        t0 = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_time += time.perf_counter() - t0
        tokens += x.numel()
        loss_val = loss.item()
        if args.log_every and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            with torch.no_grad():
                m = y != -100
                acc = (logits.argmax(-1)[m] == y[m]).float().mean().item()
            el = time.perf_counter() - t_start
            done = idx * args.steps + step + 1
            eta = (time.perf_counter() - t_all) / done * (n_models * args.steps - done)
            print(f"  {name:>11} step {step + 1:4d}/{args.steps}  loss {loss_val:.3f}  "
                  f"acc {acc:6.1%} (batch)  {_fmt_s(el)} elapsed, ETA {_fmt_s(eta)}",
                  flush=True)
    acc = evaluate(model, eval_data, 256)
    return dict(model=name, params=params, loss=loss_val, acc=acc,
                tok_s=tokens / max(train_time, 1e-9), wall=time.perf_counter() - t_start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated subset of {ALL_MODELS}, or 'all'")
    p.add_argument("--num-keys", type=int, default=32)
    p.add_argument("--num-values", type=int, default=32)
    p.add_argument("--num-pairs", type=int, default=8, help="keys per sequence (length 4P)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-examples", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: the physical cores that other processes "
                        "leave free, at least 1)")
    p.add_argument("--log-every", type=int, default=50, help="progress line every N steps")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error("--threads must be >= 1")
    why = ""
    if not args.threads:
        args.threads, why = auto_threads()
    torch.set_num_threads(args.threads)
    names = (ALL_MODELS if args.models.strip() == "all" else
             [m.strip() for m in args.models.split(",") if m.strip()])
    for n in names:
        if n not in ALL_MODELS:
            p.error(f"unknown model {n!r}; choose from {ALL_MODELS}")
    print(f"masked-value recovery: {args.num_pairs} keys x 2 occurrences (length "
          f"{4 * args.num_pairs}), {args.num_keys} keys, {args.num_values} values; "
          f"{args.layers} layers, d_model {args.d_model}, {args.heads} heads; {args.steps} steps "
          f"x batch {args.batch_size}, lr {args.lr}; cpu, {args.threads} thread(s){why}; "
          f"models: {', '.join(names)}", flush=True)
    rows, t_all = [], time.perf_counter()
    for i, n in enumerate(names):
        r = train_one(n, args, t_all, i, len(names))
        rows.append(r)
        print(f"  {n:>11}: accuracy {r['acc']['all']:6.1%} (look-back {r['acc']['back']:.1%}, "
              f"look-ahead {r['acc']['ahead']:.1%}; {r['tok_s']:,.0f} tok/s train, "
              f"{r['wall']:.0f} s)", flush=True)
    print()
    print(f"| {'model':<11} | {'params':>7} | {'final loss':>10} | {'acc':>6} | "
          f"{'look-back':>9} | {'look-ahead':>10} | {'train tok/s':>11} | {'time (s)':>8} |")
    print(f"|{'-' * 13}|{'-' * 8}:|{'-' * 11}:|{'-' * 7}:|{'-' * 10}:|{'-' * 11}:|"
          f"{'-' * 12}:|{'-' * 9}:|")
    for r in rows:
        a = r["acc"]
        print(f"| {r['model']:<11} | {r['params']:>7,} | {r['loss']:>10.3f} | "
              f"{a['all']:>6.1%} | {a['back']:>9.1%} | {a['ahead']:>10.1%} | "
              f"{r['tok_s']:>11,.0f} | {r['wall']:>8.1f} |")
    print(f"\ntotal {_fmt_s(time.perf_counter() - t_all)}; chance is 1/{args.num_values} "
          f"({1 / args.num_values:.1%})", flush=True)
    return rows


if __name__ == "__main__":
    main()
