// A caching CPU allocator for training steps (utils/cpu.py, --keepFreedMemory).
//
// A training step allocates the same few hundred activation and gradient tensors every step.
// glibc's malloc serves each large one by searching its bins, splitting and coalescing free
// chunks (about 3 ms of the quick-start step's serial time on the 2-core machine); this
// allocator keeps every freed block of 64 KB or more in a free list of its size class (sizes
// rounded up to 1/8 of their power of two) and hands it back on the next request of that class:
// no search, no page faults. Smaller blocks go to malloc as before. Freed blocks beyond a cap of
// cached bytes go back to malloc. The memory's contents are never read: results are unchanged.
//
// Installed with c10::SetCPUAllocator for the whole process; tensors allocated before keep the
// default allocator's deleter. The allocator object lives to the end of the process (tensors
// may be freed during interpreter shutdown). Fork-safe: the lock is taken around fork().

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kCacheFrom = size_t(1) << 16;  // smaller blocks: malloc's own caches are fast
constexpr size_t kAlignment = 64;                // c10's CPU alignment

// n rounded up to a multiple of 1/8 of its power of two (at least a page): at most 12.5 % more.
size_t size_class(size_t n) {
  size_t top = kCacheFrom;
  while (top * 2 <= n) top *= 2;
  const size_t step = std::max<size_t>(top / 8, 4096);
  return (n + step - 1) / step * step;
}

void* aligned(size_t n) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlignment, n ? n : kAlignment) != 0) throw std::bad_alloc();
  return p;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &CachingCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
    if (n < kCacheFrom) {
      void* p = aligned(n);
      return {p, p, &std::free, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = size_class(n);
    {
      std::lock_guard<std::mutex> hold(mutex_);
      auto& list = free_[size];
      if (!list.empty()) {
        void* p = list.back();
        list.pop_back();
        cached_ -= size;
        ++hits_;
        live_[p] = size;
        return {p, p, &CachingCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
      }
      ++misses_;
    }
    void* p = aligned(size);
    std::lock_guard<std::mutex> hold(mutex_);
    live_[p] = size;
    return {p, p, &CachingCPUAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate's pointers (oneDNN's scratch) come back here too: a small block is not in the
  // table and goes straight to free()
  c10::DeleterFnPtr raw_deleter() const override { return &CachingCPUAllocator::release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release(void* p);

  void set_limit(int64_t bytes) {
    std::lock_guard<std::mutex> hold(mutex_);
    limit_ = static_cast<size_t>(std::max<int64_t>(bytes, 0));
    trim_locked();
  }

  void empty() {
    std::lock_guard<std::mutex> hold(mutex_);
    const size_t keep = limit_;
    limit_ = 0;
    trim_locked();
    limit_ = keep;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> hold(mutex_);
    size_t blocks = 0;
    for (const auto& kv : free_) blocks += kv.second.size();
    return {static_cast<int64_t>(cached_), static_cast<int64_t>(blocks), static_cast<int64_t>(live_.size()),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_), static_cast<int64_t>(limit_)};
  }

  std::mutex mutex_;

 private:
  void give_back(void* p) {
    std::lock_guard<std::mutex> hold(mutex_);
    auto it = live_.find(p);
    if (it == live_.end()) {  // a small block of raw_allocate
      std::free(p);
      return;
    }
    const size_t size = it->second;
    live_.erase(it);
    if (cached_ + size > limit_) {
      std::free(p);
      return;
    }
    free_[size].push_back(p);
    cached_ += size;
  }

  void trim_locked() {
    for (auto& kv : free_)
      while (cached_ > limit_ && !kv.second.empty()) {
        std::free(kv.second.back());
        kv.second.pop_back();
        cached_ -= kv.first;
      }
  }

  std::unordered_map<size_t, std::vector<void*>> free_;  // size class -> free blocks
  std::unordered_map<void*, size_t> live_;               // block -> its size class
  size_t cached_ = 0, limit_ = 0, hits_ = 0, misses_ = 0;
};

CachingCPUAllocator* instance() {
  static CachingCPUAllocator* the = [] {
    auto* a = new CachingCPUAllocator();  // never deleted: tensors may outlive static destructors
    pthread_atfork([] { instance()->mutex_.lock(); }, [] { instance()->mutex_.unlock(); },
                   [] { instance()->mutex_.unlock(); });
    return a;
  }();
  return the;
}

void CachingCPUAllocator::release(void* p) {
  if (p) instance()->give_back(p);
}

// Installs (limit > 0: at most limit bytes of freed blocks kept) or uninstalls (limit 0: the
// default allocator again, the cached blocks freed) the caching allocator for the process; true
// when that is the state now.
bool cache_cpu_memory(int64_t limit) {
  CachingCPUAllocator* a = instance();
  a->set_limit(limit);
  c10::SetCPUAllocator(limit > 0 ? static_cast<c10::Allocator*>(a) : c10::GetDefaultCPUAllocator(), 0);
  return (c10::GetCPUAllocator() == a) == (limit > 0);
}

// [cached bytes, cached blocks, live blocks, hits, misses, limit]
std::vector<int64_t> cpu_cache_stats() { return instance()->stats(); }

void cpu_cache_empty() { instance()->empty(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(posefast, m) {
  m.def("cache_cpu_memory(int limit) -> bool", &cache_cpu_memory);
  m.def("cpu_cache_stats() -> int[]", &cpu_cache_stats);
  m.def("cpu_cache_empty() -> ()", &cpu_cache_empty);
}
