// BatchNorm in training behind the tokenizer's fused SN -> max-pool (lif_pool_cpu.cpp, which follows
// in the one library source): the batch statistics, bit for bit as PyTorch's CPU kernel finds them
// for float32 or bfloat16 rows of channels, the sums the fused LIF backward pass accumulates, and
// BN's input gradient from them in one more pass over the maps.
namespace {

// Loops over rows of C channels are instantiated with C as a constant CC for the widths of the
// zoo's largest maps (the event model's first two tokenizer stages: 32 and 64 channels, two and
// four AVX-512 vectors a row), where the loop's set-up per row was a large share of its time (see
// docs/performance-log.md, "Channel counts as constants"); CC = 0: any C. f(cc), cc a
// std::integral_constant of CC.
template <typename F> inline void channels_as_constant(int64_t C, F&& f) {
  if (C == 32) f(std::integral_constant<int64_t, 32>{});
  else if (C == 64) f(std::integral_constant<int64_t, 64>{});
  else f(std::integral_constant<int64_t, 0>{});
}

// Batch statistics of x (rows x C, storage D) as PyTorch's CPU kernel (channels last) finds them:
// the rows split into `runs` runs of ceil(rows / runs) rows (its threads' shares); per run and
// channel, a float sum row after row; the runs' sums added in run order, in its accumulation type
// Acc (float64 for float32 maps; float for bfloat16 maps, which its mixed-precision kernel reads as
// float). mean = that / rows in Acc, rounded to float; then var_sum the same way over
// (x - mean)^2; var = var_sum / rows. The running estimates are updated in float: m * mean +
// (1 - m) * running_mean, and m * var_sum / (rows - 1) + (1 - m) * running_var. Where PyTorch's
// kernel contracts to fused multiply-adds, the squares' sum (FMA) and the running variance's sum
// (fma_running) round once.
template <int64_t CC, bool FMA, int D>
void batch_stats(const typename StorageOf<D>::type* x, int64_t rows, int64_t C_, int64_t runs, bool fma_running,
                 float m, float* mean, float* var, float* running_mean, float* running_var, int nthreads) {
  using Acc = std::conditional_t<D == kF32, double, float>;
  const int64_t C = CC != 0 ? CC : C_;
  const int64_t per = (rows + runs - 1) / runs;
  std::vector<float> buf((size_t)(runs * C));
  const int nt = threads_for(rows * C, (int)std::min<int64_t>(nthreads, runs));
  auto total = [&](int64_t c) {
    Acc s = 0;
    for (int64_t k = 0; k < runs; ++k) s += buf[k * C + c];
    return s;
  };
  std::fill(buf.begin(), buf.end(), 0.0f);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < runs; ++k) {
    float* __restrict b = buf.data() + k * C;
    for (int64_t r = k * per; r < std::min(rows, (k + 1) * per); ++r) {
      const typename StorageOf<D>::type* __restrict xr = x + r * C;
SF_IVDEP  // b and xr never alias: no run-time alias check per row
      for (int64_t c = 0; c < C; ++c) b[c] = load<D>(xr, c) + b[c];  // SF_VECTOR_LOOP bn batch sum
    }
  }
  for (int64_t c = 0; c < C; ++c) mean[c] = (float)(total(c) / (Acc)rows);
  std::fill(buf.begin(), buf.end(), 0.0f);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t k = 0; k < runs; ++k) {
    float* __restrict b = buf.data() + k * C;
    const float* __restrict mu = mean;
    for (int64_t r = k * per; r < std::min(rows, (k + 1) * per); ++r) {
      const typename StorageOf<D>::type* __restrict xr = x + r * C;
SF_IVDEP
      for (int64_t c = 0; c < C; ++c) {  // SF_VECTOR_LOOP bn batch squares
        const float d = load<D>(xr, c) - mu[c];
        if constexpr (FMA) b[c] = std::fma(d, d, b[c]);
        else b[c] = b[c] + d * d;
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    const float var_sum = (float)total(c);
    var[c] = (float)((Acc)var_sum / (Acc)rows);
    if (running_mean != nullptr) running_mean[c] = m * mean[c] + (1.0f - m) * running_mean[c];
    if (running_var != nullptr) {
      const float unbiased = var_sum / (float)(rows - 1);
      const float kept = (1.0f - m) * running_var[c];
      running_var[c] = fma_running ? std::fma(m, unbiased, kept) : m * unbiased + kept;
    }
  }
}

// BN's two backward reductions over the gradient g of its output, per channel c: sum g and
// sum g (x - mean). Float partial sums over one input row's elements (row_g, row_d: C each), added
// after the row into float64 totals (g, d: C each) of the work item.
struct BNSums {
  const float* mean;
  float* row_g;
  float* row_d;
  double* g;
  double* d;
  int64_t C;
  // Element c of a row: BN's output gradient g (rounded to the storage D, as stored: what BN's
  // backward reads) at BN's input x.
  template <int D> void add(int64_t c, float g, float x) {
    const float gq = round_to<D>(g);
    row_g[c] += gq;
    row_d[c] += gq * (x - mean[c]);
  }
  void flush() {
    for (int64_t c = 0; c < C; ++c) {
      g[c] += row_g[c];
      d[c] += row_d[c];
      row_g[c] = row_d[c] = 0.0f;
    }
  }
};

// gx = (gy - mean_g - (x - mean) k) a over rows of C channels (CC: C as a constant, or 0).
template <int64_t CC, int D>
void bn_apply_rows(const typename StorageOf<D>::type* x, const typename StorageOf<D>::type* gy,
                   typename StorageOf<D>::type* gx, int64_t rows, int64_t C_, const float* mean, const float* mean_g,
                   const float* k, const float* a, int nthreads) {
  using S = typename StorageOf<D>::type;
  const int64_t C = CC != 0 ? CC : C_;
  const int nt = threads_for(rows * C, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict xr = x + r * C;
    const S* gr = gy + r * C;  // gx may be gy (in place): each element is read before it is written
    S* o = gx + r * C;
SF_IVDEP
    for (int64_t c = 0; c < C; ++c) {  // SF_VECTOR_LOOP bn backward apply
      const float dx = (load<D>(xr, c) - mean[c]) * k[c];
      store<D>(o, c, (load<D>(gr, c) - mean_g[c] - dx) * a[c]);
    }
  }
}

// BN's input gradient from its output's gradient gy and the reductions of sf_lif_pool_backward,
// as PyTorch's CPU kernel forms it: dx = (gy - sum_g / N - (x - mean) * k) * invstd * weight,
// k = sum_d * invstd^2 / N, over rows of C channels (one row per (t, b, h, w)).
template <int D>
void bn_apply_backward(const void* x_, const void* gy_, void* gx_, int64_t rows, int64_t C, const float* mean,
                       const float* invstd, const float* weight, const double* sums, int nthreads) {
  using S = typename StorageOf<D>::type;
  const S* x = (const S*)x_;
  const S* gy = (const S*)gy_;
  S* gx = (S*)gx_;
  std::vector<float> mean_g(C), k(C), a(C);
  const float n = (float)rows;
  for (int64_t c = 0; c < C; ++c) {
    mean_g[c] = (float)sums[c] / n;
    k[c] = (float)sums[C + c] * invstd[c] * invstd[c] / n;
    a[c] = invstd[c] * (weight != nullptr ? weight[c] : 1.0f);
  }
  channels_as_constant(C, [&](auto cc) {
    bn_apply_rows<cc.value, D>(x, gy, gx, rows, C, mean, mean_g.data(), k.data(), a.data(), nthreads);
  });
}

}  // namespace

