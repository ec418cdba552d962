"""Mirror of `mamba_ssm.ops` (lightning_ops.compat): namespace package."""
