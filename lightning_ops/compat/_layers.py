"""Layer classes for the mirror modules, resolved lazily from lightning_ops.layers (importing a
mirror of fla.layers or mamba_ssm never imports the layers until a class is asked for)."""
from __future__ import annotations

import importlib
from typing import Callable, Sequence, Tuple

# peer class name -> class name in lightning_ops.layers
LAYERS = {
    "GatedLinearAttention": "GatedLinearAttention",
    "DeltaNet": "DeltaNet",
    "GatedDeltaNet": "GatedDeltaNet",
    "KimiDeltaAttention": "KimiDeltaAttention",
    "LightningAttention": "LightningAttention",
    "Mamba": "Mamba",
    "Mamba2": "Mamba2",
    # fla.layers.hgrn2 / fla.layers.mom (fla has no LION layer; its LinearAttention takes any
    # feature map, so HedgehogAttention is not served under that name)
    "HGRN2Attention": "HGRN2Attention",
    "MomAttention": "MomAttention",
}


def layer_class(name: str):
    layers = importlib.import_module("lightning_ops.layers")
    return getattr(layers, LAYERS[name])


def lazy_layers(module: str, names: Sequence[str]) -> Tuple[Callable, Callable]:
    """(__getattr__, __dir__) for a mirror module exporting the layer classes `names`."""
    names = [n for n in names if n in LAYERS]

    def __getattr__(attr: str):
        if attr in names:
            return layer_class(attr)
        raise AttributeError(f"module {module!r} has no attribute {attr!r}")

    def __dir__():
        import sys
        return sorted(set(vars(sys.modules[module])) | set(names))

    return __getattr__, __dir__
