// Token linears on spikes as accumulations: appended to lif_cpu.cpp and lif_pool_cpu.cpp (one
// library source).
//
// A spike-driven block's linears read spikes: x is 0 or 1, so y = x W^T + b is, per row, the bias
// plus the sum of the weight columns of the row's spikes (the paper's accumulate-only synaptic
// operation, no multiplications). At a firing rate r this is r times the additions of the dense
// product's multiply-adds; the kernels below do exactly that, with the spikes' indices gathered
// row by row. Row-major, contiguous; x of any storage dtype (float32, float16, bfloat16), and W, b, y
// (and g, dW) all float32 or all of one 16-bit dtype (the dense product's dtype under autocast). The
// sums are float32 either way: 16-bit operands are widened exactly, and a 16-bit result is each float32
// sum rounded once (to nearest even), as a 16-bit dense product with float32 accumulation rounds it.
//
// * Forward: y[m, :] = b + sum over k ascending with x[m, k] = 1 of Wt[k, :], Wt = W^T (K, N).
// * Weight gradient: dW^T[k, :] = sum over m ascending with x[m, k] = 1 of g[m, :], g the output
//   gradient (M, N): again additions only, as many as the forward's.
// Both sum in that fixed order, from b (or 0): a plain loop of float32 additions in that order bit for
// bit (then one rounding to a 16-bit result); the dense products differ by the summation order's
// rounding only. The input gradient g W is PyTorch's dense product.
//
// sf_spike_gather first lists and counts each row's spike columns (and says when an element is neither
// 0 nor 1); from the count the caller picks these kernels or the dense products (per ISA's limit).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

// One vector register of floats: 16 (AVX-512), 8 (AVX) or 4 (SSE and others); kVectors of them
// make one tile of 64 output columns (32 with SSE's 16 registers), summed in registers.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr int kVectors = kLanes >= 8 ? 64 / kLanes : 8;
constexpr int64_t kWidth = (int64_t)kVectors * kLanes;
constexpr int64_t kRowBlock = 64;  // rows per thread work item
constexpr int64_t kChunk = 128;    // rows of g per pass of the weight gradient (128 x 64 floats: 32 KB, in L1)

typedef float Vec __attribute__((vector_size(kLanes * 4)));

inline Vec vload(const float* p) { Vec v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof v); }

// Bit j of the result: p[j] != 0, for the n <= 64 floats at p; binary is cleared when one of them
// is neither 0 nor 1. Whole chunks compare 16 (AVX-512), 8 (AVX) or 4 (SSE) floats at a time.
inline uint64_t nonzero_bits(const float* __restrict p, int64_t n, bool& binary) {
  uint64_t bits = 0, odd = 0;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  for (; j + 16 <= n; j += 16) {
    const __m512 v = _mm512_loadu_ps(p + j);
    const uint64_t nz = _mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ);
    bits |= nz << j;
    odd |= nz & _mm512_cmp_ps_mask(v, one, _CMP_NEQ_UQ);
  }
#elif defined(__AVX__)
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(p + j);
    const __m256 nz = _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ);
    bits |= (uint64_t)_mm256_movemask_ps(nz) << j;
    odd |= (uint64_t)_mm256_movemask_ps(_mm256_and_ps(nz, _mm256_cmp_ps(v, one, _CMP_NEQ_UQ)));
  }
#elif defined(__SSE2__)
  const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
  for (; j + 4 <= n; j += 4) {
    const __m128 v = _mm_loadu_ps(p + j);
    const __m128 nz = _mm_cmpneq_ps(v, zero);
    bits |= (uint64_t)_mm_movemask_ps(nz) << j;
    odd |= (uint64_t)_mm_movemask_ps(_mm_and_ps(nz, _mm_cmpneq_ps(v, one)));
  }
#endif
  for (; j < n; ++j) {
    bits |= (uint64_t)(p[j] != 0.0f) << j;
    odd |= (uint64_t)((p[j] != 0.0f) & (p[j] != 1.0f));
  }
  binary &= odd == 0;
  return bits;
}

