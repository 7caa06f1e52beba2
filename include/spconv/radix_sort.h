// LSD radix sort of non-negative int64 keys (optionally with int32 payloads), 11 bits per pass and only
// as many passes as the largest key needs; a pass whose digit is the same for every key is skipped.
// Stable; O(passes * n).
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace spconv {

constexpr int kRadixBits = 11;

inline int radix_passes(int64_t max_key) {
  int passes = 0;
  while (max_key > 0) {
    ++passes;
    max_key >>= kRadixBits;
  }
  return passes;
}

// Sorts keys ascending, permuting vals alongside (vals may be empty).
inline void radix_sort(std::vector<int64_t>& keys, std::vector<int32_t>& vals, int64_t max_key) {
  constexpr size_t kBuckets = size_t(1) << kRadixBits;
  const size_t n = keys.size();
  const bool with_vals = !vals.empty();
  std::vector<int64_t> tmp_keys(n);
  std::vector<int32_t> tmp_vals(with_vals ? n : 0);
  std::vector<size_t> count(kBuckets + 1);
  const int passes = radix_passes(max_key);
  for (int pass = 0; pass < passes; ++pass) {
    const int shift = pass * kRadixBits;
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < n; ++i) ++count[((keys[i] >> shift) & (kBuckets - 1)) + 1];
    bool single = false;  // every key has the same digit: this pass would not move anything
    for (size_t b = 1; b <= kBuckets; ++b)
      if (count[b] == n) single = true;
    if (single) continue;
    for (size_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (size_t i = 0; i < n; ++i) {
      const size_t dst = count[(keys[i] >> shift) & (kBuckets - 1)]++;
      tmp_keys[dst] = keys[i];
      if (with_vals) tmp_vals[dst] = vals[i];
    }
    keys.swap(tmp_keys);
    if (with_vals) vals.swap(tmp_vals);
  }
}

}  // namespace spconv
