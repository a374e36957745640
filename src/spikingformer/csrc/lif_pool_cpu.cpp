// The tokenizer's SN -> max-pool in one pass, on channels-last maps (Maps): appended to lif_cpu.cpp,
// pool_windows_cpu.cpp and lif_lanes_cpu.cpp (one library source; Step (the LIF step and its
// gradient) and select come from the first, the max-pool's windows from the second, the BN -> SN
// step in vector registers from the third).
//
// Maps are stored as float32 or bfloat16 (the arithmetic is float32 throughout, as the LIF kernel's,
// and BN's output is rounded to the storage dtype, as PyTorch stores it; float16, rare on CPUs, is
// left to the module calls, which keeps the build time down).
//
// * Forward: optionally BatchNorm (running statistics in inference, the batch's in training) as
//   PyTorch's CPU kernel computes it, then the LIF recurrence, then (optionally) the max-pool; only
//   the pooled spikes are written: no BN output, no full-size spike map, no int64 indices.
// * Backward of SN -> max-pool (training): recomputes BN's output and the spikes, routes each
//   window's gradient to its first maximum (pool_windows_cpu.cpp), then runs the LIF backward: the
//   gradients of max_pool2d's and the LIF kernel's backward, bit for bit. Behind a BN it also sums,
//   per channel, BN's two backward reductions (the gradient, and the gradient times x - mean), so
//   that BN's input gradient takes one more pass (sf_bn_backward_apply) instead of PyTorch's two.
namespace {

// BatchNorm's per-channel scale and shift, as PyTorch's CPU kernel forms them from the mean and
// 1 / sqrt(var + eps): scale = invstd * weight; shift = bias - mean * scale, the last with one
// rounding where PyTorch's kernel contracts it to a fused multiply-add (its FMA builds).
void bn_terms(const float* mean, const float* invstd, const float* weight, const float* bias, int fma, int64_t C,
              float* scale, float* shift) {
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = invstd[c] * weight[c];
    shift[c] = fma ? std::fma(-mean[c], scale[c], bias[c]) : bias[c] - mean[c] * scale[c];
  }
}

// BN's input x (storage D) -> its output as PyTorch stores it in D, with the terms of bn_terms
// (AFFINE: 0 none, 1 x * scale + shift, 2 fma(x, scale, shift), the rounding of PyTorch's FMA
// builds; for bfloat16 storage PyTorch's mixed-precision kernel does the same in float, then rounds).
template <int AFFINE, int D> inline float bn_apply(float x, float scale, float shift) {
  if constexpr (AFFINE == 1) return round_to<D>(x * scale + shift);
  else if constexpr (AFFINE == 2) return round_to<D>(std::fma(x, scale, shift));
  else return x;
}

// Ask for the n elements at p in cache (their 64-byte lines): the forward reads a piece of a row one
// step at a time, and the next step's piece lies a whole map away, where no hardware prefetcher
// looks; the backward's recurrence (recur_row) reads whole rows so, each step's a map after the
// last. (Measured neutral in the backward on an Intel Xeon, 0.98-1.04x; 1.11-1.28x on an AMD Zen 5.)
// WRITE: the lines are about to be written (write intent).
template <bool WRITE = false, typename S> inline void prefetch_lines(const S* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / (int64_t)sizeof(S)) __builtin_prefetch(p + i, WRITE ? 1 : 0, 3);
}

