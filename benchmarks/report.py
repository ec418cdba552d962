"""Results as data and for people: the row type, CSV append/read, the table, the summary (with
every case that was not fully timed), the plots (one figure per op family) and the Markdown
report."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .registry import MODES, OPS, OURS, PROVIDERS


@dataclass
class Result:
    """One measured (or skipped) case. Rows with status 'ok' are appended to the CSV."""
    op: str
    provider: str
    mode: str
    shape: str
    T: int
    dtype: str
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    reps: int = 0
    tokens_per_s: float = float("nan")
    tflops: float = float("nan")
    gbps: float = float("nan")
    pct_floor: float = float("nan")
    pct_compute: float = float("nan")
    peak_mb: float = float("nan")
    max_rel_err: float = float("nan")
    ci_lo_ms: float = float("nan")    # 95 % bootstrap interval of the median
    ci_hi_ms: float = float("nan")
    threads: int = 0                  # torch CPU threads the case ran with
    load1: float = float("nan")       # 1-min load average at the start of the run
    others: float = float("nan")      # cores other processes used while the case ran
    noisy: bool = False               # others took cores our threads needed (see load.py)
    flops: float = float("nan")
    bytes: float = float("nan")
    device: str = ""
    torch: str = ""
    triton: str = ""
    git_rev: str = ""
    date: str = ""
    status: str = "ok"   # ok | skipped | timeout | error
    note: str = ""
    B: int = 0
    H: int = 0
    K: int = 0
    V: int = 0
    rounds: int = 0                   # interleaved rounds the row's samples came from
    # on a peer's row: its time / our fastest provider's (speedup_vs), from the paired rounds
    speedup: float = float("nan")
    speedup_lo: float = float("nan")
    speedup_hi: float = float("nan")
    speedup_vs: str = ""

    def key(self) -> Tuple:
        return (self.op, self.provider, self.mode, self.shape, self.dtype)


CSV_FIELDS = [f.name for f in fields(Result)]
_INT = {"T", "reps", "B", "H", "K", "V", "threads", "rounds"}
_BOOL = {"noisy"}
_STR = {"op", "provider", "mode", "shape", "dtype", "device", "torch", "triton", "git_rev",
        "date", "status", "note", "speedup_vs"}


def _fmt_csv(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: str, results: Iterable[Result]) -> int:
    """Append the 'ok' results to `path` (header written when the file is new). SDPA, shown
    under every q/k/v op, is written once per shape as op 'sdpa_causal' ('sdpa_full', the
    non-causal one, under the bidirectional ops). A file with a different
    header (an older schema) is rewritten under the current header, its rows kept (columns it
    lacked left empty). Returns rows written."""
    rows, seen = [], set()
    for r in results:
        if r.status != "ok":
            continue
        if r.provider == "sdpa" and math.isnan(r.speedup):
            # one measurement shown under every op: stored once per shape. (SDPA timed in
            # interleaved rounds with one op is that op's own measurement: kept under it.)
            r = Result(**{**r.__dict__, "op": _sdpa_row_name(r.op)})
        if r.key() not in seen:
            seen.add(r.key())
            rows.append(r)
    if not rows:
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != CSV_FIELDS:
            old = read_csv(path)
            with open(path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(CSV_FIELDS)
                for r in old:
                    w.writerow([_fmt_csv(getattr(r, k)) for k in CSV_FIELDS])
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(CSV_FIELDS)
        for r in rows:
            w.writerow([_fmt_csv(getattr(r, k)) for k in CSV_FIELDS])
    return len(rows)


def read_csv(path: str) -> List[Result]:
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kw = {}
            for k in CSV_FIELDS:
                v = row.get(k, "")
                if k in _STR:
                    kw[k] = v
                elif k in _BOOL:
                    kw[k] = v.strip().lower() in ("yes", "true", "1")
                elif k in _INT:
                    kw[k] = int(v) if v else 0
                else:
                    kw[k] = float(v) if v else float("nan")
            out.append(Result(**kw))
    return out


def _sdpa_row_name(op: str) -> str:
    """The stored name of an SDPA measurement shown under `op`: causal SDPA for the causal
    q/k/v ops, non-causal ('sdpa_full') for the bidirectional ones (two measurements)."""
    return "sdpa_full" if OPS[op].bidirectional else "sdpa_causal"


def expand_sdpa(results: Sequence[Result]) -> List[Result]:
    """Rows read back from a CSV, with each stored SDPA row ('sdpa_causal' / 'sdpa_full', once
    per shape) shown again under every q/k/v op of its kind measured at that shape, as a run
    shows it."""
    stored = ("sdpa_causal", "sdpa_full")
    out = [r for r in results if r.op not in stored]
    shapes = {(r.op, r.shape, r.dtype) for r in out}
    for r in results:
        if r.op in stored:
            for op in [o for o in OPS if (OPS[o].attention_like or OPS[o].bidirectional)
                       and _sdpa_row_name(o) == r.op]:
                if (op, r.shape, r.dtype) in shapes:
                    out.append(Result(**{**r.__dict__, "op": op}))
    return out


def to_dicts(results: Sequence[Result]) -> List[Dict]:
    return [asdict(r) for r in results]


def from_dicts(rows: Sequence[Dict]) -> List[Result]:
    return [Result(**r) for r in rows]


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------
def _num(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return f"{x:.2e}"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _ms_cell(r: Optional[Result]) -> str:
    """'12.3 ±2%': median and the half-width of its 95 % interval; '*' once timed, '~' noisy."""
    if r is None:
        return ""
    if r.status != "ok":
        return {"skipped": "skip", "timeout": "timeout", "error": "error"}.get(r.status, r.status)
    mark = "~" if r.noisy else ""
    if r.reps <= 1:
        return f"{_num(r.median_ms)} *{mark}"
    if math.isnan(r.ci_lo_ms):
        return f"{_num(r.median_ms)} ({_num(r.p20_ms)}-{_num(r.p80_ms)}){mark}"
    half = 100 * (r.ci_hi_ms - r.ci_lo_ms) / 2 / r.median_ms if r.median_ms > 0 else float("nan")
    return f"{_num(r.median_ms)} ±{half:.0f}%{mark}"


def _err_cell(err: float, dtype: str) -> str:
    if math.isnan(err):
        return "-"
    bad = err > (1e-3 if dtype in ("fp32", "fp64") else 5e-2)
    return f"{err:.1e}" + (" !" if bad else "")


def _render(rows: List[List[str]], header: List[str]) -> List[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i >= 2 else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def table(results: Sequence[Result], err_note: str = "") -> str:
    """One block per op: a row per (T, provider), a column per mode (median ms and its 95 %
    interval), then throughput and roofline numbers of the main mode (fwd+bwd when measured,
    else fwd)."""
    out: List[str] = []
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    main = "fwd+bwd" if "fwd+bwd" in modes else (modes[-1] if modes else "fwd")
    by_op: Dict[str, List[Result]] = {}
    for r in results:
        by_op.setdefault(r.op, []).append(r)
    if err_note:
        out.append(err_note)
    for op in [o for o in OPS if o in by_op]:
        rs = by_op[op]
        grid: Dict[Tuple, Dict[str, Result]] = {}
        for r in rs:
            grid.setdefault((r.T, r.provider, r.dtype), {})[r.mode] = r
        header = (["T", "provider"] + [f"{m} ms" for m in modes] +
                  [f"tok/s {main}", "TFLOP/s", "GB/s", "% floor", "% comp", "peak MB",
                   "max rel err"])
        body, notes = [], []
        dts = sorted({r.dtype for r in rs})
        multi = len(dts) > 1
        for (T, prov, dt) in sorted(grid, key=lambda k: (k[0], PROVIDERS.index(k[1]), k[2])):
            cells = grid[(T, prov, dt)]
            m = cells.get(main)
            ok = m is not None and m.status == "ok"
            any_r = next(iter(cells.values()))
            body.append([str(T), prov + (f" {dt}" if multi else "")]
                        + [_ms_cell(cells.get(md)) for md in modes]
                        + ([_num(m.tokens_per_s), _num(m.tflops), _num(m.gbps),
                            _num(m.pct_floor, 2), _num(m.pct_compute, 2), _num(m.peak_mb)]
                           if ok else ["-"] * 6)
                        + [_err_cell(any_r.max_rel_err, dt)])
            for md in modes:
                r = cells.get(md)
                if r is not None and r.note:
                    notes.append(f"T={T} {prov}{multi and ' ' + dt or ''} {md}: {r.note}")
        shape = rs[0].shape.replace(f"T{rs[0].T}", "T").replace(f"L{rs[0].T}", "L")
        out.append("")
        out.append(f"== {op}  [{shape}]  {', '.join(dts)}")
        out.extend(_render(body, header))
        out.extend(f"   * {n}" for n in notes)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Summary: where we beat or lose to each peer
# ------------------------------------------------------------------------------------------------
def _ours_best(results: Sequence[Result]) -> Dict[Tuple, Result]:
    best: Dict[Tuple, Result] = {}
    for r in results:
        if r.provider in OURS and r.status == "ok":
            k = (r.op, r.T, r.shape, r.mode, r.dtype)
            if k not in best or r.median_ms < best[k].median_ms:
                best[k] = r
    return best


def _ends(r: Result) -> Tuple[float, float]:
    """The 95 % interval of a median; for rows recorded without one, p20-p80 (wider); for
    one call, the median twice."""
    if math.isnan(r.ci_lo_ms):
        if r.reps > 1 and not math.isnan(r.p20_ms):
            return r.p20_ms, r.p80_ms
        return r.median_ms, r.median_ms
    return r.ci_lo_ms, r.ci_hi_ms


def paired(r: Result) -> bool:
    """A peer's row whose speedup came from rounds interleaved with our provider."""
    return not math.isnan(r.speedup) and bool(r.speedup_vs)


