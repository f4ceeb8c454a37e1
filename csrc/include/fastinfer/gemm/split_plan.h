// Split-K plans for the W4A16 kernels, priced in whole waves of *resident clusters*.
// Host-only (no CUDA headers): the launchers in w4a16.cuh / w4a16_small.cuh call it, and
// fastinfer._C.plan_int4_splits exposes it so the CPU tests check the rule itself.
//
// Why clusters, not SM slots. A split-K launch puts the S CTAs of one output tile in a thread-block
// cluster, and a cluster must fit inside one GPC. GPCs are uneven (an H100 / H200 spreads 132 SMs over
// 8 GPCs of 14 to 18), so fewer than slots / S clusters of S can be resident at once: a GPC of 14 SMs
// at one CTA per SM holds three clusters of 4, not 3.5. The earlier rule (splits = slots / tiles)
// ignored that. On an H200 (bench/results/2026-11-28-h200-visit6) the tile kernel's M = 64 rows with
// 4-CTA clusters took ~1.8x the time its per-stage rate at M = 256 predicts (o 31.9 us for 16 stages
// per CTA, down 73.6 us for 56), while qkv with 2-CTA clusters matched it (27.7 us for 32): the
// signature of 128 CTAs in 32 clusters running as two waves. The occupancy API
// (cudaOccupancyMaxActiveClusters) gives the resident count per size, so the plan uses it.
#pragma once

#include <cstdint>

namespace fastinfer {
namespace split_plan {

constexpr int kMaxSplits = 8;  // the portable thread-block cluster size

// clusters[s] (s = 1 .. kMaxSplits): how many clusters of s CTAs can be resident at once; clusters[1]
// is every CTA slot of the device (SMs x CTAs per SM); 0 = that size cannot be scheduled.
struct Residency {
  int64_t clusters[kMaxSplits + 1];
};

struct Plan {
  int splits;       // CTAs per output unit (one cluster)
  int64_t waves;    // ceil(units / resident clusters of that size)
  int64_t rounds;   // rounds of work per CTA, without the overhead
  int64_t cost;     // waves x (rounds + overhead_rounds): what the plan minimizes
};

// units: independent output units (tiles or strips x row blocks), each split into `splits` CTAs that
// share `items` work items (k stages or chunks) in contiguous ranges of ceil(items / splits);
// items_per_round: items one CTA finishes per round (8 warps x 1 chunk for the GEMV kernel, 1 stage
// for the tile kernel); overhead_rounds: the price of a CTA's start and split-K reduction, in rounds.
// Returns the split count with the least cost among the schedulable ones (never more than items),
// the fewest splits on ties; splits = 1 is always schedulable (and always allowed).
//
// by_clusters = false prices waves by CTA slots alone, ceil(units x splits / clusters[1]) (the GEMV
// kernel's rule before resident clusters were counted; FASTINFER_INT4_WAVES=slots), still skipping
// sizes that cannot be scheduled.
// max_splits (<= kMaxSplits) bounds the choice: the tile kernel passes slots / units, splitting only
// while its tiles leave CTA slots idle and never into more CTAs than slots (its earlier rule's bound).
inline Plan choose_splits(int64_t units, int items, int items_per_round, int overhead_rounds, const Residency& r,
                          bool by_clusters, int max_splits = kMaxSplits) {
  auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t slots = r.clusters[1] > 0 ? r.clusters[1] : 1;
  Plan best{1, 0, 0, -1};
  for (int s = 1; s <= kMaxSplits && s <= max_splits && s <= items; ++s) {
    if (s > 1 && r.clusters[s] <= 0) continue;
    const int64_t waves = units <= 0 ? 0 : s == 1 || !by_clusters ? ceil_div(units * s, slots) : ceil_div(units, r.clusters[s]);
    const int64_t rounds = ceil_div(ceil_div(items, s), items_per_round > 0 ? items_per_round : 1);
    const int64_t cost = waves * (rounds + overhead_rounds);
    if (best.cost < 0 || cost < best.cost) best = Plan{s, waves, rounds, cost};
  }
  return best;
}

}  // namespace split_plan
}  // namespace fastinfer