// n columns of one row (t, b, h) of the recurrence: spikes of x (storage D) into s (storage DS),
// membrane v carried over t. CC: the channel count C as a constant, or 0 (channels_as_constant).
template <int64_t CC, bool POW2, int AFFINE, int D, int DS>
void lif_cols(const typename StorageOf<D>::type* __restrict x, typename StorageOf<DS>::type* __restrict s,
              float* __restrict v, int64_t n, int64_t C_, const float* __restrict scale, const float* __restrict shift,
              const Step st, const typename StorageOf<D>::type* next) {
  const int64_t C = CC != 0 ? CC : C_;
#if SF_LANES
  if (C % SF_LANES == 0) {
    const StepLanes lanes(st);
    Lanes::F h;
    for (int64_t w = 0; w < n; ++w) {
      if (next != nullptr) prefetch_lines(next + w * C, C);
      for (int64_t c = 0; c < C; c += SF_LANES)
        store_spike_lanes<DS>(s + w * C + c, lif_lanes<POW2, AFFINE, D>(x + w * C + c, v + w * C + c, scale + c,
                                                                        shift + c, lanes, h));
    }
    return;
  }
#endif
  for (int64_t w = 0; w < n; ++w) {
    const typename StorageOf<D>::type* __restrict xw = x + w * C;
    if (next != nullptr) prefetch_lines(next + w * C, C);
    float* __restrict vw = v + w * C;
    typename StorageOf<DS>::type* __restrict sw = s + w * C;
    for (int64_t c = 0; c < C; ++c) {  // SF_VECTOR_LOOP lif_pool forward
      const float h = st.charge<POW2>(vw[c], bn_apply<AFFINE, D>(load<D>(xw, c), scale[c], shift[c]));
      vw[c] = st.reset(h);
      sw[c] = spike_bits<DS>(st.fires(h));
    }
  }
}

// Columns per piece of a row: the forward walks each row piece by piece, all T steps of a piece
// before the next, so that the piece's membrane, spikes and pooled spikes (a few KB) stay in L1
// cache over the steps, while each step reads 4 KB of input (one page) in one run. An even number,
// so that a piece's windows lie in it and its left neighbour.
template <int D> inline int64_t piece_cols(const Maps& m) {
  return std::max<int64_t>(2, (4096 / (int64_t)sizeof(typename StorageOf<D>::type) / m.C) & ~int64_t(1));
}

// Output rows [r0, r1) of image b (pooled), or input rows [r0, r1) (not pooled). Scratch: v and s
// (piece_cols + 1) x C (v floats, s spike bytes), hp piece_cols / 2 x C bytes, edge T x C bytes (each
// step's spikes of the column left of the piece: the last one of the piece before).
template <bool POW2, int AFFINE, bool POOL, int D>
void forward_rows(const typename StorageOf<D>::type* x, typename StorageOf<D>::type* out, const Maps& m, int64_t b,
                  int64_t r0, int64_t r1, const float* scale, const float* shift, const Step& st, float* v, uint8_t* s,
                  uint8_t* hp, uint8_t* edge) {
  using S = typename StorageOf<D>::type;
  const int64_t WC = m.WC(), WoC = m.WoC(), Ho = m.Ho(), C = m.C, P = piece_cols<D>(m);
  const int64_t h0 = POOL ? std::max<int64_t>(0, 2 * r0 - 1) : r0;
  const int64_t h1 = POOL ? std::min(m.H, 2 * r1) : r1;
  if (POOL)  // spikes are 0 or 1 and every window holds one, so max(0, window) is the window's max
    for (int64_t t = 0; t < m.T; ++t) std::memset(out + ((t * m.B + b) * Ho + r0) * WoC, 0, (r1 - r0) * WoC * sizeof(S));
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w0 = 0; w0 < m.W; w0 += P) {
      const int64_t n = std::min(P, m.W - w0);
      for (int64_t i = 0; i < n * C; ++i) v[i] = st.vr;
      for (int64_t t = 0; t < m.T; ++t) {
        const S* xr = x + ((t * m.B + b) * m.H + h) * WC + w0 * C;
        // the input read after this piece: its next step, else the next piece, else the next row
        const S* nx = t + 1 < m.T        ? xr + m.B * m.H * WC
                      : w0 + n < m.W     ? x + (b * m.H + h) * WC + (w0 + n) * C
                                         : x + (b * m.H + std::min(h + 1, m.H - 1)) * WC;
        if (!POOL) {  // the prefetch: 1.2-1.8x on an AMD Zen 5 (0.92-0.97x on an Intel Xeon before lif_lanes)
          lif_cols<0, POW2, AFFINE, D, D>(xr, out + ((t * m.B + b) * m.H + h) * WC + w0 * C, v, n, C, scale, shift, st,
                                          nx);
          continue;
        }
        channels_as_constant(C, [&](auto cc) {
          lif_cols<cc.value, POW2, AFFINE, D, kSpikeBytes>(xr, s + C, v, n, C, scale, shift, st, nx);
        });
        uint8_t* et = edge + t * C;
        std::memcpy(s, w0 > 0 ? et : s + C, C);
        std::memcpy(et, s + n * C, C);
        pool_cols(s, hp, n, C);
        // input row h lies in the windows of output rows h / 2 and, for odd h, (h + 1) / 2
        const int64_t cells = (n + 1) / 2 * C;
        for (int64_t oh = h / 2; oh <= (h + 1) / 2 && oh < r1; ++oh) {
          if (oh < r0) continue;
          S* __restrict o = out + ((t * m.B + b) * Ho + oh) * WoC + w0 / 2 * C;
          for (int64_t j = 0; j < cells; ++j) o[j] = spike_max<D>(o[j], hp[j]);
        }
      }
    }
  }
}