def speedups(results: Sequence[Result], peer: str
             ) -> List[Tuple[float, Result, Result, float, float]]:
    """(peer time / our best time, ours, peer, lo, hi) for every shape both measured. When the
    two were timed in interleaved rounds, the speedup and its 95 % interval come from the paired
    rounds (stats.paired_speedup_ci); else lo-hi is the ratio of the two medians' 95 %
    intervals (conservative: their far ends), which a busy machine makes unreliable."""
    best = _ours_best(results)
    out = []
    for r in results:
        if r.provider == peer and r.status == "ok":
            k = (r.op, r.T, r.shape, r.mode, r.dtype)
            if paired(r):
                ours = next((o for o in results if o.provider == r.speedup_vs
                             and o.status == "ok" and (o.op, o.T, o.shape, o.mode, o.dtype) == k),
                            None)
                if ours is not None:
                    out.append((r.speedup, ours, r, r.speedup_lo, r.speedup_hi))
                    continue
            ours = best.get(k)
            if ours is not None and ours.median_ms > 0:
                (olo, ohi), (plo, phi) = _ends(ours), _ends(r)
                out.append((r.median_ms / ours.median_ms, ours, r, plo / ohi, phi / olo))
    return out


def verdict(lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return "undecided"
    if lo > 1:
        return "faster"
    if hi < 1:
        return "slower"
    return "no significant difference"


def summary(results: Sequence[Result]) -> List[str]:
    """One line per peer: in how many shapes our fastest backend is faster / slower (95 %
    intervals apart) / not significantly different, with the best and worst cases."""
    lines = []
    for peer in [p for p in PROVIDERS if p not in OURS]:
        sp = speedups(results, peer)
        if not sp:
            continue
        win = [s for s in sp if verdict(s[3], s[4]) == "faster"]
        lose = [s for s in sp if verdict(s[3], s[4]) == "slower"]
        und = [s for s in sp if verdict(s[3], s[4]) == "undecided"]
        tie = len(sp) - len(win) - len(lose) - len(und)
        unpaired = [s for s in sp if not paired(s[2])]
        tag = lambda s: f"{s[0]:.3g}x [{s[3]:.3g}-{s[4]:.3g}] {s[1].op} T{s[1].T} {s[1].mode}"  # noqa
        parts = [f"vs {peer}: faster in {len(win)}/{len(sp)}"]
        if win:
            parts.append(f"(best {tag(max(win, key=lambda s: s[0]))})")
        parts.append(f", slower in {len(lose)}/{len(sp)}")
        if lose:
            worst = sorted(lose, key=lambda s: s[0])
            parts.append("(" + ", ".join(tag(s) for s in worst[:3]) +
                         (f", +{len(worst) - 3} more" if len(worst) > 3 else "") + ")")
        if tie:
            parts.append(f", no significant difference in {tie}/{len(sp)}")
        if und:
            parts.append(f", undecided in {len(und)}/{len(sp)}")
        if unpaired:
            parts.append(f"; {len(unpaired)} of these not interleaved (a side timed once or "
                         f"alone: "
                         + ", ".join(f"{s[1].op} T{s[1].T} {s[1].mode}" for s in unpaired[:3])
                         + (f", +{len(unpaired) - 3} more" if len(unpaired) > 3 else "") + ")")
        lines.append(" ".join(parts).replace(" ,", ",").replace(" ;", ";"))
    return lines


def speedup_table(results: Sequence[Result]) -> List[str]:
    """One line per (op, T, mode, peer): our fastest provider vs the peer, its 95 % interval and
    the verdict; 'paired' when it comes from interleaved rounds."""
    out = []
    for peer in [p for p in PROVIDERS if p not in OURS]:
        sp = speedups(results, peer)
        if not sp:
            continue
        out.append(f"{'op':24s} {'T':>6s} {'mode':8s} {'ours':11s} {'peer':10s} "
                   f"{'speedup [95% interval]':24s} verdict")
        for x, o, p, lo, hi in sorted(sp, key=lambda s: (list(OPS).index(s[1].op), s[1].T,
                                                          MODES.index(s[1].mode))):
            v = verdict(lo, hi)
            iv = f"{x:.3g}x [{lo:.3g}-{hi:.3g}]" if not math.isnan(lo) else f"{x:.3g}x"
            out.append(f"{o.op:24s} {o.T:6d} {o.mode:8s} {o.provider:11s} {peer:10s} {iv:24s} "
                       f"{'ours ' + v if v in ('faster', 'slower') else v}"
                       + ("" if paired(p) else "  (not interleaved)"))
    return out


def holes(results: Sequence[Result]) -> List[str]:
    """Every case that was not timed with repeats: skipped, stopped, failed, timed once; and the
    rows flagged noisy. One line each (grouped by reason)."""
    def name(r):
        return f"{r.op} {r.provider} T{r.T} {r.mode}"
    seen = set()
    groups: Dict[str, List[str]] = {}
    def shared(r):  # one SDPA measurement shown under every op (not one timed with an op)
        return r.provider == "sdpa" and not r.rounds and r.status == "ok"

    for r in results:
        k = ("sdpa" if shared(r) else r.op, r.provider, r.T, r.mode, r.dtype)
        if k in seen:
            continue
        seen.add(k)
        if r.status != "ok":
            groups.setdefault(f"{r.status}: {r.note}", []).append(name(r))
        elif r.reps <= 1:
            groups.setdefault("timed once (no warm-up, no interval)", []).append(name(r))
    out = [f"{len(v)} {why}: {', '.join(v)}" for why, v in groups.items()]
    uniq = {("sdpa" if shared(r) else r.op, r.provider, r.T, r.mode, r.dtype): r
            for r in results if r.status == "ok"}
    noisy = [r for r in uniq.values() if r.noisy]
    if noisy:
        out.append(f"{len(noisy)} of {len(uniq)} timed rows are "
                   f"noisy (other processes took cores our threads needed)")
    return out


def _time_or_bound(r: Optional[Result]) -> Optional[Tuple[float, bool]]:
    """(ms, exact) for a result: its median, or for a timeout the limit it ran past (a lower
    bound); None when it was not measured."""
    if r is None:
        return None
    if r.status == "ok":
        return r.median_ms, True
    if r.status == "timeout":
        try:
            return 1e3 * float(r.note.split("past ")[1].split(" s")[0]), False
        except (IndexError, ValueError):
            return None
    return None


def cpu_targets(results: Sequence[Result]) -> List[str]:
    """The CPU headline claims (fp32, B=1, H=4, K=V=64): chunk_gla fwd+bwd >= 10x faster than
    the reference recurrence at T=4096 and faster than causal SDPA at T=16384. A peer that was not timed in
    full still bounds the speedup from below: its time limit, or (for the reference) its
    forward alone."""
    def get(prov, T, mode):
        for r in results:
            if (r.op == "chunk_gla" and r.provider == prov and r.T == T and r.mode == mode
                    and r.dtype == "fp32" and (r.B, r.H, r.K, r.V) == (1, 4, 64, 64)):
                return r
        return None

    best = _ours_best(results)
    lines = []
    for T, peer, need, label in ((4096, "reference", 10.0, ">= 10x"),
                                 (16384, "sdpa", 1.0, "> 1x")):
        name = f"headline: chunk_gla fwd+bwd T={T} vs {'SDPA causal' if peer == 'sdpa' else peer}"
        o = next((r for k, r in best.items() if k[0] == "chunk_gla" and k[1] == T
                  and k[3] == "fwd+bwd" and (r.B, r.H, r.K, r.V) == (1, 4, 64, 64)
                  and r.dtype == "fp32"), None)
        p_full, p_fwd = get(peer, T, "fwd+bwd"), get(peer, T, "fwd")
        if p_full is None and p_fwd is None:
            continue  # the peer is not part of this run
        bounds = [b for b in (_time_or_bound(p_full),) if b is not None]
        if not bounds or not bounds[0][1]:  # fwd+bwd not exact: its fwd is a lower bound too
            f = _time_or_bound(p_fwd)
            if f is not None:
                bounds.append((f[0], False))
        if o is None or not bounds:
            ours = get("ours-torch", T, "fwd+bwd")
            lines.append(f"{name}: not measured ({_why_not(ours, p_full)})")
            continue
        ms, exact = max(bounds, key=lambda b: (b[1], b[0]))
        x = ms / o.median_ms
        ok = x >= need if need > 1 else x > need
        v = "PASS" if ok else ("FAIL" if exact else "UNDECIDED (lower bound)")
        lines.append(f"{name}: {'' if exact else '>='}{x:.2f}x (goal {label}) {v}" +
                     ("" if exact else f"  [{peer} fwd+bwd not timed in full: bound from its "
                                       f"time limit / its forward]"))
    return lines


def _why_not(ours: Optional[Result], peer: Optional[Result]) -> str:
    why = [f"{r.provider}: {r.status} {r.note}".strip() for r in (ours, peer)
           if r is not None and r.status != "ok"]
    return "; ".join(why) or "not in this run"


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
FAMILIES = {"gla": ("linear attention family", ("chunk_gla", "chunk_simple_gla",
                                                  "chunk_linear_attn", "lightning_attn",
                                                  "lion_attn", "chunk_log_linear_attn")),
            "delta": ("delta-rule family", ("chunk_delta_rule", "chunk_gated_delta_rule",
                                            "chunk_kda", "chunk_log_linear_gated_delta_rule")),
            "ssm": ("state-space family", ("selective_scan_fn", "mamba_chunk_scan_combined",
                                           "causal_conv1d_fn")),
            # one token per sequence (T = 1): a figure of their own, off the others' T axis
            "decode": ("decode steps", ("selective_state_update", "causal_conv1d_update",
                                        "fused_recurrent_gated_delta_rule"))}


def _ms_of_hole(r: Result) -> Optional[float]:
    b = _time_or_bound(r)
    return b[0] if b else None


def plot(results: Sequence[Result], folder: str) -> Tuple[List[str], Optional[str]]:
    """One PNG per op family: a column per op; a row per mode with time vs T (log-log), one line
    per provider, its p20-p80 band shaded; a last row with our speedup vs each peer (95 %
    interval as error bars; 1x dashed). Cases timed once are hollow markers, noisy ones ringed,
    and cases not timed (skipped, stopped, failed) are an x at the top of their panel.
    Returns (paths written, note when plotting was skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    except Exception as e:  # noqa: BLE001 - plots are optional on bare GPU machines
        return [], f"plots skipped: matplotlib unavailable ({type(e).__name__})"
    paths = []
    os.makedirs(folder, exist_ok=True)
    provs = [p for p in PROVIDERS if any(r.provider == p for r in results)]
    colors = {p: f"C{i}" for i, p in enumerate(provs)}
    for fam, (title, fam_ops) in FAMILIES.items():
        ops = [o for o in fam_ops if any(r.op == o for r in results)]
        if not ops:
            continue
        rs_all = [r for r in results if r.op in ops]
        modes = [m for m in MODES if any(r.mode == m for r in rs_all)]
        nrow = len(modes) + 1
        fig, axes = plt.subplots(nrow, len(ops), figsize=(4.2 * len(ops) + 0.6, 3.0 * nrow + 1),
                                 squeeze=False)
        for j, op in enumerate(ops):
            rs = [r for r in rs_all if r.op == op]
            Ts = sorted({r.T for r in rs})
            for i, m in enumerate(modes):
                ax = axes[i][j]
                for prov in provs:
                    pts = sorted((r for r in rs if r.mode == m and r.provider == prov),
                                 key=lambda r: r.T)
                    ok = [r for r in pts if r.status == "ok"]
                    c = colors[prov]
                    ls = "-" if prov in OURS else "--"
                    if ok:
                        x = [r.T for r in ok]
                        ax.plot(x, [r.median_ms for r in ok], ls, color=c, label=prov, lw=1.5)
                        ax.fill_between(x, [r.p20_ms for r in ok], [r.p80_ms for r in ok],
                                        color=c, alpha=0.2, lw=0)
                        full = [r for r in ok if r.reps > 1]
                        once = [r for r in ok if r.reps <= 1]
                        ax.plot([r.T for r in full], [r.median_ms for r in full], "o",
                                color=c, ms=4)
                        if once:
                            ax.plot([r.T for r in once], [r.median_ms for r in once], "o",
                                    mfc="white", color=c, ms=6, label=f"{prov}: timed once")
                        nz = [r for r in ok if r.noisy]
                        if nz:
                            ax.plot([r.T for r in nz], [r.median_ms for r in nz], "o",
                                    mfc="none", mec="red", ms=10, mew=1)
                    for r in pts:
                        if r.status != "ok":
                            ax.plot([r.T], [0.97], "x", color=c, ms=9, mew=2,
                                    transform=ax.get_xaxis_transform(), clip_on=False)
                            ax.annotate(r.status, (r.T, 0.9), xycoords=ax.get_xaxis_transform(),
                                        ha="center", fontsize=7, color=c)
                ax.set_title(f"{op} {m}", fontsize=9)
                ax.set_ylabel("ms per call (median, p20-p80)", fontsize=8)
            ax = axes[-1][j]
            peers = [p for p in provs if p not in OURS]
            for m_i, m in enumerate(modes):
                for peer in peers:
                    sp = sorted((s for s in speedups(rs, peer) if s[1].mode == m),
                                key=lambda s: s[1].T)
                    if not sp:
                        continue
                    x = [s[1].T for s in sp]
                    y = [s[0] for s in sp]
                    err = [[max(s[0] - s[3], 0) for s in sp], [max(s[4] - s[0], 0) for s in sp]]
                    ax.errorbar(x, y, yerr=err, fmt="o" + ("-" if m_i == 0 else ":"),
                                color=colors[peer], capsize=3, ms=4,
                                label=f"vs {peer} ({m})")
            ax.axhline(1.0, color="gray", ls="--", lw=1)
            ax.set_title(f"{op}: our fastest vs peer (>1: ours faster)", fontsize=9)
            ax.set_ylabel("speedup (x)", fontsize=8)
            if not ax.has_data() or not ax.get_lines()[:-1]:
                ax.text(0.5, 0.5, "no peer measured", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9, color="gray")
            for i in range(nrow):
                a = axes[i][j]
                a.set_xscale("log", base=2)
                if i < nrow - 1 or a.get_lines()[:-1]:
                    a.set_yscale("log")
                if Ts:
                    a.set_xticks(Ts, [str(T) for T in Ts])
                    a.xaxis.set_minor_formatter(NullFormatter())
                if a.get_yscale() == "log":
                    a.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                    a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    a.yaxis.set_minor_locator(NullLocator())
                a.set_xlabel("T (sequence length)", fontsize=8)
                a.grid(True, which="major", alpha=0.3)
                a.tick_params(labelsize=7)
                if a.get_legend_handles_labels()[0]:
                    a.legend(fontsize=7, loc="best")
        r0 = rs_all[0]
        fig.suptitle(f"{title}: {r0.dtype}, {r0.device}, rev {r0.git_rev}, "
                     f"{r0.threads or '?'} thread(s)\nbands: p20-p80; red ring: noisy (machine "
                     f"busy); hollow: timed once; x: not timed", fontsize=9)
        fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.8 / (3.0 * nrow + 1),
                            bottom=0.5 / (3.0 * nrow + 1), hspace=0.55, wspace=0.28)
        path = os.path.join(folder, f"{fam}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths, None


# ------------------------------------------------------------------------------------------------
# Markdown report
# ------------------------------------------------------------------------------------------------
def _md_ms(r: Optional[Result]) -> str:
    if r is None:
        return ""
    if r.status != "ok":
        return f"{r.status}"
    if r.reps <= 1:
        return f"{_num(r.median_ms)} (once)" + (" noisy" if r.noisy else "")
    if math.isnan(r.ci_lo_ms):  # rows from before intervals were recorded: p20-p80
        return f"{_num(r.median_ms)} (p20–p80 {_num(r.p20_ms)}–{_num(r.p80_ms)})"
    return (f"{_num(r.median_ms)} [{_num(r.ci_lo_ms)}–{_num(r.ci_hi_ms)}]"
            + (" noisy" if r.noisy else ""))


def markdown(results: Sequence[Result], plots: Sequence[str], folder: str,
             header: Sequence[str] = (), summary_lines: Sequence[str] = ()) -> str:
    """A Markdown page: run info, summary, cases not fully timed, a table per op, the plots
    (linked relative to `folder`, where the page is written)."""
    out = ["# lightning_ops benchmark report", ""]
    out += [f"* {h}" for h in header]
    out += ["", "## Summary", ""] + [f"* {x}" for x in summary_lines or ["no peer measured"]]
    hl = holes(results)
    out += ["", "## Not fully timed", ""] + ([f"* {x}" for x in hl] or ["* none"])
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    for op in [o for o in OPS if any(r.op == o for r in results)]:
        rs = [r for r in results if r.op == op]
        out += ["", f"## {op}", "",
                "| T | provider | " + " | ".join(f"{m} ms [95% interval]" for m in modes)
                + " | tok/s | GB/s | threads | others (cores) |",
                "|---:|---|" + "---:|" * len(modes) + "---:|---:|---:|---:|"]
        grid: Dict[Tuple, Dict[str, Result]] = {}
        for r in rs:
            grid.setdefault((r.T, r.provider, r.dtype), {})[r.mode] = r
        for (T, prov, dt) in sorted(grid, key=lambda k: (k[0], PROVIDERS.index(k[1]))):
            cells = grid[(T, prov, dt)]
            main = cells.get("fwd+bwd") or cells.get(modes[-1]) or next(iter(cells.values()))
            ok = main.status == "ok"
            out.append(f"| {T} | {prov} | " + " | ".join(_md_ms(cells.get(m)) for m in modes)
                       + f" | {_num(main.tokens_per_s) if ok else '-'} | "
                         f"{_num(main.gbps) if ok else '-'} | {main.threads or '-'} | "
                         f"{_num(main.others, 2)} |")
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{os.path.basename(p)}]({os.path.relpath(p, folder)})" for p in plots]
    return "\n".join(out) + "\n"
