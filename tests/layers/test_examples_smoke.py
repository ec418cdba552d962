"""Smoke tests of examples/decode_throughput.py: its main runs every mixer of layers.MIXERS on
a tiny setting, and its decode driver (each layer's public decode contract) gives the outputs of
a full forward."""
import os
import sys

import pytest
import torch

import layers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
import decode_throughput as dt  # noqa: E402

TINY = ["--hidden-size", "32", "--batch-sizes", "2", "--prompt", "3", "--steps", "1",
        "--warmup", "1", "--threads", "1"]


def test_settings_cover_every_mixer():
    assert sorted(dt.SUPPORTED) == sorted(layers.MIXERS)
    for name in dt.SUPPORTED:  # at the default width and the smallest sensible one
        for d in (32, 256):
            layers.make_mixer(name, d, **dt.layer_kwargs(name, d))


def test_main_runs_every_mixer(tmp_path):
    out = tmp_path / "decode.csv"
    rows = dt.main(TINY + ["--csv", str(out)])
    assert [r["mixer"] for r in rows] == dt.SUPPORTED  # the default list: every mixer
    for r in rows:
        assert r["batch"] == 2 and r["threads"] == 1 and r["tokens_per_s"] > 0
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].startswith("mixer,batch,hidden")


def test_unknown_mixer_and_bad_arguments_are_errors():
    for bad in (["--mixers", "transformer"], ["--batch-sizes", "a"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            dt.main(TINY + bad)


@pytest.mark.parametrize("name", ["gla", "mom", "mamba2", "mamba", "log_linear_mamba2",
                                  "log_linear_gated_deltanet"])
def test_decoder_matches_the_full_forward(name):
    """Prefill then one-token steps through the layer's own contract (fla's past_key_values /
    MoM's 4-tuple / mamba-ssm's inference_params) == one forward over the whole sequence."""
    torch.manual_seed(0)
    d, T0, T = 32, 5, 9
    layer = layers.make_mixer(name, d, layer_idx=0, **dt.layer_kwargs(name, d)).double().eval()
    x = torch.randn(2, T, d, dtype=torch.float64)
    with torch.no_grad():
        full = dt.Decoder(layer, 2, T).prefill(x)
        dec = dt.Decoder(layer, 2, T)
        outs = [dec.prefill(x[:, :T0])] + [dec.step(x[:, t:t + 1]) for t in range(T0, T)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-9)
    assert dec.seen() == T
