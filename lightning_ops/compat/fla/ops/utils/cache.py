"""Mirror of `fla.ops.utils.cache` (lightning_ops.compat): the config-cache mode fla's tests
branch on. lightning_ops has no kernel-config cache; the mode is read from FLA_CACHE_MODE as
fla reads it."""
from lightning_ops.compat._fla_env import FLA_CACHE_MODE, FlaCacheMode  # noqa: F401

__all__ = ['FLA_CACHE_MODE', 'FlaCacheMode']
