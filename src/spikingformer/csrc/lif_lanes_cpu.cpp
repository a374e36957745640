// The tokenizer kernel's BN -> SN step written out in vector registers (Lanes, lif_lanes), for
// lif_pool_cpu.cpp, which follows in the one library source (Step, StorageOf, the storage dtypes
// and kSpikeBytes come from lif_cpu.cpp, the first).
// SF_LANES: its float lanes, 16 in AVX-512 builds, 8 in AVX2 builds (with FMA and BMI2:
// x86-64-v3); 0 elsewhere, where the kernel keeps g++'s loops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SF_LANES 16
#elif defined(__AVX2__) && defined(__FMA__) && defined(__BMI2__)
#define SF_LANES 8
#else
#define SF_LANES 0
#endif
#if SF_LANES
#include <immintrin.h>
namespace {

// SF_LANES channels of the recurrence in one register each: the scalar loop's operations in its
// order (bn_apply, bf16_round in integer arithmetic, Step::charge, fires, reset), so the same bits.
// g++ vectorises the scalar loop by the lane count of its narrowest type: its byte spikes ask for 64
// lanes a 512-bit vector (32 in AVX2), more than a row's 32 channels, so it takes float32 values
// four registers at a time, and spills. Lanes holds what differs between the two ISAs; arithmetic
// is written with the vector types' operators.
#if SF_LANES == 16
struct Lanes {
  using F = __m512;
  using Mask = __mmask16;
  static F set1(float f) { return _mm512_set1_ps(f); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static Mask ge(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static F blend(Mask k, F a, F b) { return _mm512_mask_blend_ps(k, a, b); }  // b where k
  static F bf16_round(F f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb),
                                       _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000)));
  }
  static void spike_bytes(uint8_t* s, Mask k) { _mm_storeu_si128((__m128i*)s, _mm_maskz_mov_epi8(k, _mm_set1_epi8(1))); }
  static void spike_bf16(uint16_t* s, Mask k) {
    _mm256_storeu_si256((__m256i*)s, _mm256_maskz_mov_epi16(k, _mm256_set1_epi16(0x3F80)));
  }
  static void spike_f32(float* s, Mask k) { _mm512_storeu_ps(s, _mm512_maskz_mov_ps(k, _mm512_set1_ps(1.0f))); }
};
#else
struct Lanes {
  using F = __m256;
  using Mask = __m256;  // all ones where set
  static F set1(float f) { return _mm256_set1_ps(f); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static Mask ge(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static F blend(Mask k, F a, F b) { return _mm256_blendv_ps(a, b, k); }  // b where k
  static F bf16_round(F f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb),
                                       _mm256_set1_epi32((int)0xFFFF0000u));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                           _mm256_set1_epi32(0x7F800000));  // both sides below 2^31
    return _mm256_castsi256_ps(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan));
  }
  static void spike_bytes(uint8_t* s, Mask k) {
    const uint64_t bytes = _pdep_u64((uint64_t)_mm256_movemask_ps(k), 0x0101010101010101ull);
    std::memcpy(s, &bytes, 8);
  }
  static void spike_bf16(uint16_t* s, Mask k) {
    const __m256i one = _mm256_and_si256(_mm256_castps_si256(k), _mm256_set1_epi32(0x3F80));
    _mm_storeu_si128((__m128i*)s, _mm_packus_epi32(_mm256_castsi256_si128(one), _mm256_extracti128_si256(one, 1)));
  }
  static void spike_f32(float* s, Mask k) { _mm256_storeu_ps(s, _mm256_and_ps(k, _mm256_set1_ps(1.0f))); }
};
#endif

template <int D> inline Lanes::F load_maps(const typename StorageOf<D>::type* p) {
  static_assert(D == kF32 || D == kBF16, "the tokenizer kernel stores float32 or bfloat16 maps");
  if constexpr (D == kF32) return Lanes::load(p);
  else return Lanes::load_bf16(p);
}

// The spikes of mask k in storage DS, as spike_bits stores them.
template <int DS> inline void store_spike_lanes(typename StorageOf<DS>::type* s, Lanes::Mask k) {
  if constexpr (DS == kSpikeBytes) Lanes::spike_bytes(s, k);
  else if constexpr (DS == kBF16) Lanes::spike_bf16(s, k);
  else Lanes::spike_f32(s, k);
}

// Step's constants in every lane, set once per row (a set in the channel loop costs a broadcast a
// vector where the channel count is not a constant: 0.80-0.86x, measured).
struct StepLanes {
  Lanes::F tau, inv_tau, vth, vr, zero;
  explicit StepLanes(const Step& st)
      : tau(Lanes::set1(st.tau)), inv_tau(Lanes::set1(st.inv_tau)), vth(Lanes::set1(st.vth)),
        vr(Lanes::set1(st.vr)), zero(Lanes::set1(0.0f)) {}
};

// One register of channels: returns the spikes' mask; the membrane goes back to v, the charged
// membrane to h.
template <bool POW2, int AFFINE, int D>
inline Lanes::Mask lif_lanes(const typename StorageOf<D>::type* x, float* v, const float* scale, const float* shift,
                             const StepLanes& l, Lanes::F& h) {
  using F = Lanes::F;
  F y = load_maps<D>(x);
  if constexpr (AFFINE == 1) y = y * Lanes::load(scale) + Lanes::load(shift);  // two roundings (no contraction)
  else if constexpr (AFFINE == 2) y = Lanes::fma(y, Lanes::load(scale), Lanes::load(shift));
  if constexpr (AFFINE != 0 && D == kBF16) y = Lanes::bf16_round(y);
  const F vv = Lanes::load(v);
  const F d = y - (vv - l.vr);
  if constexpr (POW2) h = vv + d * l.inv_tau;
  else h = vv + d / l.tau;
  const Lanes::Mask k = Lanes::ge(h, l.vth);
  Lanes::store(v, Lanes::blend(k, h, h * l.zero + l.vr));
  return k;
}

}  // namespace
#endif  // SF_LANES
