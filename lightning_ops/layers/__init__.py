"""`lightning_ops.layers`: the nn.Module layers, under the library's own namespace.

The sources live in the repository's top-level `layers/` folder. An installed wheel maps that
folder to this package (setup.py's package_dir), so this file is never shipped; in a source
checkout (or an editable install) it stands in for it: the package's search path is pointed at
`layers/` and its `__init__` runs here, so `lightning_ops.layers.<module>` are the files of
`layers/` loaded under this name (a separate copy from a top-level `import layers`, which only a
source checkout on sys.path provides and which users should not rely on).
"""
import os as _os

_SRC = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))),
                     "layers")
if not _os.path.isfile(_os.path.join(_SRC, "__init__.py")):
    raise ImportError(f"lightning_ops.layers: the layers sources are missing (looked in {_SRC})")
__path__ = [_SRC]
__file__ = _os.path.join(_SRC, "__init__.py")
with open(__file__, encoding="utf-8") as _f:
    exec(compile(_f.read(), __file__, "exec"))
del _f
