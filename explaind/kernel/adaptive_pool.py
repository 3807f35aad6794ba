r"""The open panels of the adaptive rule between refinement levels, their output-sized vectors stored once each.

An open panel (:class:`~explaind.kernel.adaptive_jobs.Jobs`) holds 13 output-sized vectors: :math:`h, h'` at its ends,
at the samples beside them and at its bracket's ends, and its estimate. Most of the twelve values of :math:`h, h'` are
the same vector several times (``docs/engine.md``, section 2, *What a batch is*): two adjacent panels share an end (the
split point evaluated once for both halves), a panel's side samples are its ends unless a kink was located there, and
a bracket that takes in a gap at an end of the panel starts at that end. :func:`pack` keeps each distinct vector of a
level output once, in a :class:`Pool`, and each panel's twelve values as indices into it; :func:`unpack` gives the
panels back, every value bit for bit and in the same rows, so that the plan is the one the unbounded state gives.

Two values are taken for one only where they are equal bit for bit (a :math:`h'` at a kink may come from either side,
and two evaluations at the same point may round apart): a value is looked up by its unit, point and kind
(:math:`h` or :math:`h'`) among the values of the same level output (the halves of a split panel are in the same
output), and compared with the first one found. Each output is one chunk of the pool, shared by the groups it is cut
into and freed once the next level has taken them all: the values of one level are freed as the next is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .adaptive_jobs import Jobs

__all__ = ["SLOTS", "Pool", "Packed", "pack", "unpack", "ends"]

#: The output-sized values of an open panel the pool holds: (field of :class:`Jobs`, its point, 0 for :math:`h` or 1
#: for :math:`h'`). The estimate, the thirteenth, is the panel's own and kept beside them.
SLOTS = tuple((f"{k}_{e}", t, fam) for fam, k in enumerate("fd")
              for e, t in (("A", "A"), ("B", "B"), ("sA", "s_A"), ("sB", "s_B"), ("p", "p"), ("q", "q")))
_VECTORS = frozenset(name for name, _, _ in SLOTS) | {"est"}
_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


class Pool:
    """The distinct output-sized values of one refinement level's open panels, in chunks (one per :func:`pack`).

    A value is an index: chunk ``c`` holds the values ``starts[c]`` onwards. A chunk is freed once no packed group
    that refers to it is left (:meth:`release`).
    """

    def __init__(self) -> None:
        self.chunks: list[Tensor | None] = []
        self.starts: list[int] = []
        self.refs: list[int] = []
        self.size = 0

    def nbytes(self) -> int:
        """Bytes of the chunks still held."""
        return sum(c.numel() * c.element_size() for c in self.chunks if c is not None)

    def chunk_of(self, ids: Tensor) -> Tensor:
        """The chunk of each value ``ids``."""
        starts = torch.tensor(self.starts, dtype=torch.long, device=ids.device)
        return torch.bucketize(ids.contiguous(), starts, right=True) - 1

    def gather(self, ids: Tensor, like: Tensor) -> Tensor:
        """The values ``ids (R,)`` as a new ``(R, O)`` tensor (``like``: a tensor of their dtype and device)."""
        chunk = self.chunk_of(ids)
        found = chunk.unique().tolist()
        if len(found) == 1 and self.chunks[found[0]] is not None:  # one chunk: a single copy
            return self.chunks[found[0]].index_select(0, ids - self.starts[found[0]])
        out = like.new_empty(ids.numel(), like.shape[1])
        for c in found:
            rows = torch.nonzero(chunk == c).reshape(-1)
            held = self.chunks[c]
            if held is None:  # pragma: no cover - a released chunk is never referred to again
                raise RuntimeError(f"adaptive_pool: chunk {c} was released while a packed panel refers to it")
            out[rows] = held.index_select(0, ids[rows] - self.starts[c])
        return out

    def hold(self, chunks: Tensor) -> None:
        """Count one more packed group that refers to each of ``chunks``."""
        for c in chunks.tolist():
            self.refs[c] += 1

    def release(self, chunks: Tensor) -> None:
        """Count one packed group less that refers to each of ``chunks``; free those no group refers to."""
        for c in chunks.tolist():
            self.refs[c] -= 1
            if self.refs[c] == 0:
                self.chunks[c] = None


@dataclass
class Packed:
    """Open panels whose output-sized values are indices into a :class:`Pool`.

    ``jobs`` holds their scalar fields (its output-sized fields are ``(R, 0)``), ``ids (R, 12)`` the values of
    :data:`SLOTS`, ``est (R, O)`` their estimates and ``chunks`` the pool's chunks they refer to.
    """

    jobs: Jobs
    ids: Tensor
    est: Tensor
    chunks: Tensor

    @property
    def unit(self) -> Tensor:
        """The unit of each panel."""
        return self.jobs.unit

    @property
    def err(self) -> Tensor:
        """The error of each panel's last test."""
        return self.jobs.err

    def take(self, sel: Tensor) -> Packed:
        """The panels ``sel`` (a mask), referring to the same chunks."""
        return Packed(self.jobs.take(sel), self.ids[sel], self.est[sel], self.chunks)

    def nbytes(self) -> int:
        """Bytes of the estimates (the values are the pool's)."""
        return self.est.numel() * self.est.element_size()


