"""Balanced clustering of neurons into experts: the exact balanced assignment against
scipy's square linear assignment (the reference formulation), marker costs against a
dense brute force, and balanced k-means on planted co-activation groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from cmoe.clustering import (
    ClusterResult,
    _cancel_negative_cycles,
    balanced_assignment,
    balanced_kmeans,
    marker_l1_cost,
    shared_and_candidates,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def square_lap_cost(cost: np.ndarray, size: int) -> float:
    """Optimum of the reference formulation: each column repeated `size` times."""
    r, col = linear_sum_assignment(np.repeat(cost, size, axis=1))
    return float(cost[r, col // size].sum())


def total(cost: np.ndarray, labels: np.ndarray) -> float:
    return float(cost[np.arange(len(labels)), labels].sum())


def dense_markers(topk_idx: torch.Tensor, f: int) -> torch.Tensor:
    M = torch.zeros(topk_idx.shape[0], f, dtype=torch.float64)
    M.scatter_(1, topk_idx.long().cpu(), 1.0)
    return M  # [T, f]


# --------------------------------------------------------------------------- assignment


def _random_costs(rng: np.random.Generator, kind: str, n: int, k: int) -> np.ndarray:
    if kind == "float":
        return rng.random((n, k))
    if kind == "ties":  # integer costs with many duplicates
        return rng.integers(0, 3, size=(n, k)).astype(float)
    if kind == "binary":
        return rng.integers(0, 2, size=(n, k)).astype(float)
    if kind == "skew":  # every item prefers the same clusters: long displacement chains
        return rng.integers(0, 20, size=(n, k)) + 7.0 * np.arange(k)[None, :]
    if kind == "constant":
        return np.full((n, k), 5.0)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["float", "ties", "binary", "skew", "constant"])
def test_balanced_assignment_matches_square_lap(kind):
    rng = np.random.default_rng(["float", "ties", "binary", "skew", "constant"].index(kind))
    # small sizes, and sizes >= 32 where the solver warm-starts from a half-size problem
    shapes = [(1, 1), (1, 7), (2, 1), (3, 5), (5, 3), (4, 9), (7, 6), (2, 40), (3, 48), (5, 33)]
    shapes += [(int(rng.integers(1, 9)), int(rng.integers(1, 20))) for _ in range(12)]
    for k, size in shapes:
        c = _random_costs(rng, kind, k * size, k)
        labels = balanced_assignment(c, size)
        assert labels.shape == (k * size,) and labels.dtype.kind == "i"
        assert np.array_equal(np.bincount(labels, minlength=k), np.full(k, size))
        ref = square_lap_cost(c, size)
        if kind == "float":
            assert total(c, labels) == pytest.approx(ref, rel=1e-12, abs=1e-12)
        else:  # integer costs: sums are exact, the optimum must be hit exactly
            assert total(c, labels) == ref


def test_balanced_assignment_is_not_greedy():
    # greedy (each item to its cheapest cluster with room, in order) costs 1 + 10 = 11;
    # the optimum moves the first item away: 2 + 1 = 3
    c = np.array([[1.0, 2.0], [1.0, 10.0]])
    labels = balanced_assignment(c, 1)
    assert labels.tolist() == [1, 0]
    assert total(c, labels) == 3.0 == square_lap_cost(c, 1)


def test_balanced_assignment_torch_input_and_determinism():
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 4, (240, 6), generator=g).float()
    a = balanced_assignment(c, 40)
    b = balanced_assignment(c.numpy().astype(np.float64), 40)
    assert np.array_equal(a, b)
    assert total(c.double().numpy(), a) == square_lap_cost(c.double().numpy(), 40)


def test_cycle_cancelling_reaches_the_optimum_from_any_start():
    # the safety net behind the solver's certificate: from a round-robin assignment
    rng = np.random.default_rng(1)
    for k, size in [(2, 5), (4, 6), (6, 4), (3, 30)]:
        c = rng.integers(0, 10, size=(k * size, k)).astype(float)
        start = np.arange(k * size) % k
        labels = _cancel_negative_cycles(c, start)
        assert np.array_equal(np.bincount(labels, minlength=k), np.full(k, size))
        assert total(c, labels) == square_lap_cost(c, size)


@pytest.mark.parametrize(
    "cost, size, match",
    [
        (np.zeros((10, 3)), 3, "n == k \\* size"),
        (np.zeros((9, 3)), 2, "n == k \\* size"),
        (np.zeros(9), 3, "2-D"),
        (np.zeros((3, 3, 1)), 1, "2-D"),
        (np.zeros((0, 3)), 1, "n == k \\* size"),
        (np.zeros((6, 3)), 0, "positive integer"),
        (np.zeros((6, 3)), 1.5, "positive integer"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), 1, "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), 1, "NaN or infinite"),
    ],
)
def test_balanced_assignment_rejects_bad_input(cost, size, match):
    with pytest.raises(ValueError, match=match):
        balanced_assignment(cost, size)


# --------------------------------------------------------------------------- marker costs


def _random_topk(T: int, f: int, K: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(T, f, generator=g).topk(K, dim=1).indices  # distinct ids per row


@pytest.mark.parametrize("device", DEVICES)
def test_marker_l1_cost_matches_dense_brute_force(device):
    T, f, K, k = 50, 40, 5, 4
    idx = _random_topk(T, f, K, 0)
    M = dense_markers(idx, f)
    g = torch.Generator().manual_seed(1)
    cand = torch.randperm(f, generator=g)[:23]  # unsorted subset
    for cent in [torch.rand(T, k, generator=g), M[:, cand[:k]].float()]:  # float32 [T, k]
        brute = torch.cdist(M[:, cand].T, cent.double().T, p=1)  # [n, k]
        got = marker_l1_cost(idx.int().to(device), cent.to(device), cand.to(device))
        assert got.shape == (23, k) and got.dtype == torch.float64
        assert got.device.type == device
        torch.testing.assert_close(got.cpu(), brute, rtol=1e-12, atol=1e-12)
        if bool((cent == cent.round()).all()):  # binary centroids: exact
            assert torch.equal(got.cpu(), brute)


def test_marker_l1_cost_rejects_bad_input():
    idx = _random_topk(10, 20, 3, 0)
    with pytest.raises(ValueError, match="rows"):
        marker_l1_cost(idx, torch.zeros(9, 2), torch.arange(4))
    with pytest.raises(ValueError, match="repeated within"):
        marker_l1_cost(torch.tensor([[1, 1, 2]]), torch.zeros(1, 2), torch.arange(4))
    with pytest.raises(ValueError, match="integer"):
        marker_l1_cost(idx.float(), torch.zeros(10, 2), torch.arange(4))


# --------------------------------------------------------------------------- shared expert


def test_shared_and_candidates_picks_top_rates_ties_to_lower_id():
    rates = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5, 0.0])
    shared, cand = shared_and_candidates(rates, 2)
    assert shared.tolist() == [1, 2] and cand.tolist() == [0, 3, 4, 5]
    shared, cand = shared_and_candidates(rates, 4)
    assert shared.tolist() == [1, 2, 3, 4] and cand.tolist() == [0, 5]
    assert shared_and_candidates(rates, 0)[0].numel() == 0
    g = torch.Generator().manual_seed(0)
    rates = torch.randint(0, 7, (300,), generator=g).float() / 7
    shared, cand = shared_and_candidates(rates, 120)
    assert torch.equal(torch.cat([shared, cand]).sort().values, torch.arange(300))
    assert rates[shared].min() >= rates[cand].max()
    # within the boundary rate, the lower ids are shared
    edge = rates[shared].min()
    assert shared[rates[shared] == edge].max() < cand[rates[cand] == edge].min()
    with pytest.raises(ValueError):
        shared_and_candidates(rates, 301)
    with pytest.raises(ValueError):
        shared_and_candidates(torch.tensor([0.1, float("nan")]), 1)


# --------------------------------------------------------------------------- k-means


def planted(k=4, size=12, n_shared=3, T=600, K=6, noise=1, seed=0, skewed=False):
    """Markers with k planted co-activation groups. Each token has a topic g; it activates
    one always-popular shared neuron, group g's hub (so the k hubs are the top-rate
    candidates, one per group), other neurons of group g and `noise` random candidates.
    ``skewed``: topic 0 takes 40 % of the tokens and has a second hub (on in 70 % of them),
    so two initial centroids start in group 0 and one group has none. Ids are shuffled."""
    g = torch.Generator().manual_seed(seed)
    f = n_shared + k * size
    perm = torch.randperm(f, generator=g)
    shared_ids = perm[:n_shared]
    groups = perm[n_shared:].view(k, size)
    probs = torch.tensor([0.4] + [0.6 / (k - 1)] * (k - 1)) if skewed else torch.ones(k)
    topic = torch.multinomial(probs, T, replacement=True, generator=g)
    rows = []
    for t in range(T):
        grp = groups[topic[t]]
        pick = [int(shared_ids[t % n_shared]), int(grp[0])]
        second = skewed and int(topic[t]) == 0
        if second and float(torch.rand(1, generator=g)) < 0.7:
            pick.append(int(grp[1]))
        rest = grp[2:] if second else grp[1:]
        pick += rest[torch.randperm(rest.numel(), generator=g)][: K - noise - len(pick)].tolist()
        while len(pick) < K:
            x = int(groups.reshape(-1)[torch.randint(0, k * size, (1,), generator=g)])
            if x not in pick:
                pick.append(x)
        rows.append(pick)
    idx = torch.tensor(rows)
    rates = torch.bincount(idx.reshape(-1), minlength=f).double() / T
    return idx, f, rates, shared_ids.sort().values, groups


def as_partition(members: torch.Tensor) -> set[frozenset[int]]:
    return {frozenset(row.tolist()) for row in members}


def check_result(res: ClusterResult, idx, f, cand, k):
    n, size = cand.numel(), cand.numel() // k
    assert res.labels.shape == (n,) and res.members.shape == (k, size)
    # every candidate in exactly one cluster, clusters of size n / k, members ascending
    assert torch.equal(res.members.reshape(-1).sort().values, cand.sort().values)
    assert torch.equal(res.members, res.members.sort(dim=1).values)
    assert torch.equal(torch.bincount(res.labels, minlength=k), torch.full((k,), size))
    for j in range(k):
        assert set(res.members[j].tolist()) == set(cand[res.labels == j].tolist())
    # representatives: the member closest (L1) to its final mean centroid, ties -> lowest id
    M = dense_markers(idx, f)
    dist_all = []
    for j in range(k):
        mem = res.members[j]
        cent = M[:, mem].mean(1, keepdim=True)  # [T, 1]
        dist = (M[:, mem] - cent).abs().sum(0)  # [size]
        dist_all.append(dist)
        best = mem[dist == dist.min()].min()
        assert int(res.representatives[j]) == int(best)
    cohesion = torch.cat(dist_all).mean() / idx.shape[0]
    assert res.cohesion == pytest.approx(float(cohesion), rel=1e-12)


def test_balanced_kmeans_recovers_planted_groups():
    idx, f, rates, shared_ids, groups = planted()
    shared, cand = shared_and_candidates(rates, 3)
    assert torch.equal(shared, shared_ids)
    res = balanced_kmeans(idx, f, cand, rates, k=4)
    check_result(res, idx, f, cand, 4)
    assert as_partition(res.members) == as_partition(groups)
    assert res.iterations == 1
    # cluster j starts from the j-th highest-rate candidate: the hubs, by rate
    hubs = groups[:, 0]
    order = sorted(range(4), key=lambda j: (-float(rates[hubs[j]]), int(hubs[j])))
    for j, g in enumerate(order):
        assert set(res.members[j].tolist()) == set(groups[g].tolist())


def test_balanced_kmeans_first_step_is_the_reference():
    # iters=1 against a dense re-implementation of the reference: L1 costs to the
    # top-rate candidates' marker columns, square LAP on the column-repeated matrix
    idx, f, rates, _, _ = planted(k=3, size=10, noise=3, T=300, seed=3)
    shared, cand = shared_and_candidates(rates, 3)
    M = dense_markers(idx, f)
    by_rate = sorted(cand.tolist(), key=lambda i: (-float(rates[i]), i))[:3]
    cost = torch.cdist(M[:, cand].T, M[:, by_rate].T, p=1).numpy()  # [n, k]
    res = balanced_kmeans(idx, f, cand, rates, k=3, iters=1)
    got = cost[np.arange(cand.numel()), res.labels.numpy()].sum()
    assert res.cost == got == square_lap_cost(cost, 10)
    check_result(res, idx, f, cand, 3)


def test_balanced_kmeans_to_convergence_recovers_noisy_groups():
    # heavy noise, one initial centroid per group: one step already finds the groups and
    # iterating keeps them
    idx, f, rates, _, groups = planted(k=4, size=16, T=800, K=7, noise=3, seed=5)
    _, cand = shared_and_candidates(rates, 3)
    one = balanced_kmeans(idx, f, cand, rates, k=4, iters=1)
    conv = balanced_kmeans(idx, f, cand, rates, k=4, iters=None)
    check_result(one, idx, f, cand, 4)
    check_result(conv, idx, f, cand, 4)
    assert not one.converged and conv.converged and conv.iterations >= 2
    assert as_partition(one.members) == as_partition(groups) == as_partition(conv.members)
    assert conv.cohesion <= one.cohesion


def test_balanced_kmeans_to_convergence_improves_a_poor_start():
    # two initial centroids in group 0: the first assignment is poor; iterating with mean
    # centroids lowers the distance of members to their centroids and reaches a fixed point
    idx, f, rates, _, groups = planted(4, 12, n_shared=1, T=800, noise=0, skewed=True)
    _, cand = shared_and_candidates(rates, 1)
    top = sorted(cand.tolist(), key=lambda i: (-float(rates[i]), i))[:4]
    assert set(top) >= {int(groups[0, 0]), int(groups[0, 1])}
    one = balanced_kmeans(idx, f, cand, rates, k=4, iters=1)
    conv = balanced_kmeans(idx, f, cand, rates, k=4, iters=None)
    check_result(one, idx, f, cand, 4)
    check_result(conv, idx, f, cand, 4)
    assert conv.converged and conv.iterations >= 3
    assert conv.cohesion < one.cohesion - 1e-3
    assert as_partition(one.members) != as_partition(groups)
    assert as_partition(conv.members) == as_partition(groups)
    # fixed point: reassigning against the centroids of the converged clusters cannot do
    # better than keeping them, and the reported cost is that of keeping them
    M = dense_markers(idx, f)
    cent = torch.stack([M[:, m].mean(1) for m in conv.members], 1)  # [T, k]
    cost = torch.cdist(M[:, cand].T, cent.T, p=1).numpy()
    keep = cost[np.arange(cand.numel()), conv.labels.numpy()].sum()
    assert keep == pytest.approx(square_lap_cost(cost, 12), rel=1e-12)
    assert conv.cost == pytest.approx(keep, rel=1e-12)
    assert conv.cohesion == pytest.approx(keep / cand.numel() / idx.shape[0], rel=1e-12)
    # a cap on the iterations is honoured, and iters=2 is the same as a cap of 2
    capped = balanced_kmeans(idx, f, cand, rates, k=4, iters=None, max_iters=2)
    two = balanced_kmeans(idx, f, cand, rates, k=4, iters=2)
    assert capped.iterations == two.iterations == 2 and not capped.converged
    assert torch.equal(two.labels, capped.labels) and two.cost == capped.cost


@pytest.mark.parametrize("device", DEVICES)
def test_balanced_kmeans_deterministic_and_device(device):
    idx, f, rates, _, _ = planted(k=3, size=8, noise=2, T=200, seed=7)
    _, cand = shared_and_candidates(rates, 3)
    cand = cand[torch.randperm(cand.numel(), generator=torch.Generator().manual_seed(0))]
    ref = balanced_kmeans(idx, f, cand, rates, k=3, iters=None)
    again = balanced_kmeans(
        idx.int().to(device), f, cand.to(device), rates.to(device), k=3, iters=None
    )
    assert again.labels.device.type == device and again.members.device.type == device
    for a, b in [(ref.labels, again.labels), (ref.members, again.members)]:
        assert torch.equal(a, b.cpu())
    assert torch.equal(ref.representatives, again.representatives.cpu())
    same = (ref.cost, ref.cohesion, ref.iterations)
    assert same == (again.cost, again.cohesion, again.iterations)
    # labels follow the given candidate order
    for i, c in enumerate(cand.tolist()):
        assert c in ref.members[ref.labels[i]].tolist()


def test_balanced_kmeans_rejects_bad_input():
    idx, f, rates, _, _ = planted(k=2, size=6, T=50)
    _, cand = shared_and_candidates(rates, 3)
    with pytest.raises(ValueError, match="equal size"):
        balanced_kmeans(idx, f, cand[:-1], rates, k=2)
    with pytest.raises(ValueError, match=r"\[0, "):
        balanced_kmeans(idx, f - 1, cand[cand < f - 1][:10], rates[:-1], k=2)
    with pytest.raises(ValueError, match="repeated"):
        balanced_kmeans(idx, f, torch.cat([cand[:-1], cand[:1]]), rates, k=2)
    with pytest.raises(ValueError, match="rates"):
        balanced_kmeans(idx, f, cand, rates[:-1], k=2)
    with pytest.raises(ValueError, match="k must"):
        balanced_kmeans(idx, f, cand, rates, k=0)
    with pytest.raises(ValueError, match="iters"):
        balanced_kmeans(idx, f, cand, rates, k=2, iters=0)
