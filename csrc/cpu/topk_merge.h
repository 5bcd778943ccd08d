// Merging candidate (value, index) pairs into a sorted running top-k list.
//
// Order is total: a larger value wins (a smaller one for the "smallest" list),
// and on equal values the lower global index wins. Because the order is total,
// the merged result does not depend on the order blocks arrive in.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace torchfluence::cpu {

template <typename T>
struct Entry {
  T value;
  std::int64_t index;  // -1 marks an empty slot
};

template <typename T, bool Largest>
inline bool ranks_before(const Entry<T>& a, const Entry<T>& b) {
  if (a.index < 0) return false;  // empty slots sort last
  if (b.index < 0) return true;
  if (a.value != b.value) return Largest ? a.value > b.value : a.value < b.value;
  return a.index < b.index;
}

// Merges `candidates` into the sorted list (values, indices)[0..k).
// `candidates` is reordered; `merged` is scratch space.
template <typename T, bool Largest>
void merge_into_topk(std::vector<Entry<T>>& candidates, std::vector<Entry<T>>& merged,
                     T* values, std::int64_t* indices, std::int64_t k) {
  if (candidates.empty()) return;
  const auto before = ranks_before<T, Largest>;
  const std::int64_t keep = std::min<std::int64_t>(k, candidates.size());
  std::partial_sort(candidates.begin(), candidates.begin() + keep, candidates.end(), before);
  merged.clear();
  std::int64_t a = 0, c = 0;
  while (static_cast<std::int64_t>(merged.size()) < k) {
    const bool list_left = a < k && indices[a] >= 0;
    const bool cand_left = c < keep;
    if (!list_left && !cand_left) break;
    const Entry<T> from_list{list_left ? values[a] : T(0), list_left ? indices[a] : -1};
    if (cand_left && (!list_left || before(candidates[c], from_list))) {
      merged.push_back(candidates[c++]);
    } else {
      merged.push_back(from_list);
      ++a;
    }
  }
  for (std::int64_t i = 0; i < static_cast<std::int64_t>(merged.size()); ++i) {
    values[i] = merged[i].value;
    indices[i] = merged[i].index;
  }
}

}  // namespace torchfluence::cpu
