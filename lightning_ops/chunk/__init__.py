"""The chunk engine every family runs on (see ARCHITECTURE.md):

  constants.py          gate kinds (NO/SCALAR/GAMMA/VECTOR_GATE) and chunk / tile sizes
  torch.py              the chunked PyTorch engine (layout, gates, intra-chunk scores, state
                        passing, forward/backward): the GLA family's torch backend as is
  triton.py             its Triton launchers (chunk and token-walk modes) and the launch helpers
                        the delta rule's launchers share: the GLA family's Triton backend as is
  triton_kernels.py     the chunk kernels (gate cumsum, state walk, output, scores, dq/dk/dg)
  triton_recurrent.py   the token-walk kernels (decode, short T)
"""
