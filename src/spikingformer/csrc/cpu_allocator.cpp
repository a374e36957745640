// Caching CPU allocator for PyTorch (installed by spikingformer.allocator.configure_allocator).
//
// Blocks of at least `threshold` bytes are rounded up to whole 2 MiB huge pages, mapped with mmap
// (MADV_HUGEPAGE, so the kernel backs them with transparent huge pages where it can) and, when
// freed, kept in a per-size cache instead of being unmapped. A later request takes the smallest
// cached block that holds it and is at most twice its size. Smaller blocks go to c10::alloc_cpu,
// PyTorch's default. The cache is only emptied on request (sf_alloc_empty_cache) or when a mapping
// fails; a training step allocates the same sizes every step, so after the first steps it maps
// nothing new: no page faults and no page zeroing, and no heap fragmentation either, because every
// large block is its own mapping.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMaxWaste = 2;  // a cached block serves requests down to half its size

struct Pool {
  std::mutex mu;
  size_t threshold = size_t(1) << 20;
  std::unordered_map<void*, size_t> live;          // large blocks in use -> mapped size
  std::map<size_t, std::vector<void*>> cached;     // free large blocks by mapped size
  int64_t mapped = 0, cached_bytes = 0, peak_mapped = 0, hits = 0, maps = 0, unmaps = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed while the process exits
  return *p;
}

void unmap_cached(Pool& p) {  // p.mu held
  for (auto& entry : p.cached) {
    for (void* block : entry.second) {
      munmap(block, entry.first);
      p.mapped -= static_cast<int64_t>(entry.first);
      p.unmaps += 1;
    }
  }
  p.cached.clear();
  p.cached_bytes = 0;
}

void* map_fresh(size_t n) {
  void* d = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (d == MAP_FAILED) return nullptr;
  madvise(d, n, MADV_HUGEPAGE);
  return d;
}

void* take_large(Pool& p, size_t n) {  // p.mu held; returns the block, records it as live
  auto it = p.cached.lower_bound(n);
  if (it != p.cached.end() && it->first <= n * kMaxWaste) {
    size_t size = it->first;
    void* d = it->second.back();
    it->second.pop_back();
    if (it->second.empty()) p.cached.erase(it);
    p.cached_bytes -= static_cast<int64_t>(size);
    p.hits += 1;
    p.live.emplace(d, size);
    return d;
  }
  void* d = map_fresh(n);
  if (d == nullptr) {  // out of address space or memory: give the cache back and try once more
    unmap_cached(p);
    d = map_fresh(n);
    if (d == nullptr) return nullptr;
  }
  p.mapped += static_cast<int64_t>(n);
  if (p.mapped > p.peak_mapped) p.peak_mapped = p.mapped;
  p.maps += 1;
  p.live.emplace(d, n);
  return d;
}

void free_large(void* ptr) {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mu);
  auto it = p.live.find(ptr);
  if (it == p.live.end()) return;  // cannot happen: only blocks from take_large carry this deleter
  size_t size = it->second;
  p.live.erase(it);
  p.cached[size].push_back(ptr);
  p.cached_bytes += static_cast<int64_t>(size);
}

void free_any(void* ptr) {  // raw_deallocate: a block of either kind
  if (ptr == nullptr) return;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> guard(p.mu);
    if (p.live.count(ptr) == 0) {
      c10::free_cpu(ptr);
      return;
    }
  }
  free_large(ptr);
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    Pool& p = pool();
    if (nbytes < p.threshold) {
      void* d = c10::alloc_cpu(nbytes);
      return {d, d, &c10::free_cpu, c10::Device(c10::DeviceType::CPU)};
    }
    size_t n = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* d;
    {
      std::lock_guard<std::mutex> guard(p.mu);
      d = take_large(p, n);
    }
    TORCH_CHECK(d != nullptr, "spikingformer's CPU allocator could not map ", n, " bytes (out of memory)");
    return {d, d, &free_large, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_any; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

CachingCPUAllocator g_allocator;

// A fork (DataLoader workers) while another thread holds the lock would leave it locked in the child.
void lock_for_fork() { pool().mu.lock(); }
void unlock_after_fork() { pool().mu.unlock(); }

}  // namespace

extern "C" {

// Install as PyTorch's CPU allocator; returns 0 when PyTorch now uses it.
int sf_alloc_install(int64_t threshold) {
  static bool installed = false;
  if (!installed) {
    pool().threshold = static_cast<size_t>(threshold);
    // Smaller blocks stay with glibc: keep them in its heap (no per-block mmap, and freed memory is
    // not trimmed back to the kernel every step), so they do not page-fault every step either.
    // Nothing large reaches malloc any more, so the heap cannot fragment much.
    mallopt(M_MMAP_THRESHOLD, static_cast<int>(threshold));
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
    c10::SetCPUAllocator(&g_allocator, /*priority=*/1);
    installed = true;
  }
  return c10::GetCPUAllocator() == &g_allocator ? 0 : 1;
}

// mapped, cached, peak mapped, cache hits, fresh mappings, unmappings, large blocks in use
void sf_alloc_stats(int64_t* out) {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mu);
  out[0] = p.mapped;
  out[1] = p.cached_bytes;
  out[2] = p.peak_mapped;
  out[3] = p.hits;
  out[4] = p.maps;
  out[5] = p.unmaps;
  out[6] = static_cast<int64_t>(p.live.size());
}

void sf_alloc_empty_cache() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mu);
  unmap_cached(p);
}

}  // extern "C"