def _bits(v: Tensor) -> Tensor:
    """The values ``v`` as integers of their width (a bit-for-bit comparison, ``nan`` included)."""
    return v.view(_BITS[v.element_size()])


def pack(jobs: Jobs, pool: Pool) -> Packed:
    """Keep the open panels ``jobs`` (one level's output for a group): each distinct value of :data:`SLOTS` once, in a
    new chunk of ``pool``.

    A value whose unit, point and kind an earlier value of ``jobs`` has (an earlier slot, or an earlier panel in the
    same slot) takes the index of the first such value where the two are equal bit for bit; any other is stored.
    Values are not looked up in other chunks: a chunk is referred to by the panels of one output only, which a level
    takes one after another, so that the level frees the chunks of the panels it has refined as it goes."""
    R, dev = jobs.unit.numel(), jobs.unit.device
    vals = [getattr(jobs, name) for name, _, _ in SLOTS]
    k = len(SLOTS)
    keys = torch.stack([torch.cat([torch.full((R,), fam, dtype=torch.long, device=dev) for _, _, fam in SLOTS]),
                        jobs.unit.repeat(k),
                        torch.cat([_bits(getattr(jobs, t).to(torch.float64)) for _, t, _ in SLOTS])], 1)
    _, group = torch.unique(keys, dim=0, return_inverse=True)
    pos = torch.arange(k * R, device=dev)
    first = torch.full((int(group.max()) + 1,), k * R, dtype=torch.long, device=dev)
    first = first.scatter_reduce(0, group, pos, reduce="amin")[group]  # each value's first of its key
    new = first == pos
    ids = torch.full((k * R,), -1, dtype=torch.long, device=dev)
    # the firsts of their key are stored; every other value is compared with its first once the firsts have ids
    order = torch.nonzero(new).reshape(-1)
    ids[order] = pool.size + torch.arange(order.numel(), device=dev)
    size = pool.size + order.numel()
    stored = [order]
    for s in range(k):
        rows = torch.nonzero(~new[s * R:(s + 1) * R]).reshape(-1)
        if not rows.numel():
            continue
        c = first[s * R + rows]
        ref = vals[s].new_empty(rows.numel(), vals[s].shape[1])
        slot = c.div(R, rounding_mode="floor")
        for t in slot.unique().tolist():
            at = slot == t
            ref[at] = vals[t].index_select(0, c[at] - t * R)
        same = (_bits(vals[s].index_select(0, rows)) == _bits(ref)).all(1)
        del ref
        ids[s * R + rows[same]] = ids[c[same]]
        miss = s * R + rows[~same]
        ids[miss] = size + torch.arange(miss.numel(), device=dev)
        size += miss.numel()
        stored.append(miss)
    fresh = torch.cat(stored)  # in the order of their indices
    chunk = vals[0].new_empty(fresh.numel(), vals[0].shape[1])
    slot = fresh.div(R, rounding_mode="floor")
    for s in slot.unique().tolist():
        at = torch.nonzero(slot == s).reshape(-1)
        chunk[at] = vals[s].index_select(0, fresh[at] - s * R)
    pool.chunks.append(chunk)
    pool.starts.append(pool.size)
    pool.refs.append(0)
    pool.size = size
    ids = ids.reshape(k, R).T.contiguous()
    none = jobs.est.new_empty(R, 0)  # not a view: a view would keep the panels' vectors alive
    scalars = {f: none if f in _VECTORS else getattr(jobs, f) for f in jobs.__dataclass_fields__}
    return Packed(Jobs(**scalars), ids, jobs.est, torch.tensor([len(pool.chunks) - 1], device=dev))


def unpack(p: Packed, pool: Pool) -> Jobs:
    """The open panels ``p`` with their values from ``pool``: new tensors, equal bit for bit to those packed."""
    fields = {f: getattr(p.jobs, f) for f in p.jobs.__dataclass_fields__}
    for s, (name, _, _) in enumerate(SLOTS):
        fields[name] = pool.gather(p.ids[:, s], p.est)
    fields["est"] = p.est
    return Jobs(**fields)


def ends(p: Packed, pool: Pool) -> tuple[Tensor, Tensor]:
    """:math:`h` at the ends of the open panels ``p``, ``(R, O)`` each, from ``pool``."""
    return pool.gather(p.ids[:, 0], p.est), pool.gather(p.ids[:, 1], p.est)