// nonzero_bits of 16-bit floats (float16 or bfloat16), read as their bits: an element is nonzero
// unless every bit but the sign is clear (+0 and -0), and a spike where it is 1.0's bits in that
// dtype (`one`): the same bits and verdict as nonzero_bits of the widened floats (NaN: nonzero, not
// a spike), in 2 vector instructions per 32 elements (AVX-512) instead of widening each to a float.
inline uint64_t nonzero_bits16(const uint16_t* __restrict p, int64_t n, uint16_t one, bool& binary) {
  uint64_t bits = 0, odd = 0;
  int64_t j = 0;
#if defined(__AVX512BW__)
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF), ones = _mm512_set1_epi16((short)one);
  for (; j + 32 <= n; j += 32) {
    const __m512i v = _mm512_loadu_si512(p + j);
    const __mmask32 nz = _mm512_test_epi16_mask(v, magnitude);
    bits |= (uint64_t)nz << j;
    odd |= _mm512_mask_cmpneq_epi16_mask(nz, v, ones);
  }
#elif defined(__AVX2__)
  const __m256i magnitude = _mm256_set1_epi16(0x7FFF), zero = _mm256_setzero_si256(), ones = _mm256_set1_epi16((short)one);
  // one bit per element, in element order, of 16-bit lanes that are all ones (a and b: 16 each):
  // packs narrows them to bytes lane by lane (a's 8, b's 8, a's 8, b's 8), the permute restores the order
  auto flags = [](__m256i a, __m256i b) {
    return (uint32_t)_mm256_movemask_epi8(_mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8));
  };
  for (; j + 32 <= n; j += 32) {
    const __m256i a = _mm256_loadu_si256((const __m256i*)(p + j)), b = _mm256_loadu_si256((const __m256i*)(p + j + 16));
    const uint32_t nz = ~flags(_mm256_cmpeq_epi16(_mm256_and_si256(a, magnitude), zero),
                               _mm256_cmpeq_epi16(_mm256_and_si256(b, magnitude), zero));
    bits |= (uint64_t)nz << j;
    odd |= nz & ~flags(_mm256_cmpeq_epi16(a, ones), _mm256_cmpeq_epi16(b, ones));
  }
#endif
  for (; j < n; ++j) {
    const bool nz = (p[j] & 0x7FFFu) != 0;
    bits |= (uint64_t)nz << j;
    odd |= (uint64_t)(nz && p[j] != one);
  }
  binary &= odd == 0;
  return bits;
}

// nonzero_bits of the n <= 64 elements at p of storage dtype D.
template <int D>
inline uint64_t nonzero_bits_of(const typename StorageOf<D>::type* p, int64_t n, bool& binary) {
  if constexpr (D == kF32) return nonzero_bits(p, n, binary);
  else return nonzero_bits16(p, n, spike_bits<D>(true), binary);
}

inline int64_t words_of(int64_t K) { return (K + 63) / 64; }

