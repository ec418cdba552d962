"""The context-parallel (CP) context: who holds which tokens, built once per step on the host.

Each rank of the CP process group holds one contiguous slice of the sequence dimension:
  * dense (cu_seqlens None): every rank holds [B, T_r, ...]; each of the B rows is one sequence
    that runs through all ranks in rank order;
  * varlen (cu_seqlens, the GLOBAL offsets [N + 1] of the packed batch, B == 1): rank r holds
    tokens [bounds[r], bounds[r + 1]) (an equal split by default). A sequence may start, end or
    pass through any rank; the rank sees the *pieces* of the sequences it overlaps, and runs the
    ops with the local cu_seqlens of those pieces.

Only the boundaries between ranks carry state: at most one sequence crosses each boundary
(varlen), or all B rows (dense). The context records, for every rank j, whether its first piece
continues a sequence from rank j-1 (`first_cont`), whether its last piece continues into rank
j+1 (`crosses`) and whether the whole slice is one such piece (`passes`: its transition composes
the incoming state with its own). Every rank computes the same tables from the same global
cu_seqlens, so the exchange needs no metadata on the wire.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor


@dataclass
class CPContext:
    group: Optional[object]
    rank: int
    world: int
    dense: bool
    # varlen only (None / empty when dense)
    N: int = 0                              # global number of sequences
    bounds: List[int] = field(default_factory=list)  # [world + 1] token offsets of the slices
    pieces: List[tuple] = field(default_factory=list)  # this rank: (seq n, start, end) global
    starts_here: List[bool] = field(default_factory=list)  # piece i's sequence starts here
    ends_here: List[bool] = field(default_factory=list)    # piece i's sequence ends here
    first_cont_all: List[bool] = field(default_factory=list)
    crosses_all: List[bool] = field(default_factory=list)
    passes_all: List[bool] = field(default_factory=list)
    slice_len_all: List[int] = field(default_factory=list)
    # tokens of this rank's first piece's sequence on earlier ranks (0 if it starts here):
    # position-dependent ops (log-linear attention's Fenwick levels) need the absolute start
    prior_tokens: int = 0
    device: Optional[torch.device] = None
    # communication accounting (filled by the exchange; see comm.py)
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    _local_cu: Optional[Tensor] = None

    # -- per-rank tables -------------------------------------------------------------------
    def first_cont(self, j: Optional[int] = None) -> bool:
        j = self.rank if j is None else j
        return j > 0 if self.dense else self.first_cont_all[j]

    def crosses(self, j: Optional[int] = None) -> bool:
        j = self.rank if j is None else j
        return j < self.world - 1 if self.dense else self.crosses_all[j]

    def passes(self, j: Optional[int] = None) -> bool:
        j = self.rank if j is None else j
        return j > 0 if self.dense else self.passes_all[j]

    def chain(self) -> List[int]:
        """The ranks whose summaries make this rank's incoming state, oldest first: the rank where
        the crossing sequence started, then every rank it passed through. Empty if nothing comes
        in."""
        if not self.first_cont():
            return []
        j = self.rank - 1
        while self.passes(j):
            j -= 1
        return list(range(j, self.rank))

    # -- local layout (varlen) ------------------------------------------------------------------
    @property
    def local_len(self) -> int:
        return self.bounds[self.rank + 1] - self.bounds[self.rank]

    @property
    def n_pieces(self) -> int:
        return len(self.pieces)

    def piece_lengths(self) -> List[int]:
        return [e - s for _, s, e in self.pieces]

    def local_cu_seqlens(self, device) -> Tensor:
        if self._local_cu is None or self._local_cu.device != torch.device(device):
            cu, off = [0], self.bounds[self.rank]
            for _, s, e in self.pieces:
                cu.append(e - off)
            self._local_cu = torch.tensor(cu, dtype=torch.int32, device=device)
        return self._local_cu

    def n_cross(self, batch: int) -> int:
        """Rows of the exchanged summary: B (dense) or 1 (varlen: one sequence per boundary)."""
        return batch if self.dense else 1

    def check_local_len(self, name: str, T: int) -> None:
        if not self.dense and T != self.local_len:
            raise ValueError(
                f"{name} holds {T} tokens on CP rank {self.rank}, but the context gives this rank "
                f"tokens [{self.bounds[self.rank]}, {self.bounds[self.rank + 1]}) "
                f"({self.local_len} tokens) of the global cu_seqlens")

    def reset_stats(self) -> None:
        self.bytes_sent = self.bytes_received = self.collectives = 0


def _owner(pos: int, bounds: Sequence[int]) -> int:
    """The rank whose slice holds token position pos (the last rank for pos == T)."""
    for r in range(len(bounds) - 1):
        if bounds[r] <= pos < bounds[r + 1]:
            return r
    return len(bounds) - 2


def build_cp_context(cu_seqlens: Optional[Tensor] = None, group=None,
                     bounds: Optional[Sequence[int]] = None,
                     rank: Optional[int] = None, world: Optional[int] = None) -> CPContext:
    """Build the context-parallel context of one step.

    cu_seqlens: the GLOBAL offsets [N + 1] of the packed batch (int32/int64), or None for dense
    batches (each rank holds [B, T_r, ...], every row one sequence through all ranks).
    group: the CP process group (default: the world group).
    bounds: the token offsets [world + 1] of the ranks' slices (varlen only); default an equal
    split of cu_seqlens[-1], which must then be divisible by the group size. Every slice must be
    non-empty. cu_seqlens is read on the host (once per step, like fla's build_cp_context).
    rank / world: override the group's (for building contexts without a process group, e.g. in
    tests of the tables).
    """
    if rank is None or world is None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("build_cp_context needs an initialised torch.distributed process "
                               "group (or explicit rank= and world=)")
        rank = dist.get_rank(group) if rank is None else rank
        world = dist.get_world_size(group) if world is None else world
    if cu_seqlens is None:
        if bounds is not None:
            raise ValueError("bounds is for varlen contexts (with cu_seqlens)")
        return CPContext(group=group, rank=rank, world=world, dense=True)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32,
                                                                            torch.int64):
        raise TypeError("cu_seqlens must be an int32 or int64 tensor of global offsets [N + 1]")
    cu = cu_seqlens.detach().to("cpu", torch.int64).tolist()
    if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu[:16]}")
    T = cu[-1]
    if bounds is None:
        if T % world:
            raise ValueError(f"the packed length {T} is not divisible by the CP group size "
                             f"{world}: pad the batch or pass bounds=")
        bounds = [r * (T // world) for r in range(world + 1)]
    bounds = [int(b) for b in bounds]
    if len(bounds) != world + 1 or bounds[0] != 0 or bounds[-1] != T or \
            any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"bounds must be {world + 1} increasing offsets from 0 to {T} "
                         f"(every rank holds at least one token), got {bounds}")
    N = len(cu) - 1
    tables = {"first_cont": [], "crosses": [], "passes": []}
    mine = None
    for r in range(world):
        s, e = bounds[r], bounds[r + 1]
        pieces = []
        for n in range(N):
            a, b = cu[n], cu[n + 1]
            if (a < e and b > s) or (a == b and _owner(a, bounds) == r):
                pieces.append((n, max(a, s), min(b, e)))
        first_cont = cu[pieces[0][0]] < s
        crosses = cu[pieces[-1][0] + 1] > e
        tables["first_cont"].append(first_cont)
        tables["crosses"].append(crosses)
        tables["passes"].append(first_cont and len(pieces) == 1)
        if r == rank:
            mine = pieces
    return CPContext(
        group=group, rank=rank, world=world, dense=False, N=N, bounds=bounds, pieces=mine,
        starts_here=[cu[n] >= bounds[rank] for n, _, _ in mine],
        ends_here=[cu[n + 1] <= bounds[rank + 1] for n, _, _ in mine],
        first_cont_all=tables["first_cont"], crosses_all=tables["crosses"],
        passes_all=tables["passes"], slice_len_all=[b - a for a, b in zip(bounds, bounds[1:])],
        prior_tokens=max(bounds[rank] - cu[mine[0][0]], 0), device=cu_seqlens.device)
