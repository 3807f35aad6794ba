"""Graph networks by hand of the ninth round (tests/_round9_cases.py), on ``XS`` (n, 6, 3) read as 6 nodes with 3
features each, over one fixed directed graph: messages summed by ``scatter_add`` or ``index_add``, a GAT segment
softmax, a GraphSAGE mean aggregator by ``scatter_reduce("mean")``, and the adjacency as a dense or a sparse
matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: A directed graph on 6 nodes (a ring both ways and two chords), self loops added by the models.
EDGES = torch.tensor([[0, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 0, 0, 2],
                      [1, 2, 3, 4, 5, 0, 0, 1, 2, 3, 4, 5, 3, 5]])
NODES = 6


def _with_self_loops() -> tuple[Tensor, Tensor]:
    loops = torch.arange(NODES)
    return torch.cat([EDGES[0], loops]), torch.cat([EDGES[1], loops])


class GCNScatterAdd(nn.Module):
    """Two graph convolutions by hand: messages ``h[src] / sqrt(deg[src] deg[dst])`` summed into their targets with
    ``Tensor.scatter_add``, ReLU, mean over the nodes."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head, self.relu = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 3), nn.ReLU()
        src, dst = _with_self_loops()
        deg = torch.zeros(NODES).scatter_add(0, dst, torch.ones(len(dst)))
        self.register_buffer("src", src)
        self.register_buffer("dst", dst)
        self.register_buffer("norm", (deg[src] * deg[dst]).rsqrt())

    def propagate(self, h: Tensor) -> Tensor:
        msg = h[:, self.src] * self.norm[:, None]
        index = self.dst[None, :, None].expand(len(h), -1, h.shape[-1])
        return torch.zeros_like(h).scatter_add(1, index, msg)

    def forward(self, x):
        h = self.relu(self.propagate(self.a(x)))
        return self.head(self.relu(self.propagate(self.b(h))).mean(1))


class GATSegmentSoftmax(nn.Module):
    """A graph attention layer by hand: scores ``LeakyReLU(s_src[src] + s_dst[dst])``, a softmax over each target's
    incoming edges (``scatter_reduce("amax", include_self=False)`` subtracted, ``exp``, ``index_add_`` of the
    denominators) and the weighted messages summed with ``index_add_``; ELU, mean over the nodes. With
    ``inplace=False`` the out-of-place ``index_add`` (the fix its refusal names)."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.inplace = inplace
        self.w, self.head = nn.Linear(3, 6, bias=False), nn.Linear(6, 3)
        self.att_src, self.att_dst = nn.Parameter(torch.randn(6) * 0.5), nn.Parameter(torch.randn(6) * 0.5)
        self.act = nn.LeakyReLU(0.2)
        src, dst = _with_self_loops()
        self.register_buffer("src", src)
        self.register_buffer("dst", dst)

    def forward(self, x):
        h = self.w(x)
        e = self.act((h @ self.att_src)[:, self.src] + (h @ self.att_dst)[:, self.dst])
        top = torch.full((len(x), NODES), float("-inf"), dtype=h.dtype)
        top = top.scatter_reduce(1, self.dst[None].expand(len(x), -1), e, "amax", include_self=False)
        ex = torch.exp(e - top[:, self.dst])
        add = torch.Tensor.index_add_ if self.inplace else torch.Tensor.index_add
        den = add(torch.zeros(len(x), NODES, dtype=h.dtype), 1, self.dst, ex)
        alpha = ex / den[:, self.dst]
        out = add(torch.zeros_like(h), 1, self.dst, alpha[..., None] * h[:, self.src])
        return self.head(F.elu(out).mean(1))


class AdjacencyGCN(nn.Module):
    """Kipf and Welling's GCN as their code writes it: the normalised adjacency ``D^-1/2 (A + I) D^-1/2`` as a
    buffer, dense (``adj @ h``) or, with ``sparse``, a ``torch.sparse_coo_tensor`` multiplied by ``torch.sparse.mm``
    per graph; tanh, mean over the nodes."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        src, dst = _with_self_loops()
        deg = torch.zeros(NODES).scatter_add(0, dst, torch.ones(len(dst)))
        adj = torch.sparse_coo_tensor(torch.stack([dst, src]), (deg[src] * deg[dst]).rsqrt(), (NODES, NODES))
        self.register_buffer("adj", adj.coalesce() if sparse else adj.to_dense())
        self.a, self.head, self.sparse = nn.Linear(3, 6), nn.Linear(6, 3), sparse

    def forward(self, x):
        h = self.a(x)
        out = torch.stack([torch.sparse.mm(self.adj, g) for g in h]) if self.sparse else self.adj @ h
        return self.head(torch.tanh(out).mean(1))


class SageMean(nn.Module):
    """GraphSAGE with the mean aggregator: neighbours averaged by ``scatter_reduce("mean", include_self=False)`` into
    a zero tensor the shape of the input, concatenated with the node's own features; ReLU, mean over the nodes."""

    def __init__(self):
        super().__init__()
        self.w, self.head, self.relu = nn.Linear(6, 5), nn.Linear(5, 3), nn.ReLU()
        self.register_buffer("src", EDGES[0].clone())
        self.register_buffer("dst", EDGES[1].clone())

    def forward(self, x):
        index = self.dst[None, :, None].expand(len(x), -1, x.shape[-1])
        mean = torch.zeros_like(x).scatter_reduce(1, index, x[:, self.src], "mean", include_self=False)
        return self.head(self.relu(self.w(torch.cat([x, mean], -1))).mean(1))
