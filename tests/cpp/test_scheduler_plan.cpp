// Host test of the tile scheduler's plan (scheduler/plan.hpp): on random batches, every page
// of every request is decoded by exactly one SM part, split indices are consistent with
// num_splits, and every part's cost stays within one fixed cost of the ideal share.
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <flash_mla/scheduler/plan.hpp>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok && failures++ < 20) std::fprintf(stderr, "FAILED: %s\n", what.c_str());
}

void check_plan(const std::vector<int32_t>& seqlens, int parts, const std::string& name) {
  using namespace flash_mla;
  const HostPlan plan = host_plan(seqlens, parts);
  const int batch = static_cast<int>(seqlens.size());
  std::vector<std::vector<int>> covered(batch);
  std::vector<std::vector<int>> split_seen(batch);
  for (int i = 0; i < batch; ++i) covered[i].assign(tiles_of(seqlens[i]), 0);

  expect(plan.num_splits[0] == 0, name + ": num_splits[0] == 0");
  for (int i = 0; i < batch; ++i) {
    const int n = plan.num_splits[i + 1] - plan.num_splits[i];
    expect(n >= 1, name + ": request " + std::to_string(i) + " has >= 1 split");
    split_seen[i].assign(n > 0 ? n : 0, 0);
  }
  expect(plan.num_splits[batch] <= max_splits_of(batch, parts), name + ": splits fit the workspace");

  long long total = 0;
  for (int i = 0; i < batch; ++i) total += paired_tiles(tiles_of(seqlens[i])) + kSegmentFixedCost;
  const long long share = (total + parts - 1) / parts;

  for (int p = 0; p < parts; ++p) {
    const int32_t* row = plan.meta.data() + p * kMetaInts;
    long long cost = 0;
    for (int i = row[0]; i <= row[2]; ++i) {
      expect(i >= 0 && i < batch, name + ": request index in range");
      if (i < 0 || i >= batch) continue;
      const int lo = i == row[0] ? row[1] : 0;
      const int hi = i == row[2] ? row[3] : tiles_of(seqlens[i]);
      expect(lo <= hi && hi <= tiles_of(seqlens[i]), name + ": page range valid");
      expect(tiles_of(seqlens[i]) == 0 || hi > lo, name + ": non-empty segment of a non-empty request");
      for (int pg = lo; pg < hi; ++pg) covered[i][pg]++;
      const int split = i == row[0] ? row[4] : 0;
      if (split >= 0 && split < static_cast<int>(split_seen[i].size())) split_seen[i][split]++;
      else expect(false, name + ": split index in range");
      cost += paired_tiles(hi - lo) + kSegmentFixedCost;
    }
    expect(cost <= share + kSegmentFixedCost + 1,
           name + ": part " + std::to_string(p) + " cost " + std::to_string(cost) + " <= " +
               std::to_string(share + kSegmentFixedCost + 1));
  }
  for (int i = 0; i < batch; ++i) {
    for (int c : covered[i]) expect(c == 1, name + ": every page covered exactly once");
    for (int c : split_seen[i]) expect(c == 1, name + ": every split index used exactly once");
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int cases = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int batch = 1 + static_cast<int>(rng() % 300);
    const int parts = std::vector<int>{1, 2, 3, 16, 33, 66, 78, 132}[rng() % 8];
    std::vector<int32_t> seqlens(batch);
    const int max_len = std::vector<int>{1, 64, 1000, 8192, 100000}[rng() % 5];
    for (auto& L : seqlens) L = rng() % 4 == 0 ? 0 : static_cast<int32_t>(rng() % (max_len + 1));
    check_plan(seqlens, parts, "trial " + std::to_string(trial));
    ++cases;
  }
  check_plan({}, 5, "empty batch");
  check_plan({0, 0, 0}, 4, "all empty");
  check_plan({4641, 45118, 1730, 1696}, 132, "imbalanced spec case");
  check_plan({1 << 20}, 132, "one huge request");
  cases += 4;
  std::printf("%d plans checked, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
