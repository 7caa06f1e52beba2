// Open-addressing hash table from int64 coordinate keys to int32 row ids.
// Linear probing, power-of-two capacity, lock-free parallel insertion (CAS on the key slot).
#pragma once
#include <atomic>
#include <cstdint>
#include <vector>

namespace spconv {

class CoordHashTable {
 public:
  static constexpr int64_t kEmpty = -1;

  explicit CoordHashTable(int64_t expected_size) {
    int64_t cap = 16;
    while (cap < expected_size * 2) cap <<= 1;
    mask_ = cap - 1;
    keys_.assign(cap, kEmpty);
    values_.assign(cap, -1);
  }

  // Inserts key if absent (thread-safe). Returns the slot and whether this call inserted it.
  inline int64_t insert(int64_t key, bool* inserted) {
    int64_t slot = hash(key) & mask_;
    while (true) {
      int64_t current = __atomic_load_n(&keys_[slot], __ATOMIC_RELAXED);
      if (current == key) { *inserted = false; return slot; }
      if (current == kEmpty) {
        int64_t expected = kEmpty;
        if (__atomic_compare_exchange_n(&keys_[slot], &expected, key, false,
                                        __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
          *inserted = true;
          return slot;
        }
        if (expected == key) { *inserted = false; return slot; }
      }
      slot = (slot + 1) & mask_;
    }
  }

  inline void set_value(int64_t slot, int32_t value) { values_[slot] = value; }

  // Returns the value stored for key, or -1 when absent.
  inline int32_t find(int64_t key) const {
    int64_t slot = hash(key) & mask_;
    while (true) {
      int64_t current = keys_[slot];
      if (current == key) return values_[slot];
      if (current == kEmpty) return -1;
      slot = (slot + 1) & mask_;
    }
  }

  int64_t capacity() const { return mask_ + 1; }
  int64_t key_at(int64_t slot) const { return keys_[slot]; }

 private:
  static inline uint64_t hash(int64_t key) {
    uint64_t x = static_cast<uint64_t>(key);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
  }

  int64_t mask_;
  std::vector<int64_t> keys_;
  std::vector<int32_t> values_;
};

}  // namespace spconv