// Rows per work item: about 8 items per thread (at least 4 rows, so halos stay a small share).
inline int64_t rows_per_item(int64_t rows, int64_t B, int nt) {
  const int64_t want = (rows * B + 8 * nt - 1) / (8 * nt);
  return std::min(rows, std::max<int64_t>(4, want));
}

template <bool POW2, int AFFINE, bool POOL, int D>
void pool_forward_impl(const void* x, void* out, const Maps& m, const float* scale, const float* shift, const Step& st,
                       int nthreads) {
  using S = typename StorageOf<D>::type;
  const int nt = threads_for(m.T * m.B * m.H * m.WC(), nthreads);
  const int64_t rows = POOL ? m.Ho() : m.H;
  const int64_t per = rows_per_item(rows, m.B, nt);
  const int64_t chunks = (rows + per - 1) / per;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int64_t P = piece_cols<D>(m);
    std::vector<float> v(P * m.C);
    std::vector<uint8_t> s((P + 1) * m.C), hp(P / 2 * m.C), edge(m.T * m.C);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < m.B * chunks; ++item) {
      const int64_t b = item / chunks, r0 = (item % chunks) * per;
      forward_rows<POW2, AFFINE, POOL, D>((const S*)x, (S*)out, m, b, r0, std::min(rows, r0 + per), scale, shift, st,
                                          v.data(), s.data(), hp.data(), edge.data());
    }
  }
}

// Row k of image b: the recurrence over t of BN's output of z (bn_apply), its spikes as bytes into
// sr (T x W x C, columns split as split_col) and its charged membrane into hr (T x W x C). CC: the
// channel count as a constant, or 0 (see channels_as_constant).
template <int64_t CC, bool POW2, int AFFINE, int D>
void recur_row(const typename StorageOf<D>::type* z, uint8_t* sr, float* hr, float* v, const Maps& m, int64_t b,
               int64_t k, const float* __restrict scale, const float* __restrict shift, const Step st) {
  using S = typename StorageOf<D>::type;
  const int64_t C = CC != 0 ? CC : m.C, WC = m.W * C;
  for (int64_t i = 0; i < WC; ++i) v[i] = st.vr;
  for (int64_t t = 0; t < m.T; ++t) {
    const S* zr = z + ((t * m.B + b) * m.H + k) * WC;
    // the row read after this one: its next step's, else the next row's first step's
    const S* nx = t + 1 < m.T ? zr + m.B * m.H * WC : z + (b * m.H + std::min(k + 1, m.H - 1)) * WC;
#if SF_LANES
    // float32 maps of 32 channels or a multiple: g++'s loop (32 lanes) measured 1.03-1.06x this one
    if (C % SF_LANES == 0 && (D == kBF16 || C % 32 != 0)) {
      const StepLanes lanes(st);
      Lanes::F h;
      for (int64_t w = 0; w < m.W; ++w) {
        prefetch_lines(nx + w * C, C);
        uint8_t* sw = sr + t * WC + split_col(w, m) * C;
        float* hw = hr + t * WC + w * C;
        for (int64_t c = 0; c < C; c += SF_LANES) {
          store_spike_lanes<kSpikeBytes>(sw + c, lif_lanes<POW2, AFFINE, D>(zr + w * C + c, v + w * C + c, scale + c,
                                                                            shift + c, lanes, h));
          Lanes::store(hw + c, h);
        }
      }
      continue;
    }
#endif
    for (int64_t w = 0; w < m.W; ++w) {
      const S* __restrict zw = zr + w * C;
      prefetch_lines(nx + w * C, C);
      float* __restrict vw = v + w * C;
      uint8_t* __restrict sw = sr + t * WC + split_col(w, m) * C;
      float* __restrict hw = hr + t * WC + w * C;
      for (int64_t c = 0; c < C; ++c) {  // SF_VECTOR_LOOP lif_pool spikes
        const float h = st.charge<POW2>(vw[c], bn_apply<AFFINE, D>(load<D>(zw, c), scale[c], shift[c]));
        vw[c] = st.reset(h);
        sw[c] = spike_bits<kSpikeBytes>(st.fires(h));
        hw[c] = h;
      }
    }
  }
}