#if SF_IN_PART(0)
extern "C" {

// x: rows x C, storage dtype dtype (float32 or bfloat16); runs: PyTorch's thread count (the runs its
// kernel sums); fma: where its kernel contracts to fused multiply-adds, bit 0 for the squares' sum,
// bit 1 for the running variance's; momentum m. Writes mean and var (C each, float32), updates
// running_mean and running_var (each may be null; float32) in place. Returns 0, -1 for a bad shape,
// -2 for fma on a build without FMA, -3 for another dtype.
int sf_bn_batch_stats(const void* x, int64_t rows, int64_t C, int64_t runs, int fma, float m, float* mean,
                      float* var, float* running_mean, float* running_var, int dtype, int nthreads) {
  if (rows < 2 || C < 1 || runs < 1) return -1;
  if (dtype != kF32 && dtype != kBF16) return -3;
#if SF_FMA
  constexpr bool kHasFma = true;
#else
  constexpr bool kHasFma = false;
  if (fma) return -2;  // std::fma would be a libm call per element
#endif
  const bool fma_running = kHasFma && (fma & 2);
  auto run = [&](auto d) {
    using S = typename StorageOf<d.value>::type;
    channels_as_constant(C, [&](auto cc) {
      if (kHasFma && (fma & 1))
        batch_stats<cc.value, kHasFma, d.value>((const S*)x, rows, C, runs, fma_running, m, mean, var, running_mean,
                                                running_var, nthreads);
      else
        batch_stats<cc.value, false, d.value>((const S*)x, rows, C, runs, fma_running, m, mean, var, running_mean,
                                              running_var, nthreads);
    });
  };
  if (dtype == kBF16) run(std::integral_constant<int, kBF16>{});
  else run(std::integral_constant<int, kF32>{});
  return 0;
}

// BN's input gradient gx (rows x C, storage dtype dtype) from x, the gradient of its output gy (the
// same), its batch mean and 1 / sqrt(var + eps), weight (null: none) and the reductions sums (2 x C)
// of sf_lif_pool_backward. Returns 0, -1 for a bad shape, -3 for another dtype.
int sf_bn_backward_apply(const void* x, const void* gy, void* gx, int64_t rows, int64_t C, const float* mean,
                         const float* invstd, const float* weight, const double* sums, int dtype, int nthreads) {
  if (rows < 1 || C < 1) return -1;
  if (dtype == kBF16) bn_apply_backward<kBF16>(x, gy, gx, rows, C, mean, invstd, weight, sums, nthreads);
  else if (dtype == kF32) bn_apply_backward<kF32>(x, gy, gx, rows, C, mean, invstd, weight, sums, nthreads);
  else return -3;
  return 0;
}

}  // extern "C"
#endif  // part 0
