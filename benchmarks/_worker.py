"""Runs one case in a child process and prints its timing as JSON on the last stdout line.

The parent uses it for providers that cannot be interrupted in time (the reference recurrence:
its autograd backward is one long C++ call a signal cannot stop), so a hard timeout can kill
the child and the run keeps its time budget. Input: one JSON object on stdin
{"op", "provider", "cfg": {...}, "mode", "dtype", "device"}."""
import json
import sys

import torch

from . import registry, timing


def main() -> None:
    job = json.loads(sys.stdin.read())
    case = registry.Case(job["op"], job["provider"], registry.Config(**job["cfg"]), job["mode"],
                         job["dtype"])
    device = torch.device(job["device"])
    run = registry.provider_function(case.provider, registry.OPS[case.op])
    step = timing.build_step(case, case.spec, run, device, sets=1)
    t = timing.measure(step, device, warmup=0, min_reps=1, max_reps=1, target_s=0.0,
                       once_over_s=0.0, once=True)
    print(json.dumps({"times": t.times_s, "peak_mb": t.peak_mb, "note": t.note}))


if __name__ == "__main__":
    main()