// Step t of the reverse recurrence of one input row (backward_rows): the W columns of charged
// membrane ht, the spikes' gradients gs (columns as split_col), BN's input zt, dL/dV gv, into zt's
// gradient gzt. CC: as recur_row. prev: a step t - 1 follows, whose gradient row (a map before this
// one) is asked for in cache with write intent (1.01-1.10x on an AMD Zen 5 in fp32, 1.00x bf16).
template <int64_t CC, bool POW2, bool DETACH, int AFFINE, int D>
void reverse_cols(const float* __restrict ht, const float* __restrict gs, const typename StorageOf<D>::type* zt,
                  float* __restrict gv, typename StorageOf<D>::type* gzt, const Maps& m, const Step st,
                  const float alpha, BNSums sums, bool prev) {
  using S = typename StorageOf<D>::type;
  const int64_t C = CC != 0 ? CC : m.C, map = m.B * m.H * m.WC();
  for (int64_t w = 0; w < m.W; ++w) {
    if (prev) prefetch_lines<true>(gzt - map + w * C, C);
    const float* __restrict hw = ht + w * C;
    const float* __restrict gw = gs + split_col(w, m) * C;
    const S* __restrict zw = zt + w * C;
    float* __restrict gvw = gv + w * C;
    S* __restrict gzw = gzt + w * C;
SF_IVDEP  // eight arrays, none aliasing: more than g++'s ten run-time alias checks
    for (int64_t c = 0; c < C; ++c) {  // SF_VECTOR_LOOP lif_pool backward
      const float g = st.grad<DETACH>(hw[c], gw[c], gvw[c], alpha);
      store<D>(gzw, c, g);
      if constexpr (AFFINE != 0) sums.add<D>(c, g, load<D>(zw, c));
    }
  }
}

