// A caching allocator for large CPU tensors (installed by spconv._C.use_caching_allocator).
//
// glibc hands out every block above 32 MB as a fresh mmap and unmaps it on free, so each big feature map
// or gradient of a sparse network (a [146k, 64] fp32 map is 37 MB) is page-faulted and zeroed by the kernel
// again on every op. This allocator keeps freed blocks of >= 1 MB and hands them out again for requests of
// the same size (a block at most 12.5% larger), as PyTorch's CUDA caching allocator does on the GPU.
//
// Giving memory back:
//   - before a fresh block is taken, cached blocks are evicted (largest first) until live + cached bytes stay
//     within 1.25x the recent peak of live bytes: the most live during the last two windows, a window being
//     at least `max_idle_allocs` large allocations and `max_idle_ms` milliseconds. After a one-off peak the
//     bound decays to what the current work needs;
//   - a cached block that has not been handed out again for `max_idle_allocs` large allocations and
//     `max_idle_ms` milliseconds is returned to the system (checked every 64 allocations/frees or 100 ms);
//   - spconv.empty_cache() (spconv._C.empty_cache) returns every cached block at once.
// Defaults 1000 allocations and 2000 ms (SPCONV_CPU_CACHE_MAX_IDLE_ALLOCS / _MS, read when it is installed):
// a training step reuses its blocks well within both, so steady work keeps its hits.
// Small requests go to PyTorch's default CPU allocator.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <cstdint>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <map>
#include <vector>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <mutex>
#include <unordered_map>

namespace spconv {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // smaller blocks: PyTorch's default allocator
constexpr size_t kRound = size_t(1) << 16;     // sizes rounded up to 64 KB so repeated shapes match

using Clock = std::chrono::steady_clock;

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  return (end != v && x >= 0) ? static_cast<int64_t>(x) : fallback;
}

