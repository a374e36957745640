// Caching CPU allocator for PyTorch (installed by spikingformer.allocator.configure_allocator).
//
// Blocks of at least `threshold` bytes are rounded up to whole 2 MiB huge pages and carved out of
// segments: anonymous mappings made with mmap (MADV_HUGEPAGE, so the kernel backs them with
// transparent huge pages where it can). A freed block stays mapped and merges with free neighbours
// of its segment; a request takes the smallest free block that holds it and splits off the rest.
// Only when no free block is large enough does the allocator map a new segment of the request's
// size (at least kMinSegment, the rest left free), and first it unmaps wholly free segments
// (largest first) of at least that many bytes, so the idle part of the cache stays small. A
// training step allocates the same sizes every step, so after the first steps it maps nothing new:
// no page faults, no page zeroing, and resident memory close to the step's peak of live blocks,
// because free pages of one size serve requests of another (the former cache by exact size kept
// 1.3-2x the live peak mapped). Smaller blocks go to c10::alloc_cpu, PyTorch's default.
// sf_alloc_empty_cache unmaps every wholly free segment.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// The least a fresh segment maps (the rest stays free for the next requests). Segments of exactly
// the request's size left the event model's training step with 1744 MB mapped for a peak of 1176
// MB in use (1506 MB with the spike linears off, whose blocks come in other sizes and order); with
// at least 32 MiB, smaller blocks share segments: 1536 MB (1504 MB off). Untouched pages of a
// segment take no memory.
constexpr size_t kMinSegment = size_t(32) << 20;

struct Block {
  size_t size;
  char* segment;  // base of the mapping the block lies in
  size_t segment_size;
  bool free;
};

struct Pool {
  std::mutex mu;
  size_t threshold = size_t(1) << 20;
  std::map<char*, Block> blocks;                 // every large block, free or in use, by address
  std::multimap<size_t, char*> free_by_size;     // the free ones, by size
  int64_t mapped = 0, cached_bytes = 0, peak_mapped = 0, hits = 0, maps = 0, unmaps = 0, live = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed while the process exits
  return *p;
}

void forget_free(Pool& p, char* d, size_t size) {  // p.mu held: take d out of free_by_size
  auto range = p.free_by_size.equal_range(size);
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == d) {
      p.free_by_size.erase(it);
      return;
    }
  }
}

// Unmap wholly free segments, largest first, until at least `want` bytes are given back (all of
// them for want = SIZE_MAX). p.mu held.
void unmap_free_segments(Pool& p, size_t want) {
  std::vector<std::pair<size_t, char*>> whole;
  for (auto& entry : p.free_by_size) {
    const Block& b = p.blocks.at(entry.second);
    if (entry.second == b.segment && b.size == b.segment_size) whole.emplace_back(b.size, entry.second);
  }
  std::sort(whole.rbegin(), whole.rend());
  size_t released = 0;
  for (auto& w : whole) {
    if (released >= want) break;
    forget_free(p, w.second, w.first);
    p.blocks.erase(w.second);
    munmap(w.second, w.first);
    p.mapped -= static_cast<int64_t>(w.first);
    p.cached_bytes -= static_cast<int64_t>(w.first);
    p.unmaps += 1;
    released += w.first;
  }
}

char* map_fresh(size_t n) {
  void* d = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (d == MAP_FAILED) return nullptr;
  madvise(d, n, MADV_HUGEPAGE);
  return static_cast<char*>(d);
}

