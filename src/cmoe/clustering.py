"""Balanced clustering of FFN neurons into experts (method.md sections 3-4).

Inputs are the ATopK markers in compact form: ``topk_idx [T, K]`` holds, for each of the T
calibration tokens, the K neuron ids marked active (the dense marker matrix
``M in {0,1}^(T x f)`` has ``M[t, topk_idx[t, k]] = 1``). Nothing here builds the dense
``[T, f]`` matrix or any ``[n, n]`` matrix: costs are accumulated from the ``T*K`` marker
entries into ``[n, k]`` and centroids are ``[T, k]``.

Public surface:

- :func:`shared_and_candidates`: the shared expert's neurons (highest activation rate) and
  the rest.
- :func:`marker_l1_cost`: L1 distance between marker columns and centroid columns.
- :func:`balanced_assignment`: exact minimum-cost assignment of n items to k clusters of
  exactly ``n / k`` members (a transportation problem), solved without the ``[n, n]``
  matrix of the reference's linear assignment formulation.
- :func:`balanced_kmeans`: the CMoE clustering (initial centroids, balanced assignment,
  centroid update, representative neurons), returning a :class:`ClusterResult`.

Tensors in, tensors out on the input's device; the assignment solver runs on CPU (numpy).
Inside :func:`balanced_kmeans` costs are computed scaled by the cluster size, so they are
integers held exactly in float64: ties are exact and results are identical on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ClusterResult",
    "balanced_assignment",
    "balanced_kmeans",
    "marker_l1_cost",
    "shared_and_candidates",
]

# Largest [entries, k] block materialised at once when accumulating costs.
_CHUNK_ELEMS = 1 << 22
# Cluster size from which the assignment solver warm-starts from a half-size problem.
_WARM_MIN_SIZE = 32


# ----------------------------------------------------------------------------------------
# Balanced assignment (transportation problem with k sinks of capacity `size`)
# ----------------------------------------------------------------------------------------


def balanced_assignment(cost: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """Exact balanced assignment: labels ``[n]`` minimising ``sum_i cost[i, labels[i]]``
    subject to every one of the k clusters receiving exactly ``size`` items.

    ``cost`` is ``[n, k]`` with ``n == k * size``. The optimum equals that of the square
    linear assignment problem on ``cost`` with every column repeated ``size`` times (the
    reference's formulation, solved there by Jonker-Volgenant on an ``[n, n]`` matrix).

    Solver: successive shortest paths (min-cost flow) on the transportation network with
    k sink nodes, never an ``[n, n]`` matrix. Items are inserted one after another; each
    insertion follows a shortest path from the new item to a cluster with room, through
    chains of "move one member of cluster a to cluster b" edges. Cluster potentials keep
    reduced costs non-negative (items whose cheapest reduced cluster has room are placed
    at once, in vectorised runs), and the best member to move along each of the ``k x k``
    edges is cached per cluster, so an insertion that displaces members costs ``O(k^2)``
    per Bellman-Ford sweep plus ``O(n)`` per moved member. The potentials start from
    those of the same problem solved on an evenly strided half of the items
    (recursively), which puts most items straight into their final cluster; items are
    inserted in a fixed pseudo-random order. Neither choice changes the optimum, only the
    speed (2 CPU cores: n=25,000 under 1 s for k=8, 1-2 s for k=64; ``python -m
    cmoe.clustering`` prints the table). scipy's HiGHS on the ``n*k``-variable LP was
    measured first and is far too slow on these degenerate problems (n=6,880, k=5: about
    a minute; n=25,000, k=8: 20-70 s). The result is checked with the dual
    certificate (no negative cycle of member moves among the clusters, the optimality
    condition of the transportation problem); a violation beyond float round-off would be
    removed by cycle cancelling. Deterministic. Costs are taken as float64; with
    integer-valued costs (exact in float64) the optimum is exact, otherwise it is exact
    up to round-off of the order of ``1e-9 * max|cost|``.

    Raises ``ValueError`` for a cost that is not 2-D, not finite, or with ``n != k * size``.
    """
    c = _check_cost(cost, size)
    labels, v = _solve(c, size)
    labels = _cancel_negative_cycles(c, labels, potentials=v)
    return labels


def _check_cost(cost, size) -> np.ndarray:
    if isinstance(cost, torch.Tensor):
        cost = cost.detach().to("cpu", torch.float64).numpy()
    c = np.ascontiguousarray(np.asarray(cost, dtype=np.float64))
    if c.ndim != 2:
        raise ValueError(f"cost must be a 2-D [n, k] matrix, got shape {tuple(c.shape)}")
    n, k = c.shape
    if isinstance(size, bool) or int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if k < 1 or n != k * int(size):
        raise ValueError(
            f"balanced assignment needs n == k * size: cost has n={n} items and k={k} "
            f"clusters, size={size} (k * size = {k * int(size)})"
        )
    if not np.isfinite(c).all():
        raise ValueError("cost contains NaN or infinite entries")
    return c


def _row_moves(c: np.ndarray, members: np.ndarray, a: int) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest move out of cluster a to every cluster b: ``min_{i in a} c[i,b] - c[i,a]``
    and its item (lowest id on ties); ``inf`` towards a itself and when a is empty."""
    k = c.shape[1]
    if members.size == 0:
        return np.full(k, np.inf), np.full(k, -1, dtype=np.int64)
    diff = c[members] - c[members, a][:, None]  # [m, k]
    arg = diff.argmin(0)
    w = diff[arg, np.arange(k)]
    idx = members[arg]
    w[a], idx[a] = np.inf, -1
    return w, idx


def _remove_member(W, Warg, ct: np.ndarray, labels: np.ndarray, a: int, item: int) -> None:
    """Update the cached moves out of cluster a after ``item`` left it (``labels`` already
    updated): only the moves whose best member was ``item`` change."""
    cols = np.flatnonzero(Warg[a] == item)
    if cols.size == 0:
        return
    members = np.flatnonzero(labels == a)
    if members.size == 0:
        W[a, cols], Warg[a, cols] = np.inf, -1
        return
    diff = ct[np.ix_(cols, members)] - ct[a, members]  # [cols, m]
    j = diff.argmin(1)
    W[a, cols] = diff[np.arange(cols.size), j]
    Warg[a, cols] = members[j]


def _add_member(W: np.ndarray, Warg: np.ndarray, c: np.ndarray, item: int, b: int) -> None:
    """Update the cached moves out of cluster b after ``item`` joined it."""
    w = c[item] - c[item, b]
    w[b] = np.inf
    upd = w < W[b]
    W[b, upd] = w[upd]
    Warg[b, upd] = item


def _add_members(W, Warg, c: np.ndarray, items: np.ndarray, clusters: np.ndarray) -> None:
    """Update the cached moves after ``items`` joined ``clusters`` (in this order; on
    ties the move keeps the member that was there first)."""
    k = c.shape[1]
    order = np.argsort(clusters, kind="stable")
    items, clusters = items[order], clusters[order]
    cuts = np.flatnonzero(np.diff(clusters)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, items.size]):
        b, it = int(clusters[lo]), items[lo:hi]
        diff = c[it] - c[it, b][:, None]  # [m, k]
        a = diff.argmin(0)
        w = diff[a, np.arange(k)]
        w[b] = np.inf
        upd = w < W[b]
        W[b, upd] = w[upd]
        Warg[b, upd] = it[a[upd]]