// base + j for every set bit j of bits, ascending, into out; returns their number. With AVX-512
// VBMI2, 32 bits at a time by compressing a vector of indices (and a masked store of just those:
// out may end there), without the loop's branch per bit, which mispredicts at every row's end.
inline int32_t append_indices(uint64_t bits, int64_t base, uint16_t* __restrict out) {
#if defined(__AVX512VBMI2__)
  const __m512i first = _mm512_add_epi16(_mm512_set1_epi16((short)base), _mm512_set_epi16(
      31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
  int32_t n = 0;
  for (int half = 0; half < 2; ++half) {
    const __mmask32 m = (__mmask32)(bits >> (32 * half));
    const int32_t c = __builtin_popcount(m);
    const __m512i idx = _mm512_add_epi16(first, _mm512_set1_epi16((short)(32 * half)));
    _mm512_mask_storeu_epi16(out + n, (__mmask32)((1ull << c) - 1), _mm512_maskz_compress_epi16(m, idx));
    n += c;
  }
  return n;
#else
  int32_t n = 0;
  for (; bits; bits &= bits - 1) out[n++] = (uint16_t)(base + __builtin_ctzll(bits));
  return n;
#endif
}

// The spike columns of a row from its 64-column masks into ir, ascending; returns their number.
inline int32_t list_bits(const uint64_t* __restrict words, int64_t K, uint16_t* __restrict ir) {
  int32_t n = 0;
  for (int64_t w = 0; w < words_of(K); ++w) n += append_indices(words[w], w * 64, ir + n);
  return n;
}

// The spike columns of rows [m0, m0 + rows) of x (M, K), storage dtype D, into idx (row r's at
// idx + r * K, count cnt[r]), ascending, and (packed not null) each row's 64-column masks into
// packed + r * words_of(K). Returns false when an element is neither 0 nor 1.
template <int D>
bool gather_rows(const void* x, int64_t K, int64_t m0, int64_t rows, uint16_t* __restrict idx,
                 int32_t* __restrict cnt, uint64_t* __restrict packed) {
  using S = typename StorageOf<D>::type;
  bool binary = true;
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict xr = (const S*)x + (m0 + r) * K;
    uint16_t* __restrict ir = idx + r * K;
    int32_t n = 0;
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t w = std::min<int64_t>(64, K - k0);
      uint64_t bits = nonzero_bits_of<D>(xr + k0, w, binary);
      if (packed) packed[r * words_of(K) + k0 / 64] = bits;
      n += append_indices(bits, k0, ir + n);
    }
    cnt[r] = n;
  }
  return binary;
}

// out[0:width) = (init ? init[0:width) : 0) + sum over j < n of src[ids[j] * stride + 0:width), in
// j order, stored as dtype D (rounded once where 16-bit); a full tile (width == kWidth) accumulates
// in kVectors independent registers. init may be out itself (float32: it is read before out is
// written).
template <int D = kF32>
inline void sum_rows(const float* __restrict src, int64_t stride, const uint16_t* __restrict ids, int64_t n,
                     const float* init, typename StorageOf<D>::type* out, int64_t width) {
  alignas(64) float acc[kWidth];
  if (width == kWidth) {
    Vec a[kVectors];
    for (int v = 0; v < kVectors; ++v) a[v] = init ? vload(init + v * kLanes) : Vec{};
    for (int64_t j = 0; j < n; ++j) {
      const float* __restrict s = src + (int64_t)ids[j] * stride;
      for (int v = 0; v < kVectors; ++v) a[v] += vload(s + v * kLanes);
    }
    if constexpr (D == kF32) {
      for (int v = 0; v < kVectors; ++v) vstore(out + v * kLanes, a[v]);
      return;
    }
    for (int v = 0; v < kVectors; ++v) vstore(acc + v * kLanes, a[v]);
  } else {
    for (int64_t c = 0; c < width; ++c) acc[c] = init ? init[c] : 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      const float* __restrict s = src + (int64_t)ids[j] * stride;
      for (int64_t c = 0; c < width; ++c) acc[c] += s[c];
    }
  }
  for (int64_t c = 0; c < width; ++c) store<D>(out, c, acc[c]);
}

inline int threads_for_rows(int64_t M, int nthreads) { return M >= 2 * kRowBlock ? std::max(1, nthreads) : 1; }

