// Merging candidate (value, index) pairs into a sorted running top-k list.
//
// Order is total: a larger value wins (a smaller one for the "smallest" list),
// and on equal values the lower global index wins. Because the order is total,
// the merged result does not depend on the order blocks arrive in.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../topk_merge_args.h"

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

// Merges candidates[0..n) into the sorted list (values, indices)[0..k).
// `candidates` is reordered; `merged` is scratch space. Writes only the slots
// that end up holding a real entry (empty slots keep whatever value they had).
template <typename T, bool Largest>
void merge_into_topk(Entry<T>* candidates, std::int64_t n, std::vector<Entry<T>>& merged, T* values,
                     std::int64_t* indices, std::int64_t k) {
  if (n == 0) return;
  const auto before = [](const Entry<T>& a, const Entry<T>& b) { return ranks_before<T, Largest>(a, b); };
  // Candidates are never empty slots: their order needs no index sign checks.
  const auto cand_before = [](const Entry<T>& a, const Entry<T>& b) {
    return (Largest ? a.value > b.value : a.value < b.value) || (a.value == b.value && a.index < b.index);
  };
  const std::int64_t keep = std::min(k, n);
  // Selection then a sort of the kept ones: O(n + k log k), against partial_sort's O(n log k).
  if (keep < n) std::nth_element(candidates, candidates + keep, candidates + n, cand_before);
  std::sort(candidates, candidates + keep, cand_before);
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

// Scores are screened in groups of this many; a candidate buffer has room for
// one group beyond its flush threshold.
constexpr std::int64_t kGroup = 32;

// One query row's running list with a prefilter: a score is kept as a
// candidate only if it ranks before the current k-th entry, so once the list
// is full most scores cost one compare. Candidates are merged once there are
// `cap` of them, which tightens the bound early in a stream (the first block
// of a stream would otherwise keep all of its scores).
template <typename T, bool Largest>
class RunningList {
 public:
  RunningList(T* values, std::int64_t* indices, std::int64_t k, std::vector<Entry<T>>& buffer,
              std::vector<Entry<T>>& merged)
      : values_(values), indices_(indices), k_(k), cap_(4 * k + 16), merged_(merged) {
    buffer.resize(cap_ + kGroup);
    candidates_ = buffer.data();
    refresh();
  }

  // The k-th entry; (worst possible value, max index) while the list has empty slots.
  T bound() const { return bound_; }
  std::int64_t bound_index() const { return bound_index_; }

  // Candidates are appended by the caller (see merge_row): at most kGroup
  // between calls of maybe_flush().
  Entry<T>* candidates() const { return candidates_; }
  std::int64_t count() const { return count_; }
  void set_count(std::int64_t count) { count_ = count; }

  void maybe_flush() {
    if (count_ >= cap_) flush();
  }

  void flush() {
    if (count_ == 0) return;
    merge_into_topk<T, Largest>(candidates_, count_, merged_, values_, indices_, k_);
    count_ = 0;
    refresh();
  }

 private:
  void refresh() {
    if (indices_[k_ - 1] >= 0) {
      bound_ = values_[k_ - 1];
      bound_index_ = indices_[k_ - 1];
    } else {
      bound_ = Largest ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::infinity();
      bound_index_ = std::numeric_limits<std::int64_t>::max();
    }
  }

  T* values_;
  std::int64_t* indices_;
  std::int64_t k_;
  std::int64_t cap_;
  std::vector<Entry<T>>& merged_;
  Entry<T>* candidates_ = nullptr;
  std::int64_t count_ = 0;
  T bound_{};
  std::int64_t bound_index_ = 0;
};

// Per-thread scratch for merge_row.
template <typename T>
struct RowScratch {
  std::vector<Entry<T>> largest, smallest, merged;
};

// Non-finite scores met in a row: how many, and the column of the first.
struct NonFiniteCount {
  std::int64_t count = 0;
  std::int64_t first = -1;
};

// Merges n scores row[j * stride] (global index first_index + j) into one
// query row's largest (descending) and smallest (ascending) lists of k >= 1
// slots. Non-finite scores are counted, never ranked.
template <typename T>
NonFiniteCount merge_row(const T* row, std::int64_t stride, std::int64_t n, std::int64_t first_index,
                         T* largest_values, std::int64_t* largest_indices, T* smallest_values,
                         std::int64_t* smallest_indices, std::int64_t k, RowScratch<T>& scratch) {
  RunningList<T, true> largest(largest_values, largest_indices, k, scratch.largest, scratch.merged);
  RunningList<T, false> smallest(smallest_values, smallest_indices, k, scratch.smallest, scratch.merged);
  NonFiniteCount bad;
  constexpr T finite_max = std::numeric_limits<T>::max();
  for (std::int64_t j0 = 0; j0 < n; j0 += kGroup) {
    const std::int64_t len = std::min(kGroup, n - j0);
    if (stride == 1 && len == kGroup) {
      // Screen the group with branch-free compares (vectorised): a group none
      // of whose scores can enter either list, and all finite, is skipped.
      const T hi = largest.bound(), lo = smallest.bound();
      int hit = 0;
      for (std::int64_t q = 0; q < kGroup; ++q) {
        const T v = row[j0 + q];
        hit |= (v >= hi) | (v <= lo) | !(std::abs(v) <= finite_max);
      }
      if (!hit) continue;
    }
    // Branch-free appends: each slot is written, the count advances only for
    // an accepted score. Kept in locals, as the candidate stores could
    // otherwise alias the lists' counters and bounds.
    Entry<T>* const lc = largest.candidates();
    Entry<T>* const sc = smallest.candidates();
    std::int64_t ln = largest.count(), sn = smallest.count();
    const T lb = largest.bound(), sb = smallest.bound();
    const std::int64_t lbi = largest.bound_index(), sbi = smallest.bound_index();
    for (std::int64_t q = 0; q < len; ++q) {
      const std::int64_t j = j0 + q, index = first_index + j;
      const T v = row[j * stride];
      if (!(std::abs(v) <= finite_max)) {  // NaN fails every comparison
        if (bad.count++ == 0) bad.first = j;
        continue;
      }
      lc[ln] = Entry<T>{v, index};
      ln += (v > lb) | ((v == lb) & (index < lbi));
      sc[sn] = Entry<T>{v, index};
      sn += (v < sb) | ((v == sb) & (index < sbi));
    }
    largest.set_count(ln);
    smallest.set_count(sn);
    largest.maybe_flush();
    smallest.maybe_flush();
  }
  largest.flush();
  smallest.flush();
  return bad;
}

// The row-major first of two (row, column) positions; (-1, -1) means none.
inline bool comes_first(std::int64_t row, std::int64_t col, std::int64_t best_row, std::int64_t best_col) {
  return best_row < 0 || row < best_row || (row == best_row && col < best_col);
}

// Host entry point: merges one block of precomputed scores into the running
// top-k (see TopKMergeArgs). Runs on the calling thread's OpenMP pool.
void topk_merge(const TopKMergeArgs& args);

}  // namespace torchfluence::cpu