def _solve(c: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact solve, warm-started: the cluster potentials of an exactly solved, evenly
    strided half of the items (recursively) are near the optimal duals of the whole
    problem, so most items then go straight to their final cluster. The warm start only
    changes the speed; the result is the exact optimum of ``c`` either way."""
    n, k = c.shape
    v0 = None
    if size >= _WARM_MIN_SIZE:
        sub = size // 2
        idx = (np.arange(k * sub) * n) // (k * sub)  # [k*sub], spread over all items
        _, v0 = _solve(c[idx], sub)
    order = np.random.default_rng(0).permutation(n)  # fixed order: deterministic
    labels, v = _ssp(c[order], size, v0)
    out = np.empty_like(labels)
    out[order] = labels
    return out, v


def _ssp(
    c: np.ndarray, size: int, v0: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Successive shortest paths; returns labels and cluster potentials ``v`` such that
    every item i in cluster j satisfies ``c[i,j] - v[j] <= c[i,b] - v[b]`` for all b
    (complementary slackness, up to round-off)."""
    n, k = c.shape
    labels = np.full(n, -1, dtype=np.int64)
    count = np.zeros(k, dtype=np.int64)
    v = np.zeros(k) if v0 is None else v0.copy()  # cluster potentials (any start is valid)
    W = np.full((k, k), np.inf)  # W[a, b]: cheapest move of a member of a to b
    Warg = np.full((k, k), -1, dtype=np.int64)
    ct = np.ascontiguousarray(c.T)  # [k, n]
    ar = np.arange(k)
    i, block = 0, 16
    while i < n:
        # Bulk: the next items whose cheapest reduced cluster (lowest index on ties) still
        # has room when their turn comes. Each is a zero-reduced-cost path: inserted as
        # is, v stays valid. Same result as one at a time.
        r = c[i : i + block] - v  # [B, k]
        j = np.where(count < size, r, np.inf).argmin(1)  # [B], cheapest with room now
        B = j.size
        seen = np.zeros((B, k), dtype=np.int64)
        seen[np.arange(B), j] = 1
        ok = seen.cumsum(0)[np.arange(B), j] + count[j] <= size
        ok &= r[np.arange(B), j] <= r.min(1)
        m = B if ok.all() else int(ok.argmin())
        if m:
            labels[i : i + m] = j[:m]
            count += np.bincount(j[:m], minlength=k)
            _add_members(W, Warg, c, np.arange(i, i + m), j[:m])
            i += m
        block = min(2 * block, 4096) if m == B else 16
        if m == B:
            continue
        # One item: its cheapest reduced clusters are full, or the last ones filled up
        r = c[i] - v
        free = count < size
        j1 = int(np.where(free, r, np.inf).argmin())
        if r[j1] <= r.min():  # a cheapest cluster has room
            labels[i] = j1
            count[j1] += 1
            _add_member(W, Warg, c, i, j1)
            i += 1
            continue
        d = r - r.min()  # reduced distance from the new item, >= 0
        pred = np.full(k, -1, dtype=np.int64)  # -1: reached directly from the new item
        Rt = W.T + v[None, :] - v[:, None]  # Rt[b, a]: reduced cost of a move a -> b, >= 0
        np.maximum(Rt, 0.0, out=Rt)
        # Bellman-Ford (Jacobi sweeps); non-negative weights, paths are a few hops long
        while True:
            cand = Rt + d[None, :]  # [k(b), k(a)]
            a = cand.argmin(1)
            best = cand[ar, a]
            better = best < d
            if not better.any():
                break
            d[better] = best[better]
            pred[better] = a[better]
        free = np.flatnonzero(free)
        t = int(free[np.argmin(d[free] + v[free])])
        # walk the path back from t, moving one member along every cluster-to-cluster edge
        b, path = t, []
        while pred[b] >= 0:
            a_ = int(pred[b])
            path.append((a_, b, int(Warg[a_, b])))
            b = a_
        for a_, b_, item in path:
            labels[item] = b_
        labels[i] = b
        count[t] += 1
        v += d
        # refresh the cached moves of the clusters on the path
        for a_, _, item in path:
            _remove_member(W, Warg, ct, labels, a_, item)
        _add_member(W, Warg, c, i, b)
        for _, b_, item in path:
            _add_member(W, Warg, c, item, b_)
        i += 1
    return labels, v


def _cancel_negative_cycles(
    c: np.ndarray, labels: np.ndarray, potentials: np.ndarray | None = None
) -> np.ndarray:
    """Make a balanced assignment optimal: repeatedly find a negative cycle of member moves
    among the clusters and apply it. An assignment is optimal iff no such cycle exists.
    ``potentials`` (from :func:`_ssp`) give a quick certificate that skips the search."""
    n, k = c.shape
    labels = labels.copy()
    tol = 1e-9 * max(1.0, float(np.abs(c).max()))
    W = np.empty((k, k))
    Warg = np.empty((k, k), dtype=np.int64)
    for a in range(k):
        W[a], Warg[a] = _row_moves(c, np.flatnonzero(labels == a), a)
    if potentials is not None:
        R = W + potentials[:, None] - potentials[None, :]
        if R.min() >= -tol:
            return labels
    ar = np.arange(k)
    while True:
        # Bellman-Ford from a virtual source joined to every cluster at cost 0
        d = np.zeros(k)
        pred = np.full(k, -1, dtype=np.int64)
        last = None
        for _ in range(k + 1):
            cand = d[:, None] + W
            a = cand.argmin(0)
            best = cand[a, ar]
            better = best < d - tol
            if not better.any():
                last = None
                break
            d[better] = best[better]
            pred[better] = a[better]
            last = int(np.flatnonzero(better)[0])
        if last is None:
            return labels
        # a node still improving after k sweeps leads back into a negative cycle
        x = last
        for _ in range(k):
            x = int(pred[x])
            if x < 0:  # no cycle behind it: only round-off kept improving
                return labels
        cycle, y = [], x
        for _ in range(k):
            cycle.append((int(pred[y]), y))
            y = int(pred[y])
            if y == x or y < 0:
                break
        if y != x:
            return labels
        if sum(W[a_, b_] for a_, b_ in cycle) >= -tol:  # round-off only
            return labels
        moves = [(int(Warg[a_, b_]), b_) for a_, b_ in cycle]
        for item, b_ in moves:
            labels[item] = b_
        for a_ in {a_ for a_, _ in cycle} | {b_ for _, b_ in cycle}:
            W[a_], Warg[a_] = _row_moves(c, np.flatnonzero(labels == a_), a_)


# ----------------------------------------------------------------------------------------
# Marker costs (torch, any device)
# ----------------------------------------------------------------------------------------


def _check_topk(topk_idx: torch.Tensor, f: int | None = None) -> torch.Tensor:
    if not isinstance(topk_idx, torch.Tensor) or topk_idx.dim() != 2:
        raise ValueError("topk_idx must be a 2-D [T, K] tensor of neuron ids")
    dt = topk_idx.dtype
    if dt.is_floating_point or dt.is_complex or dt == torch.bool:
        raise ValueError(f"topk_idx must hold integer neuron ids, got dtype {topk_idx.dtype}")
    idx = topk_idx.long()
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or (f is not None and hi >= f):
            raise ValueError(f"topk_idx ids must lie in [0, {f}), found [{lo}, {hi}]")
        s = idx.sort(dim=1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise ValueError("topk_idx has a neuron repeated within one token's row")
    return idx


def _check_candidates(candidates: torch.Tensor, f: int | None, device) -> torch.Tensor:
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 1:
        raise ValueError("candidates must be a 1-D tensor of neuron ids")
    if candidates.dtype.is_floating_point or candidates.dtype.is_complex:
        raise ValueError(f"candidates must hold integer neuron ids, got dtype {candidates.dtype}")
    cand = candidates.to(device=device, dtype=torch.long)
    if cand.numel():
        lo, hi = int(cand.min()), int(cand.max())
        if lo < 0 or (f is not None and hi >= f):
            raise ValueError(f"candidate ids must lie in [0, {f}), found [{lo}, {hi}]")
        if torch.unique(cand).numel() != cand.numel():
            raise ValueError("candidates contains repeated neuron ids")
    return cand


def _candidate_entries(
    idx: torch.Tensor, cand: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The marker entries that belong to candidates: token ``t [E]`` and candidate
    position ``p [E]`` (index into ``cand``), with ``M[t, cand[p]] = 1``."""
    T, K = idx.shape
    flat = idx.reshape(-1)  # [T*K]
    sorted_c, order = torch.sort(cand)
    pos = torch.searchsorted(sorted_c, flat).clamp_(max=max(cand.numel() - 1, 0))
    hit = sorted_c[pos] == flat if cand.numel() else torch.zeros_like(flat, dtype=torch.bool)
    t = torch.arange(T * K, device=idx.device).div_(K, rounding_mode="floor")[hit]
    return t, order[pos[hit]]


def _scaled_l1(
    t: torch.Tensor, p: torch.Tensor, n: int, num: torch.Tensor, den: float
) -> torch.Tensor:
    """``den * L1(M[:, i], num[:, j] / den)`` for every candidate i and centroid j, [n, k]
    float64: ``sum_t num[t, j] + sum_{t : M[t,i]=1} (den - 2 num[t, j])``. Exact when
    ``num`` is integer-valued (counts)."""
    num = num.to(torch.float64)
    k = num.shape[1]
    out = num.sum(0).expand(n, k).clone()  # [n, k]
    step = max(1, _CHUNK_ELEMS // max(k, 1))
    for s in range(0, t.numel(), step):
        out.index_add_(0, p[s : s + step], den - 2.0 * num[t[s : s + step]])
    return out


def _counts(t: torch.Tensor, p: torch.Tensor, lab: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """``C[t, j]`` = number of candidates with label j active at token t, [T, k] float64
    (labels < 0 are not counted)."""
    j = lab[p]
    keep = j >= 0
    flat = t[keep] * k + j[keep]
    return torch.bincount(flat, minlength=T * k).view(T, k).to(torch.float64)


def marker_l1_cost(
    topk_idx: torch.Tensor, centroids: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """L1 distance between each candidate's marker column and each centroid column.

    ``topk_idx [T, K]``: active neuron ids per token (distinct within a row);
    ``centroids [T, k]`` float; ``candidates [n]`` neuron ids. Returns ``[n, k]`` float64
    on ``topk_idx``'s device::

        L1(M[:, i], c) = sum_t c_t + sum_{t : M[t, i] = 1} (1 - 2 c_t)

    accumulated over the ``T*K`` marker entries (no dense ``[T, f]`` matrix), in float64.
    Exact for integer-valued centroids (binary marker columns, counts); otherwise within
    float64 round-off, whose last bits may depend on the device's order of summation.
    (:func:`balanced_kmeans` works on counts, scaled by the cluster size, so its costs
    are always exact.)
    """
    idx = _check_topk(topk_idx)
    if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2:
        raise ValueError("centroids must be a 2-D [T, k] tensor")
    if centroids.shape[0] != idx.shape[0]:
        raise ValueError(
            f"centroids has {centroids.shape[0]} rows but topk_idx has {idx.shape[0]} tokens"
        )
    cand = _check_candidates(candidates, None, idx.device)
    t, p = _candidate_entries(idx, cand)
    return _scaled_l1(t, p, cand.numel(), centroids.to(idx.device), 1.0)


# ----------------------------------------------------------------------------------------
# Shared expert and balanced k-means (method.md sections 3-4)
# ----------------------------------------------------------------------------------------


def _by_rate(rates: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Positions into ``ids`` ordered by rate descending, ties by lower neuron id."""
    by_id = torch.argsort(ids, stable=True)
    return by_id[torch.argsort(rates[by_id], descending=True, stable=True)]


def shared_and_candidates(
    rates: torch.Tensor, n_shared: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the f neurons by activation rate ``rates [f]``: the ``n_shared`` highest
    rates (ties: lower neuron id first) form the shared expert; the others are the
    candidates for routed experts. Returns ``(shared_ids, candidate_ids)``, both sorted
    ascending, long, on ``rates``' device."""
    if not isinstance(rates, torch.Tensor) or rates.dim() != 1:
        raise ValueError("rates must be a 1-D [f] tensor")
    if not bool(torch.isfinite(rates).all()):
        raise ValueError("rates contains NaN or infinite values")
    f = rates.numel()
    if isinstance(n_shared, bool) or int(n_shared) != n_shared or not 0 <= n_shared <= f:
        raise ValueError(f"n_shared must be an integer in [0, f={f}], got {n_shared!r}")
    ids = torch.arange(f, device=rates.device)
    order = _by_rate(rates, ids)
    return order[: int(n_shared)].sort().values, order[int(n_shared) :].sort().values


@dataclass
class ClusterResult:
    """Outcome of :func:`balanced_kmeans` (tensors on the input's device).

    - ``labels [n]``: cluster of each candidate, in the order candidates were given.
    - ``members [k, size]``: neuron ids of each cluster, ascending.
    - ``representatives [k]``: neuron id of each cluster's representative.
    - ``cost``: total L1 cost of the last assignment (against the centroids it used).
    - ``iterations``: number of assignments made.
    - ``cohesion``: mean over candidates of L1(marker column, own final centroid) / T.
    - ``converged``: the last assignment repeated the previous one.
    """

    labels: torch.Tensor
    members: torch.Tensor
    representatives: torch.Tensor
    cost: float
    iterations: int
    cohesion: float
    converged: bool = False


def balanced_kmeans(
    topk_idx: torch.Tensor,
    f: int,
    candidates: torch.Tensor,
    rates: torch.Tensor,
    k: int,
    iters: int | None = 1,
    max_iters: int = 100,
) -> ClusterResult:
    """Cluster the ``n`` candidate neurons into k experts of exactly ``n / k`` neurons
    (method.md section 4), from the compact ATopK markers ``topk_idx [T, K]`` over f
    neurons and the activation rates ``rates [f]``.

    1. Initial centroids: marker columns of the k candidates with the highest rate (ties:
       lower neuron id); cluster j starts from the j-th of them.
    2. Assignment: :func:`balanced_assignment` on the L1 costs between marker columns
       and centroids (exact optimum; cluster size n / k).
    3. Update: centroid j = mean marker column of its members.
    Steps 2-3 run ``iters`` times (1 = the reference), or with ``iters=None`` until the
    assignment stops changing (at most ``max_iters`` assignments); a repeated assignment
    also ends a run with ``iters > 1`` early (the rest would repeat it).

    Representatives (our reading of the reference): after the last assignment the
    centroids are recomputed from the final members (step 3), and each cluster's
    representative is the member whose marker column is closest in L1 to that centroid;
    ties go to the lowest neuron id. Cohesion uses the same final centroids.

    Costs are computed scaled by the cluster size (integers, exact in float64), so ties
    are resolved identically on every device. Raises ``ValueError`` on inconsistent
    shapes, ids out of range, or ``n`` not divisible by k.
    """
    idx = _check_topk(topk_idx, f)
    device = idx.device
    cand = _check_candidates(candidates, f, device)
    if not isinstance(rates, torch.Tensor) or rates.shape != (f,):
        raise ValueError(f"rates must be a [f={f}] tensor, got {getattr(rates, 'shape', None)}")
    if not bool(torch.isfinite(rates).all()):
        raise ValueError("rates contains NaN or infinite values")
    n = cand.numel()
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= max(n, 1) or n == 0:
        raise ValueError(f"k must be an integer in [1, n={n}] with n > 0, got {k!r}")
    k = int(k)
    if n % k:
        raise ValueError(f"{n} candidate neurons cannot form {k} clusters of equal size")
    if iters is not None and (int(iters) != iters or iters < 1):
        raise ValueError(f"iters must be >= 1 or None (to convergence), got {iters!r}")
    if int(max_iters) != max_iters or max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters!r}")
    size, T = n // k, idx.shape[0]
    limit = int(max_iters) if iters is None else int(iters)

    t, p = _candidate_entries(idx, cand)  # marker entries of candidates
    init = _by_rate(rates.to(device)[cand], cand)[:k]  # [k] positions into cand
    lab = torch.full((n,), -1, dtype=torch.long, device=device)
    lab[init] = torch.arange(k, device=device)
    num, den = _counts(t, p, lab, T, k), 1.0  # centroids = num / den, [T, k]

    labels, total, converged, it = None, 0.0, False, 0
    while it < limit and not converged:
        it += 1
        cost = _scaled_l1(t, p, n, num, den)  # [n, k] integers in float64
        new = torch.from_numpy(balanced_assignment(cost.cpu().numpy(), size)).to(device)
        total = float(cost.gather(1, new[:, None]).sum()) / den
        converged = labels is not None and torch.equal(new, labels)
        labels = new
        num, den = _counts(t, p, labels, T, k), float(size)

    # distance of every candidate to its own final centroid (scaled by den), [n]
    dist = num.sum(0)[labels]
    dist.index_add_(0, p, den - 2.0 * num[t, labels[p]])
    by_id = torch.argsort(cand, stable=True)
    grouped = by_id[torch.argsort(labels[by_id], stable=True)].view(k, size)  # [k, size]
    members = cand[grouped]
    reps = members.gather(1, dist[grouped].argmin(1, keepdim=True)).squeeze(1)  # first min
    return ClusterResult(
        labels=labels,
        members=members,
        representatives=reps,
        cost=total,
        iterations=it,
        cohesion=float(dist.sum()) / den / n / max(T, 1),
        converged=converged,
    )


def _synthetic_markers(
    T: int, K: int, f: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATopK-like markers ``[T, K]`` and rates ``[f]``: neurons with power-law popularity;
    each token picks one of 32 topics and draws K distinct neurons favouring popular ones
    and its topic's slice of the neurons (Gumbel top-k, 256 tokens at a time)."""
    g = torch.Generator().manual_seed(seed)
    logw = -0.8 * torch.arange(1, f + 1).log()[torch.randperm(f, generator=g)]  # [f]
    topic = torch.randint(0, 32, (T,), generator=g)
    idx = torch.empty(T, K, dtype=torch.long)
    for s in range(0, T, 256):
        u = torch.rand(min(256, T - s), f, generator=g).clamp_(min=1e-12)
        own = (torch.arange(f)[None, :] % 32) == topic[s : s + 256, None]
        idx[s : s + 256] = (logw + 1.5 * own - (-u.log()).log()).topk(K, dim=1).indices
    return idx, torch.bincount(idx.reshape(-1), minlength=f) / T


def _benchmark() -> None:
    """``python -m cmoe.clustering``: time :func:`balanced_assignment` at real layer shapes
    on the costs of the first k-means step (synthetic markers, T = 16,384, K = 10, a
    quarter of the neurons shared), against scipy's linear_sum_assignment on the
    column-repeated ``[n, n]`` matrix (the reference) where that takes seconds, not
    minutes; then the whole :func:`balanced_kmeans`, one step and to convergence."""
    import platform
    import time

    from scipy.optimize import linear_sum_assignment

    print(f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"{'n':>6} {'k':>3} | {'assign s':>8} {'square LAP s':>12} {'same optimum':>12} | "
        f"{'kmeans 1 step s':>15} {'to convergence s':>16} {'steps':>5}"
    )
    for n, k in [(960, 5), (6880, 5), (25000, 8), (25000, 64)]:
        n -= n % k
        T, f = 16384, n + n // 3
        idx, rates = _synthetic_markers(T, 10, f)
        _, cand = shared_and_candidates(rates, f - n)
        t, p = _candidate_entries(idx, cand)
        lab = torch.full((n,), -1, dtype=torch.long)
        lab[_by_rate(rates[cand], cand)[:k]] = torch.arange(k)
        cost = _scaled_l1(t, p, n, _counts(t, p, lab, T, k), 1.0).numpy()
        t0 = time.perf_counter()
        ours = balanced_assignment(cost, n // k)
        t_ours = time.perf_counter() - t0
        ref, same = "-", "-"
        if n <= 8000:
            t0 = time.perf_counter()
            r, col = linear_sum_assignment(np.repeat(cost, n // k, axis=1))
            ref = f"{time.perf_counter() - t0:.2f}"
            same = str(cost[r, col // (n // k)].sum() == cost[np.arange(n), ours].sum())
        t0 = time.perf_counter()
        balanced_kmeans(idx, f, cand, rates, k, iters=1)
        t_one = time.perf_counter() - t0
        t0 = time.perf_counter()
        conv = balanced_kmeans(idx, f, cand, rates, k, iters=None, max_iters=30)
        t_conv = time.perf_counter() - t0
        print(
            f"{n:>6} {k:>3} | {t_ours:>8.2f} {ref:>12} {same:>12} | "
            f"{t_one:>15.2f} {t_conv:>16.2f} {conv.iterations:>5}"
        )


if __name__ == "__main__":
    _benchmark()