// sf_spike_pack for storage dtype D: each 64-column piece of a row compared (nonzero_bits_of).
template <int D>
int pack_rows(const void* x, int64_t M, int64_t K, uint64_t* __restrict packed, int nthreads) {
  using S = typename StorageOf<D>::type;
  int ok = 1;
  const int nt = threads_for_rows(M, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(& : ok)
  for (int64_t m = 0; m < M; ++m) {
    const S* __restrict xr = (const S*)x + m * K;
    bool binary = true;
    for (int64_t k0 = 0; k0 < K; k0 += 64) {
      const int64_t n = std::min<int64_t>(64, K - k0);
      packed[m * words_of(K) + k0 / 64] = nonzero_bits_of<D>(xr + k0, n, binary);
    }
    ok &= binary ? 1 : 0;
  }
  return ok ? 0 : -1;
}

// Packed bits as spikes of dtype D, a word at a time (AVX-512: masked moves of 1.0's bits; else spike_bits).
template <int D>
void unpack_rows(const uint64_t* packed, int64_t M, int64_t K, void* x, int nthreads) {
  using S = typename StorageOf<D>::type;
  const int nt = threads_for_rows(M, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t w = 0; w < words_of(K); ++w) {
      const uint64_t bits = packed[m * words_of(K) + w];
      S* __restrict out = (S*)x + m * K + w * 64;
      const int64_t n = std::min<int64_t>(64, K - w * 64);
      int64_t j = 0;
#if defined(__AVX512BW__)
      if constexpr (D == kF32)
        for (; j + 16 <= n; j += 16) _mm512_storeu_ps(out + j, _mm512_maskz_mov_ps((__mmask16)(bits >> j), _mm512_set1_ps(1.0f)));
      else
        for (; j + 32 <= n; j += 32)
          _mm512_storeu_si512(out + j, _mm512_maskz_mov_epi16((__mmask32)(bits >> j), _mm512_set1_epi16((short)spike_bits<D>(true))));
#endif
      for (; j < n; ++j) out[j] = spike_bits<D>((bits >> j) & 1u);
    }
}

// y (M, N) = bias + x W^T from sf_spike_gather's lists (sf_spike_linear_forward), W, bias and y of
// storage dtype D.
template <int D>
void linear_forward(const uint16_t* idx, const int32_t* cnt, int64_t M, int64_t K, const void* W_, const void* bias_,
                    int64_t N, void* y_, float* tiles, int nthreads) {
  using S = typename StorageOf<D>::type;
  const S* W = (const S*)W_;
  S* y = (S*)y_;
  const int64_t ntiles = (N + kWidth - 1) / kWidth, blocks = (M + kRowBlock - 1) / kRowBlock;
  std::vector<float> widened(bias_ && D != kF32 ? N : 0);  // a 16-bit bias, widened once
  for (int64_t j = 0; j < (int64_t)widened.size(); ++j) widened[j] = load<D>((const S*)bias_, j);
  const float* bias = D == kF32 ? (const float*)bias_ : bias_ ? widened.data() : nullptr;
  const int nt = threads_for_rows(M, nthreads);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    // row by row of a slice, each row's kWidth columns from kWidth rows of W: those rows' cache lines
    // hold 16 consecutive k, so they stay in L1 for the next 15 rows of the slice. (Column by column,
    // each column's K writes fell on K different lines of the slice, which left L1 before the next
    // column came: for N x K = 1536 x 384 the copy took 1.42 ms instead of 0.50, one thread.)
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t width = std::min(kWidth, N - t * kWidth);
      const S* __restrict w = W + t * kWidth * K;
      float* __restrict slice = tiles + t * K * kWidth;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < width; ++j) slice[k * kWidth + j] = load<D>(w, j * K + k);
    }
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t m0 = b * kRowBlock, rows = std::min(kRowBlock, M - m0);
      for (int64_t t = 0; t < ntiles; ++t) {
        const int64_t n0 = t * kWidth, width = std::min(kWidth, N - n0);
        for (int64_t m = m0; m < m0 + rows; ++m)
          sum_rows<D>(tiles + t * K * kWidth, kWidth, idx + m * K, cnt[m], bias ? bias + n0 : nullptr, y + m * N + n0,
                      width);
      }
    }
  }
}

