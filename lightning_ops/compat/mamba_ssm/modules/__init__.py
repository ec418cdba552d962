"""Mirror of `mamba_ssm.modules` (lightning_ops.compat): namespace package."""
