"""Results as data and for people: the row type, CSV append/read, the table, the summary lines
and the PNG plots."""
from __future__ import annotations

import csv
import math
import os
import time
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

    def key(self) -> Tuple:
        return (self.op, self.provider, self.mode, self.shape, self.dtype)


CSV_FIELDS = [f.name for f in fields(Result)]
_INT = {"T", "reps", "B", "H", "K", "V"}
_STR = {"op", "provider", "mode", "shape", "dtype", "device", "torch", "triton", "git_rev",
        "date", "status", "note"}


def _fmt_csv(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_csv(path: str, results: Iterable[Result]) -> int:
    """Append the 'ok' results to `path` (header written when the file is new). SDPA, shown
    under every q/k/v op, is written once per shape as op 'sdpa_causal'. A file with a different
    header (an older schema) is kept aside as <path>.<timestamp>.old. Returns rows written."""
    rows, seen = [], set()
    for r in results:
        if r.status != "ok":
            continue
        if r.provider == "sdpa":
            r = Result(**{**r.__dict__, "op": "sdpa_causal"})
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
            os.replace(path, f"{path}.{time.strftime('%Y%m%d-%H%M%S')}.old")
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
                elif k in _INT:
                    kw[k] = int(v) if v else 0
                else:
                    kw[k] = float(v) if v else float("nan")
            out.append(Result(**kw))
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
    if r is None:
        return ""
    if r.status != "ok":
        return {"skipped": "skip", "timeout": "timeout", "error": "error"}.get(r.status, r.status)
    if r.reps <= 1:
        return f"{_num(r.median_ms)} (n=1)"
    return f"{_num(r.median_ms)} ({_num(r.p20_ms)}-{_num(r.p80_ms)})"


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
    """One block per op: a row per (T, provider), a column per mode (median ms, p20-p80), then
    throughput and roofline numbers of the main mode (fwd+bwd when measured, else fwd)."""
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
        header = (["T", "provider"] + [f"{m} ms (p20-p80)" for m in modes] +
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


def speedups(results: Sequence[Result], peer: str) -> List[Tuple[float, Result, Result]]:
    """(peer time / our best time, ours, peer) for every shape both measured."""
    best = _ours_best(results)
    out = []
    for r in results:
        if r.provider == peer and r.status == "ok":
            ours = best.get((r.op, r.T, r.shape, r.mode, r.dtype))
            if ours is not None and ours.median_ms > 0:
                out.append((r.median_ms / ours.median_ms, ours, r))
    return out


def summary(results: Sequence[Result]) -> List[str]:
    """One line per peer: how often our fastest backend beats it, best and worst cases."""
    lines = []
    for peer in [p for p in PROVIDERS if p not in OURS]:
        sp = speedups(results, peer)
        if not sp:
            continue
        win = [s for s in sp if s[0] >= 1]
        lose = [s for s in sp if s[0] < 1]
        tag = lambda s: f"{s[0]:.3g}x {s[1].op} T{s[1].T} {s[1].mode}"  # noqa: E731
        parts = [f"vs {peer}: faster in {len(win)}/{len(sp)}"]
        if win:
            parts.append(f"(best {tag(max(win, key=lambda s: s[0]))})")
        parts.append(f", slower in {len(lose)}/{len(sp)}")
        if lose:
            worst = sorted(lose, key=lambda s: s[0])
            parts.append("(" + ", ".join(tag(s) for s in worst[:3]) +
                         (f", +{len(worst) - 3} more" if len(worst) > 3 else "") + ")")
        lines.append(" ".join(parts).replace(" ,", ","))
    return lines


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
    """Issue 2's CPU targets (fp32, B=1, H=4, K=V=64): chunk_gla fwd+bwd >= 10x faster than the
    reference at T=4096 and faster than causal SDPA at T=16384. A peer that was not timed in
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
        name = f"target chunk_gla fwd+bwd T={T} vs {'SDPA causal' if peer == 'sdpa' else peer}"
        o = next((r for k, r in best.items() if k[0] == "chunk_gla" and k[1] == T
                  and k[3] == "fwd+bwd" and (r.B, r.H, r.K, r.V) == (1, 4, 64, 64)
                  and r.dtype == "fp32"), None)
        p_full, p_fwd = get(peer, T, "fwd+bwd"), get(peer, T, "fwd")
        if p_full is None and p_fwd is None and o is None:
            continue  # not part of this run
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
        verdict = "PASS" if ok else ("FAIL" if exact else "UNDECIDED (lower bound)")
        lines.append(f"{name}: {'' if exact else '>='}{x:.2f}x (need {label}) {verdict}" +
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
def plot(results: Sequence[Result], folder: str) -> Tuple[List[str], Optional[str]]:
    """Per op one PNG: a row per mode, time and tokens/s vs T, one line per provider.
    Returns (paths written, note when plotting was skipped)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import LogLocator
    except Exception as e:  # noqa: BLE001 - plots are optional on bare GPU machines
        return [], f"plots skipped: matplotlib unavailable ({type(e).__name__})"
    ok = [r for r in results if r.status == "ok"]
    paths = []
    os.makedirs(folder, exist_ok=True)
    for op in [o for o in OPS if any(r.op == o for r in ok)]:
        rs = [r for r in ok if r.op == op]
        modes = [m for m in MODES if any(r.mode == m for r in rs)]
        height = 3.4 * len(modes) + 0.9
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, height), squeeze=False)
        for i, m in enumerate(modes):
            lines: Dict[Tuple[str, str], List[Result]] = {}
            for r in rs:
                if r.mode == m:
                    lines.setdefault((r.provider, r.dtype), []).append(r)
            for (prov, dt), pts in sorted(lines.items(), key=lambda kv: PROVIDERS.index(kv[0][0])):
                pts.sort(key=lambda r: r.T)
                lab = prov if len({k[1] for k in lines}) == 1 else f"{prov} {dt}"
                style = dict(marker="o", linestyle="--" if prov not in OURS else "-", label=lab)
                axes[i][0].plot([r.T for r in pts], [r.median_ms for r in pts], **style)
                axes[i][1].plot([r.T for r in pts], [r.tokens_per_s for r in pts], **style)
            Ts = sorted({r.T for r in rs if r.mode == m})
            for j, (what, unit) in enumerate((("time", "ms (median)"), ("throughput", "tokens/s"))):
                ax = axes[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xticks(Ts, [str(T) for T in Ts])
                ax.minorticks_off()  # (labelled minor ticks of log axes make plotting slow)
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.set_xlabel("T (sequence length)")
                ax.set_ylabel(unit)
                ax.set_title(f"{op} {m}: {what}", fontsize=10)
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=8, loc="best")
        r0 = rs[0]
        fig.suptitle(f"{op}  [{r0.shape.replace(f'T{r0.T}', 'T').replace(f'L{r0.T}', 'L')}]  "
                     f"{r0.dtype}, {r0.device}, rev {r0.git_rev}", fontsize=9)
        # fixed margins: tight_layout measures every label and takes seconds per figure
        fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.75 / height,
                            bottom=0.6 / height, hspace=0.5, wspace=0.22)
        path = os.path.join(folder, f"{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths, None
