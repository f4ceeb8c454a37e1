"""The W4A16 split-K plan (csrc/include/fastinfer/gemm/split_plan.h), through fastinfer._C.plan_int4_splits.

The launchers apply this rule to the occupancy API's counts on the device; here it runs on the CPU
with residencies written out by hand: the GPC model below (clusters must fit one GPC), and the
CTA-slot pricing it replaced. The cuda test at the end checks that a launch on the GPU followed the
rule with the device's own counts.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastinfer import _C

# An H100 / H200-like die: 132 SMs in 8 GPCs of uneven size (the exact split varies from chip to chip).
GPCS = (18, 18, 18, 16, 16, 16, 16, 14)


def gpc_residency(ctas_per_sm: int, gpcs=GPCS) -> list[int]:
    """Clusters of s = 1..8 CTAs resident at once when a cluster must fit inside one GPC."""
    return [sum(g * ctas_per_sm // s for g in gpcs) for s in range(1, 9)]


def plan(units, items, per_round, overhead, resident, by_clusters=True, max_splits=8):
    splits, waves, rounds, cost = _C.plan_int4_splits(units, items, per_round, overhead, resident, by_clusters,
                                                      max_splits)
    return {"splits": splits, "waves": waves, "rounds": rounds, "cost": cost}


def model_cost(units, items, per_round, overhead, resident, s, by_clusters=True):
    """What the rule prices a split count at (None: that cluster size cannot be scheduled)."""
    if s > 1 and resident[s - 1] <= 0:
        return None
    slots = resident[0]
    waves = math.ceil(units * s / slots) if s == 1 or not by_clusters else math.ceil(units / resident[s - 1])
    return waves * (math.ceil(math.ceil(items / s) / per_round) + overhead)


def old_small_rule(units, items, per_round, overhead, resident):
    """choose_small_splits as it was (commit f1f9ba8): waves in CTA slots, schedulable sizes only."""
    best, best_cost = 1, None
    for s in range(1, min(8, items) + 1):
        if s > 1 and resident[s - 1] <= 0:
            continue
        cost = math.ceil(units * s / resident[0]) * (math.ceil(math.ceil(items / s) / per_round) + overhead)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def test_gpc_model_holds_fewer_clusters_than_slots_allow():
    r1 = gpc_residency(1)
    assert r1[0] == 132 and r1[1] == 66
    assert r1[3] == 31 < 132 // 4  # the 14-SM GPC holds three clusters of 4, not 3.5
    assert gpc_residency(2)[7] == 31 < 264 // 8


def tile_bound(units: int, slots: int) -> int:
    """The tile kernel's bound on splits (w4a16.cuh launch_tiles): none once its tiles fill the slots."""
    return 1 if units >= slots else min(8, slots // units)


def test_down_projection_at_m64_fits_one_wave_of_clusters():
    """The case behind the rule: 32 tiles of 224 stages (14336 -> 4096, M = 64, one CTA per SM). The tile
    kernel, bounded by slots / tiles = 4, takes 3 splits in one wave where slot pricing took 4 in two."""
    resident = gpc_residency(1)
    # Slot pricing takes 4 splits (132 / 32): 32 clusters of 4 but only 31 resident, so two waves.
    assert plan(32, 224, 1, 1, resident, by_clusters=False)["splits"] == 4
    assert model_cost(32, 224, 1, 1, resident, 4) == 2 * (56 + 1)
    # Priced in resident clusters: 3 splits run in one wave (42 resident) for 75 + 1 stage-times, but 7
    # splits (16 resident) in two waves of 32 stages are cheaper still.
    assert model_cost(32, 224, 1, 1, resident, 3) == 75 + 1
    chosen = plan(32, 224, 1, 1, resident)
    assert (chosen["splits"], chosen["waves"], chosen["cost"]) == (7, 2, 2 * (32 + 1))
    bounded = plan(32, 224, 1, 1, resident, max_splits=tile_bound(32, 132))
    assert (bounded["splits"], bounded["waves"], bounded["cost"]) == (3, 1, 75 + 1)


def test_down_projection_at_m16_two_ctas_per_sm():
    resident = gpc_residency(2)  # the 16-row tile kernel: two CTAs per SM
    chosen = plan(32, 224, 1, 1, resident, max_splits=tile_bound(32, 264))
    assert chosen["waves"] == 1 and chosen["splits"] == 7  # 35 clusters of 7 fit; 31 of 8 do not
    assert model_cost(32, 224, 1, 1, resident, 8) == 2 * (28 + 1)


RESIDENCIES = [gpc_residency(1), gpc_residency(2), [132 // s for s in range(1, 9)],
               [264, 132, 88, 0, 52, 44, 0, 33], [100, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0],
               [132, 66, 44, 31, 23, 19, 15, 14][:5]]


@pytest.mark.parametrize("resident", RESIDENCIES, ids=[f"r{i}" for i in range(len(RESIDENCIES))])
def test_plan_is_the_cheapest_schedulable_split(resident):
    for units, items, per_round, overhead, by_clusters in itertools.product(
            (1, 7, 31, 32, 33, 48, 96, 131, 192, 448, 1000), (1, 3, 8, 16, 32, 56, 64, 224), (1, 8), (0, 1, 3),
            (True, False)):
        got = plan(units, items, per_round, overhead, resident, by_clusters)
        s = got["splits"]
        assert 1 <= s <= min(8, items, len(resident))
        costs = {c: model_cost(units, items, per_round, overhead, resident, c, by_clusters)
                 for c in range(1, min(8, items, len(resident)) + 1)}
        assert costs[s] is not None, "an unschedulable cluster size was chosen"
        assert got["cost"] == costs[s] == min(v for v in costs.values() if v is not None)
        assert s == min(c for c, v in costs.items() if v == got["cost"]), "ties go to the fewest splits"
        if s > 1 and by_clusters:
            assert got["waves"] == math.ceil(units / resident[s - 1])
        if not by_clusters:
            assert s == old_small_rule(units, items, per_round, overhead, resident + [0] * (8 - len(resident)))


def test_slot_pricing_is_the_earlier_rule_exactly():
    """FASTINFER_INT4_WAVES=slots must give the GEMV kernel's rule before clusters were counted."""
    for resident in RESIDENCIES:
        padded = resident + [0] * (8 - len(resident))
        for units, items in itertools.product((1, 16, 64, 100, 448, 2000), (4, 9, 32, 64, 112)):
            assert plan(units, items, 8, 1, padded, False)["splits"] == old_small_rule(units, items, 8, 1, padded)


def test_cluster_pricing_never_models_worse_than_slot_pricing():
    """Under the GPC model (the residency the device reports), the cluster-priced plan's true cost is
    never above the true cost of the slot-priced plan: slot pricing only misjudges, never knows more."""
    for ctas_per_sm in (1, 2):
        resident = gpc_residency(ctas_per_sm)
        for units, items, per_round in itertools.product((8, 31, 32, 33, 48, 64, 128, 192, 448), (16, 32, 64, 224),
                                                          (1, 8)):
            new = plan(units, items, per_round, 1, resident)["splits"]
            old = plan(units, items, per_round, 1, resident, by_clusters=False)["splits"]
            assert model_cost(units, items, per_round, 1, resident, new) <= \
                model_cost(units, items, per_round, 1, resident, old)


def test_tile_kernel_never_splits_once_its_tiles_fill_the_slots():
    """The review's cases: M = 128-1024 tiles that the unbounded model would split on gains of a few
    percent (e.g. 1024-row gate_up: 2 splits for 1815 vs 1820) keep one CTA per tile."""
    resident = gpc_residency(1)
    for tiles, stages in ((192, 64), (448, 64), (1792, 64), (132, 224)):
        assert plan(tiles, stages, 1, 1, resident, max_splits=tile_bound(tiles, 132))["splits"] == 1
    assert plan(48, 64, 1, 1, resident, max_splits=tile_bound(48, 132))["splits"] <= 2


@pytest.mark.parametrize("args, match", [
    ((-1, 8, 1, 1, [132], True), "units"),
    ((4, 0, 1, 1, [132], True), "items"),
    ((4, 8, 0, 1, [132], True), "items_per_round"),
    ((4, 8, 1, -1, [132], True), "overhead_rounds"),
    ((4, 8, 1, 1, [0], True), "resident"),
    ((4, 8, 1, 1, [], True), "resident"),
    ((4, 8, 1, 1, [1] * 9, True), "resident"),
    ((4, 8, 1, 1, 132, True), "resident"),
    ((2**41, 8, 1, 1, [132], True), "units"),
    ((4, 8, 1, 1, [132, 2**41], True), "resident"),
    ((4, 8, 1, 1, [132, "x"], True), "int"),
    ((4, 8, 1, 1, [132], True, 0), "max_splits"),
])
def test_plan_rejects_bad_arguments_by_name(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _C.plan_int4_splits(*args)


def test_last_launch_is_reported_in_every_build():
    info = _C.int4_last_launch()
    if not _C.with_cuda or "90a" not in _C.cuda_archs:
        return  # None in a build without the Hopper kernels; nothing launched either way
    assert set(info) == {"kernel", "splits", "ctas", "waves", "units", "items", "items_per_round", "resident"}
    assert len(info["resident"]) == 8


@pytest.mark.cuda
@pytest.mark.sm90
@pytest.mark.parametrize("kernel", ["auto", "tiles", "small", "small_deferred"])
@pytest.mark.parametrize("waves", ["clusters", "slots"])
@pytest.mark.parametrize("m, k, n", [(1, 14336, 4096), (16, 14336, 4096), (64, 14336, 4096), (64, 4096, 4096),
                                     (256, 4096, 6144), (8, 4096, 28672)])
def test_launch_follows_the_plan_on_the_device(monkeypatch, kernel, waves, m, k, n):
    """The launch's recorded plan is the rule applied to the device's occupancy counts, and the output
    is right whatever the split (tests/test_int4.py sweeps the kernels at more shapes)."""
    from test_int4 import check_against_reference, random_weight, run_int4_linear
    monkeypatch.setenv("FASTINFER_INT4_KERNEL", kernel)
    monkeypatch.setenv("FASTINFER_INT4_WAVES", waves)
    gen = torch.Generator().manual_seed(m + k + n)
    w = random_weight(n, k, 128, "mins", gen)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    check_against_reference(run_int4_linear(x, w), x, w)
    info = _C.int4_last_launch()
    assert info["kernel"] in ("tiles", "small")
    resident = info["resident"]
    assert resident[0] > 0 and all(c >= 0 for c in resident)
    assert info["ctas"] == info["units"] * info["splits"]
    if info["kernel"] == "small" or waves == "clusters":
        bound = tile_bound(info["units"], resident[0]) if info["kernel"] == "tiles" else 8
        expected = plan(info["units"], info["items"], info["items_per_round"], 1, resident, waves == "clusters", bound)
        assert (info["splits"], info["waves"]) == (expected["splits"], expected["waves"])
    # Cluster pricing, and the tile kernel's earlier rule, count whole waves of resident clusters.
    s = info["splits"]
    if waves == "clusters" or info["kernel"] == "tiles":
        assert info["waves"] == math.ceil(info["units"] / (resident[s - 1] if s > 1 else resident[0]))
