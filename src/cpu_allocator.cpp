// A caching allocator for large CPU tensors (installed by spconv._C.use_caching_allocator).
//
// glibc hands out every block above 32 MB as a fresh mmap and unmaps it on free, so each big feature map
// or gradient of a sparse network (a [146k, 64] fp32 map is 37 MB) is page-faulted and zeroed by the kernel
// again on every op. This allocator keeps freed blocks of >= 1 MB and hands them out again for requests of
// the same size (a block at most 12.5% larger), as PyTorch's CUDA caching allocator does on the GPU. To bound memory,
// before any fresh block is taken it evicts cached blocks (largest first) until live + cached bytes stay
// within 1.25x the most bytes ever live at once. Small requests go to PyTorch's default CPU allocator.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>

namespace spconv {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;  // smaller blocks: PyTorch's default allocator
constexpr size_t kRound = size_t(1) << 16;     // sizes rounded up to 64 KB so repeated shapes match

class CachingCPUAllocator final : public c10::Allocator {
 public:
  explicit CachingCPUAllocator(c10::Allocator* base) : base_(base), base_raw_deleter_(base->raw_deleter()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes) return base_->allocate(n);
    const size_t size = (n + kRound - 1) / kRound * kRound;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(size);  // the smallest cached block that fits: exact sizes recur each step
      if (it != free_.end() && it->first <= size + size / 8) {
        ptr = it->second;
        const size_t got = it->first;
        free_.erase(it);
        ++hits_;
        cached_ -= got;
        live_ += got;
        high_water_ = std::max(high_water_, live_);
        return make(ptr, got);
      }
      ++misses_;
      live_ += size;
      high_water_ = std::max(high_water_, live_);
      const size_t bound = high_water_ + high_water_ / 4;
      while (!free_.empty() && live_ + cached_ > bound) {  // largest cached blocks first
        auto last = std::prev(free_.end());
        ++evictions_;
        cached_ -= last->first;
        c10::free_cpu(last->second);
        free_.erase(last);
      }
    }
    try {
      ptr = c10::alloc_cpu(size);
    } catch (...) {  // out of memory: give every cached block back, then try once more
      {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& block : free_) c10::free_cpu(block.second);
        free_.clear();
        cached_ = 0;
      }
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

  // hits, misses, evictions, live bytes, cached bytes, most bytes ever live (large blocks only)
  void stats(uint64_t out[6]) {
    std::lock_guard<std::mutex> lock(mu_);
    const uint64_t v[6] = {hits_, misses_, evictions_, live_, cached_, high_water_};
    std::copy(v, v + 6, out);
  }

  void lock() { mu_.lock(); }
  void unlock() { mu_.unlock(); }

  static CachingCPUAllocator* instance;

 private:
  c10::DataPtr make(void* ptr, size_t size) {
    sizes_[ptr] = size;  // called with mu_ held
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // A block of ours goes back to the cache; anything else (a small block handed out raw) to the default
  // allocator's deleter.
  static void release(void* ptr) {
    CachingCPUAllocator* self = instance;
    {
      std::lock_guard<std::mutex> lock(self->mu_);
      auto it = self->sizes_.find(ptr);
      if (it != self->sizes_.end()) {
        const size_t size = it->second;
        self->sizes_.erase(it);
        self->live_ -= size;
        self->cached_ += size;
        self->free_.emplace(size, ptr);
        return;
      }
    }
    if (self->base_raw_deleter_) {
      self->base_raw_deleter_(ptr);
    } else {
      c10::free_cpu(ptr);
    }
  }

  c10::Allocator* base_;
  c10::DeleterFnPtr base_raw_deleter_;
  std::mutex mu_;
  std::unordered_map<void*, size_t> sizes_;  // our live blocks
  std::multimap<size_t, void*> free_;  // cached blocks by size
  size_t live_ = 0, cached_ = 0, high_water_ = 0;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0;
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

// Fills out[6] with the caching allocator's counters (see CachingCPUAllocator::stats); false when not installed.
extern "C" bool spconv_caching_cpu_allocator_stats(uint64_t out[6]) {
  if (spconv::CachingCPUAllocator::instance == nullptr) return false;
  spconv::CachingCPUAllocator::instance->stats(out);
  return true;
}