// Backward of max-pool then LIF (of BN's output, AFFINE as bn_apply, computed again from its input
// z) for input rows [h0, h1) of image b. Rows are walked in order, each row's recurrence run once:
// its spikes (bytes) kept in a ring of 5 rows (a window reaches two rows either side), its charged
// membrane in a ring of 3 (rows h .. h + 2; slot 3 takes halo rows'). Each output row's window
// codes (window_codes, all steps) are found once, when its first input row comes, and kept in a
// ring of 2.
template <bool POW2, bool DETACH, int AFFINE, int D>
void backward_rows(const typename StorageOf<D>::type* z, const typename StorageOf<D>::type* gout,
                   typename StorageOf<D>::type* gz, const Maps& m, int64_t b, int64_t h0, int64_t h1,
                   const float* scale, const float* shift, const Step& st, float alpha, uint8_t* spikes, float* hring,
                   float* v, float* gv, float* gs, uint8_t* codes, BNSums& sums) {
  using S = typename StorageOf<D>::type;
  const int64_t WC = m.WC(), WoC = m.WoC(), Ho = m.Ho(), C = m.C, TWC = m.T * WC;
  auto recur = [&](int64_t k) {
    channels_as_constant(C, [&](auto cc) {
      recur_row<cc.value, POW2, AFFINE, D>(z, spikes + (k % 5) * TWC, hring + ((k >= h0 && k < h1) ? k % 3 : 3) * TWC,
                                           v, m, b, k, scale, shift, st);
    });
  };
  int64_t held[2] = {-1, -1};  // the output row whose codes each slot holds
  auto codes_of = [&](int64_t oh) {
    uint8_t* c = codes + (oh & 1) * m.T * WoC;
    if (held[oh & 1] != oh) {
      for (int64_t t = 0; t < m.T; ++t) window_codes(spikes, m, oh, t, c + t * WoC);
      held[oh & 1] = oh;
    }
    return (const uint8_t*)c;
  };
  for (int64_t k = std::max<int64_t>(0, h0 - 2); k < std::min(m.H, h0 + 2); ++k) recur(k);
  for (int64_t h = h0; h < h1; ++h) {
    if (h + 2 < m.H) recur(h + 2);
    // input row h lies in the windows of output rows h / 2 and, for odd h, (h + 1) / 2
    const int64_t ohs[2] = {h / 2, (h + 1) / 2};
    const int n_oh = (ohs[1] != ohs[0] && ohs[1] < Ho) ? 2 : 1;
    const uint8_t* cds[2] = {codes_of(ohs[0]), n_oh == 2 ? codes_of(ohs[1]) : nullptr};
    const float* hbuf = hring + (h % 3) * TWC;
    for (int64_t i = 0; i < WC; ++i) gv[i] = 0.0f;
    for (int64_t t = m.T - 1; t >= 0; --t) {
      // 3. gradient of the spikes of row h: each window's gradient goes to its first maximum
      const S* g0 = gout + ((t * m.B + b) * Ho + ohs[0]) * WoC;
      const uint8_t* code[2] = {cds[0] + t * WoC, n_oh == 2 ? cds[1] + t * WoC : nullptr};
      const S* g[2] = {g0, n_oh == 2 ? g0 + WoC : nullptr};
      // the next step's gradient rows, a map before these (1.00-1.06x on an AMD Zen 5)
      if (t > 0) prefetch_lines(g0 - m.B * Ho * WoC, n_oh * WoC);
      const int r[2] = {(int)(h - (2 * ohs[0] - 1)), (int)(h - (2 * ohs[1] - 1))};
      if (n_oh == 2) route_rows<D, 2>(code, g, r, gs, gs + WoC, m);
      else route_rows<D, 1>(code, g, r, gs, gs + WoC, m);
      // 4. LIF backward at step t (the LIF kernel's Step::grad)
      const int64_t at = ((t * m.B + b) * m.H + h) * WC;
      channels_as_constant(C, [&](auto cc) {
        reverse_cols<cc.value, POW2, DETACH, AFFINE, D>(hbuf + t * WC, gs, z + at, gv, gz + at, m, st, alpha, sums,
                                                        t > 0);
      });
    }
    if constexpr (AFFINE != 0) sums.flush();
  }
}

