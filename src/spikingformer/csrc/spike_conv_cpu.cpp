// The spike convolution's helpers (kernels/spike_conv.py): appended after spike_linear_cpu.cpp (one
// library source), whose accumulation kernels the convolution's forward runs on window rows.
#if SF_IN_PART(0)
extern "C" {

// x (n floats, in memory order) as uint8 into out, each element an integer from 0 to 255 (spikes are
// 0 or 1): the input of the int8 convolutions (kernels/spike_conv.py), in one pass that also checks
// it. Returns 0; -1 if an element is anything else (NaN, a fraction, negative, above 255).
int sf_spike_to_u8(const float* x, int64_t n, uint8_t* out, int nthreads) {
  constexpr int64_t kPiece = 1 << 16;
  const int64_t pieces = (n + kPiece - 1) / kPiece;
  const int nt = pieces >= 4 ? std::max(1, nthreads) : 1;
  int ok = 1;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1) reduction(& : ok)
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t i0 = p * kPiece, i1 = std::min(n, i0 + kPiece);
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      const float low = select(v > 0.0f, v, 0.0f);  // NaN -> 0, then flagged below
      const uint8_t u = (uint8_t)(int32_t)select(low < 255.0f, low, 255.0f);
      out[i] = u;
      bad |= (uint32_t)((float)u != v);
    }
    ok &= bad == 0 ? 1 : 0;
  }
  return ok ? 0 : -1;
}

// The spike lists of 3x3 windows (padding 1) of channels-last spike maps (B, H, W, C), for the
// forward below: from sf_spike_gather's lists of the maps' pixels (pidx, stride C; pcnt), window
// row m = (b H + h) W + w, for m in [m0, m0 + rows), lists k = (3 i + j) C + c for every spike c of
// pixel (h + i - 1, w + j - 1) inside the map, ascending, into idx + (m - m0) * 9C and cnt: the
// spikes of the window's row of the unfolded maps, taps in row-major order, channels within a tap.
// Returns 0; -2 if 9C > 65536 (the indices are 16-bit).
int sf_spike_window_lists(const uint16_t* pidx, const int32_t* pcnt, int64_t B, int64_t H, int64_t W, int64_t C,
                          int64_t m0, int64_t rows, uint16_t* idx, int32_t* cnt, int nthreads) {
  if (9 * C > 65536) return -2;
  const int nt = threads_for_rows(rows, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t m = m0 + r, w = m % W, h = (m / W) % H, b = m / (W * H);
    uint16_t* __restrict out = idx + r * 9 * C;
    int32_t n = 0;
    for (int64_t i = 0; i < 3; ++i) {
      const int64_t hh = h + i - 1;
      if (hh < 0 || hh >= H) continue;
      for (int64_t j = 0; j < 3; ++j) {
        const int64_t ww = w + j - 1;
        if (ww < 0 || ww >= W) continue;
        const int64_t p = (b * H + hh) * W + ww;
        const uint16_t* __restrict src = pidx + p * C;
        const uint16_t base = (uint16_t)((3 * i + j) * C);
        for (int32_t q = 0; q < pcnt[p]; ++q) out[n++] = (uint16_t)(base + src[q]);
      }
    }
    cnt[r] = n;
  }
  return 0;
}

}  // extern "C"
#endif  // part 0
