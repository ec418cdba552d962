"""Mirror of `mamba_ssm.ops.triton` (lightning_ops.compat): namespace package."""
