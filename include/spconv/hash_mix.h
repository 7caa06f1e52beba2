// The 64-bit finaliser of MurmurHash3 (fmix64): spreads int64 site/cell keys over a power-of-two table.
// Used by the HashTable op (src/hash_table.cpp) and the voxel table of PointToVoxel (src/point_to_voxel.cpp).
#pragma once
#include <cstdint>

namespace spconv {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

}  // namespace spconv
