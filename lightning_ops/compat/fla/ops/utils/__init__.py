"""Mirror of `fla.ops.utils` (lightning_ops.compat): only the submodules fla's op tests import
(cache); fla's Triton helper kernels are not served."""
