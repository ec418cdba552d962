"""Drop-in compatibility with fla, mamba-ssm and causal-conv1d.

One line makes existing code run on lightning_ops, unchanged:

    import lightning_ops.compat as lc
    lc.patch_all()          # or patch_fla() / patch_mamba_ssm() / patch_causal_conv1d()

    from fla.ops.gla import chunk_gla                   # -> lightning_ops.compat.fla.ops.gla
    from mamba_ssm import Mamba2                        # -> lightning_ops.layers.Mamba2
    from causal_conv1d import causal_conv1d_fn          # -> causal-conv1d's signature, our op

    lc.unpatch()            # everything back as it was

* When the peer package is NOT installed, its import paths are served by the mirror modules of
  this package (`lightning_ops.compat.fla.ops.gla`, `lightning_ops.compat.mamba_ssm.ops.
  selective_scan_interface`, ...): they are entered in sys.modules under the peer's names, and
  a meta-path finder answers any other submodule of the peer with a clear ModuleNotFoundError.
* When it IS installed, the peer's own modules are imported and the functions and layer
  classes we provide replace theirs, as Liger-Kernel does: in the peer's modules, and wherever
  an already-imported module (the peer's layers and models, transformers, user code) holds the
  peer's object under any name. unpatch() puts every replaced attribute back. Code that copied a
  function out while patched keeps ours, as with any monkey-patch.

The mirror modules can also be imported explicitly, without patching anything:
`from lightning_ops.compat.fla.ops.gla import chunk_gla`.

The functions follow the peers' signatures (positional order, defaults, return conventions);
the values we cannot honour raise UnsupportedArgumentError (a NotImplementedError) naming the
argument, never a silent difference. Layers map to lightning_ops.layers: fla.layers.
{GatedLinearAttention, DeltaNet, GatedDeltaNet, LightningAttention}, mamba_ssm.{Mamba, Mamba2}
(also mamba_ssm.modules.mamba_simple.Mamba and mamba_ssm.modules.mamba2.Mamba2).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import pkgutil
import sys
import warnings
from typing import Dict, List, Optional, Tuple

from ._common import NotServed, UnsupportedArgumentError

PEERS = ("fla", "mamba_ssm", "causal_conv1d")

__all__ = ["patch_fla", "patch_mamba_ssm", "patch_causal_conv1d", "patch_all", "unpatch",
           "patched", "UnsupportedArgumentError", "PEERS"]


class _Patch:
    """What one patch_<peer>() changed, so unpatch() can undo exactly that."""

    def __init__(self, peer: str, mode: str):
        self.peer, self.mode = peer, mode
        self.attrs: List[Tuple[object, str, bool, object]] = []   # (module, attr, had, old)
        self.modules: Dict[str, object] = {}                       # sys.modules entries added
        self.finder: Optional[_MissingFinder] = None

    def set(self, obj, attr: str, new) -> None:
        had = attr in vars(obj)
        self.attrs.append((obj, attr, had, vars(obj).get(attr)))
        setattr(obj, attr, new)

    def undo(self) -> None:
        for obj, attr, had, old in reversed(self.attrs):
            if had:
                setattr(obj, attr, old)
            else:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
        for name, mod in self.modules.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]
        if self.finder is not None and self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)


_PATCHES: Dict[str, _Patch] = {}


class _MissingFinder(importlib.abc.MetaPathFinder):
    """In alias mode every mirror module is already in sys.modules; any other submodule of the
    peer gets a clear error instead of a confusing one."""

    def __init__(self, peer: str, served: List[str]):
        self.peer, self.served = peer, served

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.peer or fullname.startswith(self.peer + "."):
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: {self.peer} is not installed and "
                f"lightning_ops.compat.patch_{self.peer}() provides only the modules "
                f"mirrored in lightning_ops.compat.{self.peer} (packages: "
                f"{', '.join(self.served)}). Install {self.peer} (then patch_{self.peer}() "
                f"replaces what we implement and keeps the rest), or call "
                f"lightning_ops.compat.unpatch().", name=fullname)
        return None


def _mirrors(peer: str) -> List[str]:
    """Full names of the mirror modules of `peer` (package first, then submodules)."""
    root = importlib.import_module(f"{__name__}.{peer}")
    names = [root.__name__]
    for info in pkgutil.walk_packages(root.__path__, prefix=root.__name__ + "."):
        names.append(info.name)
    return names


def _peer_name(mirror: str) -> str:
    return mirror[len(__name__) + 1:]


def _installed(peer: str) -> bool:
    mod = sys.modules.get(peer)
    if mod is not None:
        return not getattr(mod, "__name__", "").startswith(__name__ + ".")
    try:
        return importlib.util.find_spec(peer) is not None
    except (ImportError, ValueError):
        return False


def _patch_alias(peer: str) -> _Patch:
    p = _Patch(peer, "alias")
    served = []
    for mirror in _mirrors(peer):
        mod = importlib.import_module(mirror)
        name = _peer_name(mirror)
        if hasattr(mod, "__path__"):
            served.append(name)
        p.modules[name] = mod
        sys.modules[name] = mod
    p.finder = _MissingFinder(peer, served)
    sys.meta_path.insert(0, p.finder)
    return p


def _patch_installed(peer: str, layers: bool) -> _Patch:
    from ._fla import KEEP_PEER_MODULES, KEEP_PEER_NAMES
    from ._layers import LAYERS
    from ._refs import REFERENCES

    p = _Patch(peer, "replace")
    swaps: Dict[int, Tuple[object, object]] = {}       # id(theirs) -> (theirs, ours)
    for mirror_name in _mirrors(peer):
        mirror = importlib.import_module(mirror_name)
        try:
            real = importlib.import_module(_peer_name(mirror_name))
        except Exception as e:  # noqa: BLE001 - a peer module that cannot import here
            warnings.warn(f"lightning_ops.compat: {_peer_name(mirror_name)} could not be "
                          f"imported ({type(e).__name__}: {e}); its names are not patched",
                          RuntimeWarning, stacklevel=3)
            continue
        for attr in getattr(mirror, "__all__", ()):
            if attr in LAYERS and not layers:
                continue
            if attr in REFERENCES and attr in vars(real):
                continue        # the installed peer's own reference stays its ground truth
            if _peer_name(mirror_name) in KEEP_PEER_MODULES or attr in KEEP_PEER_NAMES:
                continue        # the peer's own helpers / state conventions stay (see _fla)
            ours = getattr(mirror, attr)
            if isinstance(ours, NotServed):
                continue        # an import-only marker never hides the peer's real object
            theirs = vars(real).get(attr)
            if theirs is ours:
                continue
            if theirs is not None:
                swaps[id(theirs)] = (theirs, ours)
            p.set(real, attr, ours)
    # every other already-imported module holding one of their objects (their layers and
    # models, transformers, user code): point it at ours too
    for modname, mod in list(sys.modules.items()):
        if mod is None or modname.startswith(__name__) or modname == "lightning_ops":
            continue
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for attr, val in list(d.items()):
            hit = swaps.get(id(val))
            if hit is not None and hit[0] is val:
                p.set(mod, attr, hit[1])
    return p


def _patch(peer: str, layers: bool = True) -> str:
    if peer in _PATCHES:
        return _PATCHES[peer].mode
    if not isinstance(layers, bool):
        raise TypeError(f"layers must be a bool, got {layers!r}")
    if _installed(peer):
        try:
            importlib.import_module(peer)
        except Exception as e:  # noqa: BLE001 - e.g. a CUDA extension missing on this machine
            warnings.warn(f"lightning_ops.compat: {peer} is installed but cannot be imported "
                          f"({type(e).__name__}: {e}); serving its import paths from "
                          f"lightning_ops.compat.{peer} instead", RuntimeWarning, stacklevel=3)
            for name in [n for n in sys.modules if n == peer or n.startswith(peer + ".")]:
                del sys.modules[name]
        else:
            _PATCHES[peer] = _patch_installed(peer, layers)
            return "replace"
    _PATCHES[peer] = _patch_alias(peer)
    return "alias"


def patch_fla(layers: bool = True) -> str:
    """Make `fla` (flash-linear-attention) imports resolve to lightning_ops: the ops of
    fla.ops.{linear_attn, simple_gla, gla, delta_rule, gated_delta_rule, kda, lightning_attn} and,
    unless layers=False, fla.layers.{GatedLinearAttention, DeltaNet, GatedDeltaNet,
    LightningAttention}. Returns 'replace' (fla installed: its attributes were replaced) or
    'alias' (not installed: our mirror modules serve its import paths). Idempotent.
    layers=False keeps an installed fla's own layer classes (in alias mode there are no others:
    the mirrors serve ours, imported only when asked for)."""
    return _patch("fla", layers)


def patch_mamba_ssm(layers: bool = True) -> str:
    """Make `mamba_ssm` imports resolve to lightning_ops: selective_scan_fn, mamba_inner_fn,
    mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined, selective_state_update, the
    gated norms of mamba_ssm.ops.triton.layernorm_gated (layernorm_fn, rmsnorm_fn, LayerNorm,
    RMSNorm) and, unless layers=False, Mamba / Mamba2. Returns 'replace' or 'alias' (see patch_fla)."""
    return _patch("mamba_ssm", layers)


def patch_causal_conv1d() -> str:
    """Make `causal_conv1d` imports resolve to lightning_ops (causal_conv1d_fn,
    causal_conv1d_update). Returns 'replace' or 'alias' (see patch_fla)."""
    return _patch("causal_conv1d")


def patch_all(layers: bool = True) -> Dict[str, str]:
    """patch_fla(), patch_mamba_ssm() and patch_causal_conv1d(); returns {peer: mode}."""
    return {"fla": patch_fla(layers), "mamba_ssm": patch_mamba_ssm(layers),
            "causal_conv1d": patch_causal_conv1d()}


def unpatch(peer: Optional[str] = None) -> None:
    """Undo patch_<peer>() (every peer when None): replaced attributes get their old values
    back, our sys.modules entries and finder are removed."""
    if peer is not None and peer not in PEERS:
        raise ValueError(f"peer must be one of {PEERS} or None, got {peer!r}")
    for name in ([peer] if peer else list(reversed(list(_PATCHES)))):
        p = _PATCHES.pop(name, None)
        if p is not None:
            p.undo()


def patched() -> Dict[str, str]:
    """{peer: 'replace' | 'alias'} for the peers currently patched."""
    return {k: v.mode for k, v in _PATCHES.items()}