// dW (N, K) = g^T x (sf_spike_linear_weight_grad), g and dW of storage dtype D.
template <int D>
void linear_weight_grad(const uint16_t* idx, const int32_t* cnt, int64_t M, int64_t K, const void* g_, int64_t N,
                        void* dW_, uint16_t* cols, int64_t* starts, int nthreads) {
  using S = typename StorageOf<D>::type;
  const S* g = (const S*)g_;
  S* dW = (S*)dW_;
  const int64_t chunks = (M + kChunk - 1) / kChunk;
  const int nt = std::max(1, nthreads);
  // the chunks' column lists; chunk c's at cols + (spikes before row c * kChunk), offsets in starts + c * (K + 1)
  std::vector<int64_t> before(chunks + 1, 0);
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t n = 0;
    for (int64_t m = c * kChunk; m < std::min(M, (c + 1) * kChunk); ++m) n += cnt[m];
    before[c + 1] = before[c] + n;
  }
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t m0 = c * kChunk, m1 = std::min(M, m0 + kChunk);
    int64_t* st = starts + c * (K + 1);
    std::fill(st, st + K + 1, (int64_t)0);
    for (int64_t m = m0; m < m1; ++m)
      for (int32_t j = 0; j < cnt[m]; ++j) ++st[idx[m * K + j] + 1];
    for (int64_t k = 0; k < K; ++k) st[k + 1] += st[k];
    std::vector<int64_t> fill(st, st + K);
    uint16_t* out = cols + before[c];
    for (int64_t m = m0; m < m1; ++m)
      for (int32_t j = 0; j < cnt[m]; ++j) out[fill[idx[m * K + j]]++] = (uint16_t)(m - m0);
  }
  const int64_t tiles = (N + kWidth - 1) / kWidth;
  const int64_t parts = std::min<int64_t>(K, std::max<int64_t>(1, (4 * nt + tiles - 1) / tiles));
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> sums(K * kWidth), slice(kChunk * kWidth);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * parts; ++item) {
      const int64_t n0 = (item / parts) * kWidth, width = std::min(kWidth, N - n0);
      const int64_t k0 = (item % parts) * K / parts, k1 = (item % parts + 1) * K / parts;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t rows = std::min(kChunk, M - c * kChunk);
        const S* gc = g + c * kChunk * N + n0;
        for (int64_t r = 0; r < rows; ++r) {
          if constexpr (D == kF32) std::memcpy(slice.data() + r * kWidth, gc + r * N, width * sizeof(float));
          else for (int64_t j = 0; j < width; ++j) slice[r * kWidth + j] = load<D>(gc, r * N + j);
        }
        const int64_t* st = starts + c * (K + 1);
        const uint16_t* list = cols + before[c];
        for (int64_t k = k0; k < k1; ++k) {
          float* out = sums.data() + (k - k0) * kWidth;
          sum_rows(slice.data(), kWidth, list + st[k], st[k + 1] - st[k], c ? out : nullptr, out, width);
        }
      }
      for (int64_t j = 0; j < width; ++j)
        for (int64_t k = k0; k < k1; ++k) store<D>(dW, (n0 + j) * K + k, sums[(k - k0) * kWidth + j]);
    }
  }
}

}  // namespace

