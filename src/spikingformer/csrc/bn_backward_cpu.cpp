// BatchNorm's backward behind the tokenizer's fused SN -> max-pool (lif_pool_cpu.cpp, which follows
// in the one library source): the sums its LIF backward pass accumulates, and BN's input gradient
// from them in one more pass over the maps.
namespace {

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
  void flush() {
    for (int64_t c = 0; c < C; ++c) {
      g[c] += row_g[c];
      d[c] += row_d[c];
      row_g[c] = row_d[c] = 0.0f;
    }
  }
};

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
  const int nt = threads_for(rows * C, nthreads);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const S* __restrict xr = x + r * C;
    const S* __restrict gr = gy + r * C;
    S* __restrict o = gx + r * C;
    for (int64_t c = 0; c < C; ++c) {  // SF_VECTOR_LOOP bn backward apply
      const float dx = (load<D>(xr, c) - mean[c]) * k[c];
      store<D>(o, c, (load<D>(gr, c) - mean_g[c] - dx) * a[c]);
    }
  }
}

}  // namespace

extern "C" {

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