// Returns free heap pages to the system (blocks below glibc's mmap threshold live in its heaps).
void trim_heap() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  explicit CachingCPUAllocator(c10::Allocator* base)
      : base_(base),
        base_raw_deleter_(base->raw_deleter()),
        max_idle_allocs_(static_cast<uint64_t>(env_int("SPCONV_CPU_CACHE_MAX_IDLE_ALLOCS", 1000))),
        max_idle_(std::chrono::milliseconds(env_int("SPCONV_CPU_CACHE_MAX_IDLE_MS", 2000))) {
    window_start_time_ = last_sweep_time_ = Clock::now();
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return base_->allocate(n);
    const size_t size = (n + kRound - 1) / kRound * kRound;
    void* ptr = nullptr;
    c10::DataPtr hit;
    std::vector<void*> to_free;  // blocks taken off the cache, freed once the lock is released
    bool trim = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++tick_;
      const Clock::time_point now = Clock::now();
      auto it = free_.lower_bound(size);  // the smallest cached block that fits: exact sizes recur each step
      if (it != free_.end() && it->first <= size + size / 8) {
        const size_t got = it->first;
        ptr = it->second.ptr;
        free_.erase(it);
        ++hits_;
        cached_ -= got;
        note_live(live_ + got, now);
        hit = make(ptr, got);
      } else {
        ++misses_;
        note_live(live_ + size, now);
        const size_t bound = recent_peak() + recent_peak() / 4;
        while (!free_.empty() && live_ + cached_ > bound) {  // largest cached blocks first
          auto last = std::prev(free_.end());
          ++evictions_;
          cached_ -= last->first;
          to_free.push_back(last->second.ptr);
          free_.erase(last);
        }
      }
      maybe_sweep(now, &to_free);
      trim = trim_pending_;
      trim_pending_ = false;
    }
    for (void* p : to_free) c10::free_cpu(p);
    if (trim) trim_heap();
    if (hit) return hit;
    try {
      ptr = c10::alloc_cpu(size);
    } catch (...) {  // out of memory: give every cached block back, then try once more
      empty_cache();
      try {
        ptr = c10::alloc_cpu(size);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu_);
        live_ -= size;
        throw;
      }
    }
    std::lock_guard<std::mutex> lock(mu_);
    return make(ptr, size);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // context == data (what Allocator::raw_allocate requires): frees go through release(ptr)
  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  // hits, misses, evictions (blocks freed to bound memory), live bytes, cached bytes, most bytes ever live,
  // recent peak of live bytes (what the bound follows), idle frees (blocks returned after going unused)
  void stats(uint64_t out[8]) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t v[8] = {hits_, misses_, evictions_, live_, cached_, high_water_, recent_peak(), idle_frees_};
    std::copy(v, v + 8, out);
  }

  // Returns every cached block to the system; the number of bytes released.
  size_t empty_cache() {
    std::vector<void*> blocks;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      blocks.reserve(free_.size());
      for (auto& b : free_) blocks.push_back(b.second.ptr);
      free_.clear();
      bytes = cached_;
      cached_ = 0;
    }
    for (void* p : blocks) c10::free_cpu(p);
    trim_heap();
    return bytes;
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

  static CachingCPUAllocator* instance;

 private:
  struct Cached {
    void* ptr;
    uint64_t tick;           // tick_ when it was freed
    Clock::time_point when;  // and the time
  };

  c10::DataPtr make(void* ptr, size_t size) {
    sizes_[ptr] = size;  // called with mu_ held
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  size_t recent_peak() const { return std::max({window_peak_, prev_window_peak_, live_}); }

  // live_ changed (mu_ held): the all-time and the windowed peaks; a window ends after max_idle_allocs_
  // large allocations and max_idle_ elapsed, and the recent peak covers the current and the previous one.
  void note_live(size_t live, Clock::time_point now) {
    live_ = live;
    high_water_ = std::max(high_water_, live_);
    window_peak_ = std::max(window_peak_, live_);
    if (tick_ - window_start_tick_ >= max_idle_allocs_ && now - window_start_time_ >= max_idle_) {
      prev_window_peak_ = window_peak_;
      window_peak_ = live_;
      window_start_tick_ = tick_;
      window_start_time_ = now;
    }
  }

  // Every 64 events or 100 ms (mu_ held): blocks idle for max_idle_allocs_ allocations and max_idle_ go
  // back to the system, and the cache is trimmed to the recent bound.
  void maybe_sweep(Clock::time_point now, std::vector<void*>* to_free) {
    if (++events_ - last_sweep_event_ < 64 && now - last_sweep_time_ < std::chrono::milliseconds(100)) return;
    last_sweep_event_ = events_;
    last_sweep_time_ = now;
    for (auto it = free_.begin(); it != free_.end();) {
      if (tick_ - it->second.tick >= max_idle_allocs_ && now - it->second.when >= max_idle_) {
        ++idle_frees_;
        trim_pending_ = true;  // idle memory: also give glibc's free heap pages back (rare, not every eviction)
        cached_ -= it->first;
        to_free->push_back(it->second.ptr);
        it = free_.erase(it);
      } else {
        ++it;
      }
    }
    const size_t bound = recent_peak() + recent_peak() / 4;
    while (!free_.empty() && live_ + cached_ > bound) {
      auto last = std::prev(free_.end());
      ++evictions_;
      cached_ -= last->first;
      to_free->push_back(last->second.ptr);
      free_.erase(last);
    }
  }

  // A block of ours goes back to the cache; anything else (a small block handed out raw) to the default
  // allocator's deleter.
  static void release(void* ptr) {
    CachingCPUAllocator* self = instance;
    std::vector<void*> to_free;
    bool ours = false, trim = false;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      auto it = self->sizes_.find(ptr);
      if (it != self->sizes_.end()) {
        ours = true;
        const size_t size = it->second;
        const Clock::time_point now = Clock::now();
        self->sizes_.erase(it);
        self->live_ -= size;
        self->cached_ += size;
        self->free_.emplace(size, Cached{ptr, self->tick_, now});
        self->maybe_sweep(now, &to_free);
        trim = self->trim_pending_;
        self->trim_pending_ = false;
      }
    }
    if (ours) {
      for (void* p : to_free) c10::free_cpu(p);
      if (trim) trim_heap();
      return;
    }
    if (self->base_raw_deleter_) {
      self->base_raw_deleter_(ptr);
    } else {
      c10::free_cpu(ptr);
    }
  }

  c10::Allocator* base_;
  c10::DeleterFnPtr base_raw_deleter_;
  const uint64_t max_idle_allocs_;
  const Clock::duration max_idle_;
  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;  // our live blocks
  std::multimap<size_t, Cached> free_;       // cached blocks by size
  size_t live_ = 0, cached_ = 0, high_water_ = 0;
  size_t window_peak_ = 0, prev_window_peak_ = 0;
  uint64_t tick_ = 0, window_start_tick_ = 0, events_ = 0, last_sweep_event_ = 0;
  Clock::time_point window_start_time_, last_sweep_time_;
  bool trim_pending_ = false;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0, idle_frees_ = 0;
};

CachingCPUAllocator* CachingCPUAllocator::instance = nullptr;

}  // namespace
}  // namespace spconv

// Installs the caching allocator as PyTorch's CPU allocator (once per process; it is never destroyed, so
// tensors freed at exit still find it). Returns true when it is installed.
extern "C" bool spconv_install_caching_cpu_allocator() {
  using spconv::CachingCPUAllocator;
  static bool installed = [] {
    CachingCPUAllocator::instance = new CachingCPUAllocator(c10::GetCPUAllocator());
    // a fork (e.g. a DataLoader worker) must not copy the lock in a held state
    pthread_atfork([] { CachingCPUAllocator::instance->lock(); }, [] { CachingCPUAllocator::instance->unlock(); },
                   [] { CachingCPUAllocator::instance->unlock(); });
    c10::SetCPUAllocator(CachingCPUAllocator::instance, /*priority=*/1);
    return true;
  }();
  return installed && c10::GetCPUAllocator() == CachingCPUAllocator::instance;
}

// Fills out[8] with the caching allocator's counters (see CachingCPUAllocator::stats); false when not installed.
extern "C" bool spconv_caching_cpu_allocator_stats(uint64_t out[8]) {
  if (spconv::CachingCPUAllocator::instance == nullptr) return false;
  spconv::CachingCPUAllocator::instance->stats(out);
  return true;
}

// Returns every cached block to the system (and trims glibc's heaps); the bytes released (0 when the
// caching allocator is not installed: the heaps are trimmed all the same).
extern "C" uint64_t spconv_caching_cpu_allocator_empty_cache() {
  if (spconv::CachingCPUAllocator::instance == nullptr) {
    spconv::trim_heap();
    return 0;
  }
  return spconv::CachingCPUAllocator::instance->empty_cache();
}