void* take_large(Pool& p, size_t n) {  // p.mu held; n a multiple of kHugePage; records the block in use
  auto fit = p.free_by_size.lower_bound(n);
  if (fit != p.free_by_size.end()) {
    char* d = fit->second;
    p.free_by_size.erase(fit);
    Block& b = p.blocks.at(d);
    if (b.size > n) {  // split: the tail stays free
      char* tail = d + n;
      p.blocks[tail] = Block{b.size - n, b.segment, b.segment_size, true};
      p.free_by_size.emplace(b.size - n, tail);
      b.size = n;
    }
    b.free = false;
    p.cached_bytes -= static_cast<int64_t>(n);
    p.hits += 1;
    p.live += 1;
    return d;
  }
  size_t seg = std::max(n, kMinSegment);
  unmap_free_segments(p, seg);
  char* d = map_fresh(seg);
  if (d == nullptr) {  // out of address space or memory: give every free segment back and try once more
    unmap_free_segments(p, SIZE_MAX);
    seg = n;
    d = map_fresh(n);
    if (d == nullptr) return nullptr;
  }
  p.blocks[d] = Block{n, d, seg, false};
  if (seg > n) {  // the segment's tail stays free for the next requests
    p.blocks[d + n] = Block{seg - n, d, seg, true};
    p.free_by_size.emplace(seg - n, d + n);
    p.cached_bytes += static_cast<int64_t>(seg - n);
  }
  p.mapped += static_cast<int64_t>(seg);
  if (p.mapped > p.peak_mapped) p.peak_mapped = p.mapped;
  p.maps += 1;
  p.live += 1;
  return d;
}

// Mark the block at d free and merge it with free neighbours of its segment. p.mu held.
void release_block(Pool& p, std::map<char*, Block>::iterator it) {
  it->second.free = true;
  p.cached_bytes += static_cast<int64_t>(it->second.size);
  p.live -= 1;
  auto next = std::next(it);
  if (next != p.blocks.end() && next->second.free && next->second.segment == it->second.segment) {
    forget_free(p, next->first, next->second.size);
    it->second.size += next->second.size;
    p.blocks.erase(next);
  }
  if (it != p.blocks.begin()) {
    auto prev = std::prev(it);
    if (prev->second.free && prev->second.segment == it->second.segment) {
      forget_free(p, prev->first, prev->second.size);
      prev->second.size += it->second.size;
      p.blocks.erase(it);
      it = prev;
    }
  }
  p.free_by_size.emplace(it->second.size, it->first);
}

void free_large(void* ptr) {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mu);
  auto it = p.blocks.find(static_cast<char*>(ptr));
  if (it == p.blocks.end() || it->second.free) return;  // cannot happen: only take_large's blocks carry this deleter
  release_block(p, it);
}

void free_any(void* ptr) {  // raw_deallocate: a block of either kind
  if (ptr == nullptr) return;
  {
    Pool& p = pool();
    std::lock_guard<std::mutex> guard(p.mu);
    auto it = p.blocks.find(static_cast<char*>(ptr));
    if (it == p.blocks.end() || it->second.free) {
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
    // not trimmed back to the kernel every step), so they do not page-fault every step either. So
    // do the scratch buffers that code outside PyTorch's allocator takes from malloc (the fused
    // kernels' per-thread rows, oneDNN's): up to glibc's largest mmap threshold, 32 MiB, they come
    // from the heap too (a 1 MiB threshold mapped and faulted four 1 MiB buffers of the event
    // model's stem backward in every step). No tensor block of 1 MiB or more reaches malloc, so
    // the heap cannot fragment much.
    mallopt(M_MMAP_THRESHOLD, 32 << 20);
    mallopt(M_TRIM_THRESHOLD, 256 << 20);
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
    c10::SetCPUAllocator(&g_allocator, /*priority=*/1);
    installed = true;
  }
  return c10::GetCPUAllocator() == &g_allocator ? 0 : 1;
}

// mapped, free (cached) bytes, peak mapped, requests served from free blocks, fresh mappings,
// unmappings, large blocks in use
void sf_alloc_stats(int64_t* out) {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mu);
  out[0] = p.mapped;
  out[1] = p.cached_bytes;
  out[2] = p.peak_mapped;
  out[3] = p.hits;
  out[4] = p.maps;
  out[5] = p.unmaps;
  out[6] = p.live;
}

void sf_alloc_empty_cache() {
  Pool& p = pool();
  std::lock_guard<std::mutex> guard(p.mu);
  unmap_free_segments(p, SIZE_MAX);
}

}  // extern "C"