// Backward of the LIF alone (no max-pool; of BN's output, AFFINE as bn_apply, computed again from
// its input z) for rows [h0, h1) of image b: each row's recurrence into hbuf (T x W x C), then the
// reverse recurrence from the spikes' gradient gout, (T, B, H, W, C) like z.
template <bool POW2, bool DETACH, int AFFINE, int D>
void lif_backward_rows(const typename StorageOf<D>::type* z, const typename StorageOf<D>::type* gout,
                       typename StorageOf<D>::type* gz, const Maps& m, int64_t b, int64_t h0, int64_t h1,
                       const float* scale, const float* shift, const Step& st, float alpha, uint8_t* spikes,
                       float* hbuf, float* v, float* gv, BNSums& sums) {
  using S = typename StorageOf<D>::type;
  const int64_t WC = m.WC();
  for (int64_t h = h0; h < h1; ++h) {
    recur_row<0, POW2, AFFINE, D>(z, spikes, hbuf, v, m, b, h, scale, shift, st);
    for (int64_t i = 0; i < WC; ++i) gv[i] = 0.0f;
    for (int64_t t = m.T - 1; t >= 0; --t) {
      const int64_t at = ((t * m.B + b) * m.H + h) * WC;
      const float* __restrict ht = hbuf + t * WC;
      const S* __restrict gt = gout + at;
      const S* __restrict zt = z + at;
      S* __restrict gzt = gz + at;
      for (int64_t w = 0; w < m.W; ++w) {
        const int64_t o = w * m.C;
SF_IVDEP  // as in backward_rows
        for (int64_t c = 0; c < m.C; ++c) {  // SF_VECTOR_LOOP lif_pool backward without pool
          const float g = st.grad<DETACH>(ht[o + c], load<D>(gt, o + c), gv[o + c], alpha);
          store<D>(gzt, o + c, g);
          if constexpr (AFFINE != 0) sums.add<D>(c, g, load<D>(zt, o + c));
        }
      }
    }
    if constexpr (AFFINE != 0) sums.flush();
  }
}

// sums (behind a BN: 2 x C float64, or null): BN's backward reductions (BNSums), added up over
// the work items in their order, so that a given thread count always gives the same bits.
template <bool POW2, bool DETACH, int AFFINE, bool POOL, int D>
void pool_backward_impl(const void* z_, const void* gout_, void* gz_, const Maps& m, const float* mean,
                        const float* scale, const float* shift, const Step& st, float alpha, double* sums,
                        int nthreads) {
  using S = typename StorageOf<D>::type;
  const S* z = (const S*)z_;
  const S* gout = (const S*)gout_;
  S* gz = (S*)gz_;
  const int nt = threads_for(m.T * m.B * m.H * m.WC(), nthreads);
  // with the pool, 4 halo rows per item: at least 16 rows keeps them a small share
  const int64_t per = std::max<int64_t>(POOL ? 16 : 1, rows_per_item(m.H, m.B, nt));
  const int64_t chunks = (m.H + per - 1) / per, items = m.B * chunks, C = m.C;
  std::vector<double> item_sums((size_t)(AFFINE != 0 ? items * 2 * C : 0), 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<uint8_t> spikes((size_t)((POOL ? 5 : 1) * m.T * m.WC()));
    std::vector<float> hring((size_t)((POOL ? 4 : 1) * m.T * m.WC())), v(m.WC()), gv(m.WC()), gs(m.WC());
    std::vector<uint8_t> codes((size_t)(POOL ? 2 * m.T * m.WoC() : 0));
    std::vector<float> row_sums((size_t)(2 * C), 0.0f);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t b = item / chunks, h0 = (item % chunks) * per, h1 = std::min(m.H, h0 + per);
      double* totals = AFFINE != 0 ? item_sums.data() + item * 2 * C : nullptr;
      BNSums bn{mean, row_sums.data(), row_sums.data() + C, totals, totals ? totals + C : nullptr, C};
      if constexpr (POOL)
        backward_rows<POW2, DETACH, AFFINE, D>(z, gout, gz, m, b, h0, h1, scale, shift, st, alpha, spikes.data(),
                                            hring.data(), v.data(), gv.data(), gs.data(), codes.data(), bn);
      else
        lif_backward_rows<POW2, DETACH, AFFINE, D>(z, gout, gz, m, b, h0, h1, scale, shift, st, alpha, spikes.data(),
                                                hring.data(), v.data(), gv.data(), bn);
    }
  }
  if (AFFINE != 0 && sums != nullptr) {
    std::fill(sums, sums + 2 * C, 0.0);
    for (int64_t item = 0; item < items; ++item)
      for (int64_t i = 0; i < 2 * C; ++i) sums[i] += item_sums[item * 2 * C + i];
  }
}

#if SF_FMA
constexpr bool kFma = true;  // std::fma is one instruction, and vectorises
#else
constexpr bool kFma = false;  // std::fma would be a libm call per element: not offered
#endif

}  // namespace