#if SF_IN_PART(0)
extern "C" {

// The spike columns of every row of x (M, K; storage dtype dtype: 0 float32, 1 float16, 2
// bfloat16), ascending, into idx (M * K uint16: row m's at idx + m * K) and their number into cnt
// (M); with packed (M * ceil(K / 64) uint64) not null, also the spikes as bits: bit j of word w of
// row m is x[m, 64 w + j] != 0. Returns the number of spikes; -1 if an element is neither 0 nor 1;
// -2 if K > 65536 (the indices are 16-bit); -3 for an unknown dtype.
int64_t sf_spike_gather(const void* x, int64_t M, int64_t K, int dtype, uint16_t* idx, int32_t* cnt, uint64_t* packed,
                        int nthreads) {
  if (K > 65536) return -2;
  if (!with_storage(dtype, [](auto) {})) return -3;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  int64_t total = 0;
  int ok = 1;
  const int nt = threads_for_rows(M, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(+ : total) reduction(& : ok)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t m0 = b * kRowBlock, rows = std::min(kRowBlock, M - m0);
    uint64_t* pk = packed ? packed + m0 * words_of(K) : nullptr;
    bool binary = true;
    with_storage(dtype, [&](auto d) { binary = gather_rows<d.value>(x, K, m0, rows, idx + m0 * K, cnt + m0, pk); });
    ok &= binary ? 1 : 0;
    for (int64_t r = 0; r < rows; ++r) total += cnt[m0 + r];
  }
  return ok ? total : -1;
}

// sf_spike_gather's idx and cnt from its packed bits (M * ceil(K / 64) words) instead of x.
// Returns the number of spikes; -2 if K > 65536.
int64_t sf_spike_gather_packed(const uint64_t* packed, int64_t M, int64_t K, uint16_t* idx, int32_t* cnt,
                               int nthreads) {
  if (K > 65536) return -2;
  int64_t total = 0;
  const int nt = threads_for_rows(M, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(+ : total)
  for (int64_t m = 0; m < M; ++m) {
    cnt[m] = list_bits(packed + m * words_of(K), K, idx + m * K);
    total += cnt[m];
  }
  return total;
}

// x (M, K) as bits into packed (M * ceil(K / 64) words; bit j of word w of row m is x[m, 64 w + j] != 0),
// x of any storage dtype (0 float32, 1 float16, 2 bfloat16): what a dense product keeps for backward
// where sf_spike_gather is not called. Returns 0; -1 if an element is neither 0 nor 1; -2 for an unknown dtype.
int sf_spike_pack(const void* x, int64_t M, int64_t K, int dtype, uint64_t* packed, int nthreads) {
  int rc = -2;
  with_storage(dtype, [&](auto d) { rc = pack_rows<d.value>(x, M, K, packed, nthreads); });
  return rc;
}

// The spikes x (M, K) of packed bits in storage dtype dtype (as sf_spike_pack), for the dense products
// (above the sparse kernels' limit, or 16-bit inputs). Returns 0; -2 for an unknown dtype.
int sf_spike_unpack(const uint64_t* packed, int64_t M, int64_t K, void* x, int dtype, int nthreads) {
  return with_storage(dtype, [&](auto d) { unpack_rows<d.value>(packed, M, K, x, nthreads); }) ? 0 : -2;
}

// y (M, N) = bias + x W^T from sf_spike_gather's idx and cnt of x: W (N, K) contiguous; bias (N)
// may be null; W, bias and y of storage dtype dtype (as sf_spike_gather's); tiles: scratch of
// ceil(N / 64) * 64 * K floats. W is first copied there (widened to float32) tile by tile of output
// columns, each tile's slice of W^T (K x kWidth floats) contiguous, so that it stays in cache (W^T's
// rows N floats apart would map onto a few cache sets) while a block of rows adds from it. Returns
// 0; -3 for an unknown dtype.
int sf_spike_linear_forward(const uint16_t* idx, const int32_t* cnt, int64_t M, int64_t K, const void* W,
                            const void* bias, int64_t N, void* y, float* tiles, int dtype, int nthreads) {
  const bool known = with_storage(dtype, [&](auto d) {
    linear_forward<d.value>(idx, cnt, M, K, W, bias, N, y, tiles, nthreads);
  });
  return known ? 0 : -3;
}

// dW (N, K) = g^T x from sf_spike_gather's idx and cnt of x (M, K), and g (M, N) contiguous; g and
// dW of storage dtype dtype (as sf_spike_gather's).
// Rows are taken kChunk at a time: the chunk's spikes are listed per column (rows ascending, as
// 16-bit offsets into the chunk: cols / starts, scratch of the spike count and M / kChunk + 1
// blocks of K + 1 offsets). Then each work item (an output tile and a range of k) walks the chunks
// in order: it copies the chunk's slice of g (kChunk x kWidth floats) contiguous, and every k adds
// its rows of it to the partial sums of the chunks before, kept as (k, kWidth) rows; the item ends
// by writing them transposed into dW.
// Returns 0; -3 for an unknown dtype.
int sf_spike_linear_weight_grad(const uint16_t* idx, const int32_t* cnt, int64_t M, int64_t K, const void* g,
                                int64_t N, void* dW, uint16_t* cols, int64_t* starts, int dtype, int nthreads) {
  const bool known = with_storage(dtype, [&](auto d) {
    linear_weight_grad<d.value>(idx, cnt, M, K, g, N, dW, cols, starts, nthreads);
  });
  return known ? 0 : -3;
}

}  // extern "C"
#endif  // part 0
