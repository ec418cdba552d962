"""The lightning_ops benchmark harness: `python -m benchmarks --help`.

registry.py  ops, shapes, providers, FLOP and byte counts (one place; CLI and pytest-benchmark)
timing.py    warm-up, repeats, CUDA events / wall clock, input rotation, peak memory
roofline.py  device peaks measured per run; achieved TFLOP/s, GB/s, % floor, % compute
report.py    the table, the summary, results.csv, PNG plots
compare.py   the same cases at another git revision (a temporary worktree)
cli.py       the command line
"""
