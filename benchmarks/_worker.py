"""Times cases in a child process; the parent talks to it in JSON lines.

    python -m benchmarks._worker          one job on stdin, its timing on the last stdout line
    python -m benchmarks._worker --serve  one job per stdin line, one reply per job

One-shot mode serves providers that cannot be interrupted in time (the reference recurrence: its
autograd backward is one long C++ call a signal cannot stop), so the parent can kill the child at
the case's limit. Serve mode is one side of `--compare`: the parent keeps one worker per
revision alive and alternates requests between them (A, B, A, B, ...).

A job: {"op", "provider", "cfg": {...}, "mode", "dtype", "device", "threads",
        "min_time_s", "max_time_s", "once"}; or {"check": [[op, provider], ...]} (serve mode),
answered with why each pair cannot run (null when it can).
Replies are printed on one line after the marker REPLY, so stray prints of imported code do not
confuse the parent."""
import json
import sys

import torch

from . import registry, timing

REPLY = "@@benchmarks-reply "


def _job(job, steps):
    if "check" in job:
        device = torch.device(job.get("device", "cpu"))
        return {"missing": [registry.provider_missing(p, registry.OPS[op], device)
                            for op, p in job["check"]]}
    case = registry.Case(job["op"], job["provider"], registry.Config(**job["cfg"]), job["mode"],
                         job["dtype"])
    device = torch.device(job["device"])
    threads = int(job.get("threads") or torch.get_num_threads())
    key = json.dumps({k: job[k] for k in ("op", "provider", "cfg", "mode", "dtype", "device")},
                     sort_keys=True)
    if key not in steps:
        run = registry.provider_function(case.provider, registry.OPS[case.op])
        sets = 1 if job.get("once") else timing.n_input_sets(
            case.spec.bytes(case.cfg, registry.DTYPES[case.dtype], "fwd"), device)
        steps.clear()  # one case at a time: free the previous inputs and graphs
        steps[key] = timing.build_step(case, case.spec, run, device, sets)
    t = timing.measure(steps[key], device, threads=threads,
                       min_time_s=float(job.get("min_time_s", 0.1)),
                       max_time_s=float(job.get("max_time_s", 1.0)),
                       once_over_s=float(job.get("once_over_s", 1e9)),
                       once=bool(job.get("once")))
    return {"times": t.times_s, "peak_mb": t.peak_mb, "note": t.note, "others": t.others,
            "noisy": t.noisy}


def main() -> None:
    if "--serve" in sys.argv[1:]:
        steps = {}
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply = _job(json.loads(line), steps)
            except Exception as e:  # noqa: BLE001 - reported to the parent, the worker lives on
                reply = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            print(REPLY + json.dumps(reply), flush=True)
        return
    print(REPLY + json.dumps(_job(json.loads(sys.stdin.read()), {})), flush=True)


if __name__ == "__main__":
    main()
