// Training-mode BatchNorm followed by ReLU, forward and backward, on channels-last CPU tensors.
//
// Eager PyTorch trains BatchNorm2d + ReLU as separate kernels (statistics, normalisation,
// clamp; then the ReLU mask, the batch-norm reductions and the input gradient), each a pass
// over the activation with bfloat16 <-> float conversions. These kernels compute the same
// function in two passes forward (statistics, normalisation) and two backward (reductions,
// input gradient). An (N, C, H, W) channels-last tensor is N*H*W rows of C contiguous values;
// each thread streams through a range of rows, 16 channels (one vector) at a time. Sums are kept
// in float over blocks of kBlock rows and in double across blocks and threads. What is computed:
//   K = the first row; mean = K + E[x - K], biased variance = E[(x - K)^2] - E[x - K]^2
//   (shifted by a sample of each channel so that the difference does not cancel),
//   invstd = 1 / sqrt(var + eps), y = max(0, x * (w * invstd) + (b - mean * w * invstd)),
//   running stats r = (1 - momentum) r + momentum * stat (the unbiased variance),
// and backward, with the ReLU mask recomputed from x by the forward's own float operations:
//   dv = (x * scale + shift > 0) ? dy : 0, db = sum dv, dw = invstd * sum dv (x - mean),
//   dx = (dv - db / M - (x - mean) * invstd^2 * sum dv (x - mean) / M) * w * invstd.
// The channel count must be a multiple of 16 (models/fused.py falls back otherwise).
// Built at run time by models/fused.py (torch.utils.cpp_extension) as torch.ops.posefast.*:
// bn_relu_train (the autograd node, in C++), bn_relu_forward and bn_relu_backward; add, the
// bfloat16 residual sum (forward one pass, backward the gradient to both inputs); max_pool2;
// add_up2, the hourglass's merge; and conv, the 1x1 and 3x3 convolutions (AVX-512 BF16 only).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define POSEFAST_AVX512BF16 1
#endif

namespace {

constexpr int64_t kBlock = 64;  // rows per block
constexpr int kW = 16;          // channels per step (one 512-bit vector of float)
constexpr int64_t kMaxVectors = 64;  // at most 1024 channels: the per-thread copies below

// ----------------------------------------------------------------------------- 16 values

// GCC/Clang vector extensions: one 512-bit register on AVX-512, two or four narrower ones
// elsewhere; the compiler emits the machine's instructions (-march=native).
typedef float vf __attribute__((vector_size(4 * kW)));
typedef uint32_t vu __attribute__((vector_size(4 * kW)));
typedef uint16_t vh __attribute__((vector_size(2 * kW)));

inline vf loadf(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }

#ifdef POSEFAST_AVX512BF16
// AVX-512 intrinsics for the loads, stores and selections of the inner loops: GCC's generic
// forms of them (memcpy through vector temporaries, ?: on vectors) ran the passes 1.5-2.5x
// slower on Zen 4. Both forms compute the same values bit for bit.
inline vf relu(vf v) { return (vf)_mm512_max_ps((__m512)v, _mm512_setzero_ps()); }
inline vf where_positive(vf o, vf g) {
  return (vf)_mm512_maskz_mov_ps(_mm512_cmp_ps_mask((__m512)o, _mm512_setzero_ps(), _CMP_GT_OQ), (__m512)g);
}

struct F32 {
  using storage = float;
  static inline vf load(const float* p) { return (vf)_mm512_loadu_ps(p); }
  static inline void store(float* p, vf v) { _mm512_storeu_ps(p, (__m512)v); }
};

struct BF16 {
  using storage = uint16_t;
  static inline vf load(const uint16_t* p) {  // bfloat16 bits are the high half of a float
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  }
  static inline void store(uint16_t* p, vf v) {  // round to nearest even, as c10::BFloat16
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
  }
};
#else
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define POSEFAST_AVX2 1
// AVX2: the selections on the two 256-bit halves with the machine's compares. GCC lowers a
// comparison of these 16-float vectors element by element where no 512-bit mask type exists
// (scalar compares, inserts and blends: the float32 passes 2x slower on an AVX2 Zen 2). The same
// values bit for bit as the generic forms below (a NaN or -0 input gives +0).
union Halves {
  vf v;
  __m256 h[2];
};
union HalvesU {
  vu v;
  __m256i h[2];
};
inline vf relu(vf v) {
  Halves u{v};
  for (auto& h : u.h) h = _mm256_max_ps(h, _mm256_setzero_ps());
  return u.v;
}
inline vf where_positive(vf o, vf g) {
  Halves a{o}, b{g};
  for (int i = 0; i < 2; ++i) b.h[i] = _mm256_and_ps(b.h[i], _mm256_cmp_ps(a.h[i], _mm256_setzero_ps(), _CMP_GT_OQ));
  return b.v;
}
// The 2x2 max-pooling's rule (PyTorch's): a later value wins where it is greater or NaN.
inline void pool_step(vf& best, vu& which, vf v, uint32_t k) {
  Halves b{best}, x{v};
  HalvesU w{which};
  for (int i = 0; i < 2; ++i) {
    const __m256 wins = _mm256_or_ps(_mm256_cmp_ps(x.h[i], b.h[i], _CMP_GT_OQ), _mm256_cmp_ps(x.h[i], x.h[i], _CMP_UNORD_Q));
    b.h[i] = _mm256_blendv_ps(b.h[i], x.h[i], wins);
    w.h[i] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(w.h[i]),
                                                  _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(k))), wins));
  }
  best = b.v;
  which = w.v;
}
inline vf where_equal(vu which, uint32_t k, vf g) {
  HalvesU w{which};
  Halves r{g};
  for (int i = 0; i < 2; ++i)
    r.h[i] = _mm256_and_ps(r.h[i], _mm256_castsi256_ps(_mm256_cmpeq_epi32(w.h[i], _mm256_set1_epi32(static_cast<int>(k)))));
  return r.v;
}
#else
inline vf relu(vf v) { return v > 0.f ? v : vf{}; }
inline vf where_positive(vf o, vf g) { return o > 0.f ? g : vf{}; }
#endif

struct F32 {
  using storage = float;
  static inline vf load(const float* p) { return loadf(p); }
  static inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
};

struct BF16 {
  using storage = uint16_t;
  static inline vf load(const uint16_t* p) {
    vh h;
    std::memcpy(&h, p, sizeof h);
    const vu u = __builtin_convertvector(h, vu) << 16;
    vf v;
    std::memcpy(&v, &u, sizeof v);
    return v;
  }
  // round to nearest even, as c10::BFloat16; a NaN stays a NaN of its sign, quietened (as the
  // AVX-512 conversion above, and as PyTorch's max-pooling, which selects bits, keeps it)
  static inline void store(uint16_t* p, vf v) {
    vu u;
    std::memcpy(&u, &v, sizeof u);
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu bits = (u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded;
    const vh h = __builtin_convertvector(bits, vh);
    std::memcpy(p, &h, sizeof h);
  }
};
#endif

#ifndef POSEFAST_AVX2
// The 2x2 max-pooling's rule (PyTorch's): a later value wins where it is greater or NaN.
inline void pool_step(vf& best, vu& which, vf v, uint32_t k) {
  const auto wins = (v > best) | (v != v);
  best = wins ? v : best;
  which = wins ? vu{} + k : which;
}
inline vf where_equal(vu which, uint32_t k, vf g) { return which == k ? g : vf{}; }
#endif

// ----------------------------------------------------------------------------- passes

// Calls fn(thread, begin, end) on ranges of rows in parallel.
template <typename Fn>
void for_rows(int64_t rows, Fn fn) {
  at::parallel_for(0, rows, 4 * kBlock, [&](int64_t begin, int64_t end) { fn(at::get_thread_num(), begin, end); });
}

// C floats as C / 16 vectors.
std::vector<vf> as_vectors(const float* p, int64_t C) {
  std::vector<vf> v(C / kW);
  for (int64_t q = 0; q < C / kW; ++q) v[q] = loadf(p + q * kW);
  return v;
}

// Each thread copies the per-channel vectors of a pass into arrays of its own: the compiler then
// knows that the pass's stores do not change them (it reloaded them from the shared vectors
// after every store, and kept no accumulator in a register).
struct Local {
  vf v[kMaxVectors];
  explicit Local(const std::vector<vf>& from) { std::copy(from.begin(), from.end(), v); }
  explicit Local(int64_t n) { std::fill(v, v + n, vf{}); }
};

// Adds n vector accumulators into a thread's double sums and clears them.
void flush(vf* acc, int64_t n, double* out) {
  for (int64_t q = 0; q < n; ++q) {
    for (int j = 0; j < kW; ++j) out[q * kW + j] += acc[q][j];
    acc[q] = vf{};
  }
}

// Per-thread double sums of two per-channel quantities, [thread][2][C], and their total.
struct Sums {
  int nt;
  int64_t C;
  std::vector<double> partial;  // [thread][2][C]
  Sums(int64_t channels) : nt(at::get_num_threads()), C(channels), partial(static_cast<size_t>(nt) * 2 * channels, 0.0) {}
  double* of(int t) { return partial.data() + static_cast<size_t>(t) * 2 * C; }
  std::vector<double> total() const {
    std::vector<double> s(2 * C, 0.0);
    for (int t = 0; t < nt; ++t)
      for (int64_t k = 0; k < 2 * C; ++k) s[k] += partial[static_cast<size_t>(t) * 2 * C + k];
    return s;
  }
};

// y = relu(x * scale + shift): the same float operations forward and backward (the backward
// pass recomputes the ReLU mask from x, bit for bit the forward's).
void scale_shift(const float* w, const float* b, const float* mean, const float* invstd, int64_t C,
                 float* scale, float* shift) {
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = w[c] * invstd[c];
    shift[c] = b[c] - mean[c] * scale[c];
  }
}

void check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "posefast: ", name, " must be a channels-last contiguous 4-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "posefast: ", name, " must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) % kW == 0 && x.size(1) <= kW * kMaxVectors, "posefast: ", name, " has ",
              x.size(1), " channels, not a multiple of ", kW, " up to ", kW * kMaxVectors);
}

template <typename T>
void forward_impl(const at::Tensor& x, at::Tensor& y, const float* w, const float* b, float eps,
                  float* mean_out, float* invstd_out, std::vector<double>& mean_d,
                  std::vector<double>& var_d) {
  using S = typename T::storage;
  const int64_t C = x.size(1), rows = x.numel() / C;
  const S* xp = reinterpret_cast<const S*>(x.const_data_ptr());
  S* yp = reinterpret_cast<S*>(y.mutable_data_ptr());

  // One pass: sums of d = x - K and of d^2, K = the first row (a sample of each channel, so
  // that E[d^2] - E[d]^2 does not cancel catastrophically when |mean| >> std).
  std::vector<float> pivot(C);
  for (int64_t c0 = 0; c0 < C; c0 += kW) {
    const vf k = T::load(xp + c0);
    std::memcpy(pivot.data() + c0, &k, sizeof k);
  }
  Sums sums(C);
  const int64_t nc = C / kW;
  const std::vector<vf> k = as_vectors(pivot.data(), C);
  for_rows(rows, [&](int t, int64_t begin, int64_t end) {
    double* mine = sums.of(t);
    const Local kl(k);
    Local s1(nc), s2(nc);
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t b1 = std::min(end, b0 + kBlock);
      for (int64_t r = b0; r < b1; ++r) {
        const S* row = xp + r * C;
        for (int64_t q = 0; q < nc; ++q) {
          const vf d = T::load(row + q * kW) - kl.v[q];
          s1.v[q] += d;
          s2.v[q] += d * d;
        }
      }
      flush(s1.v, nc, mine);
      flush(s2.v, nc, mine + C);
    }
  });
  const std::vector<double> total = sums.total();
  mean_d.resize(C);
  var_d.resize(C);
  std::vector<float> scale(C), shift(C);
  const double n = static_cast<double>(rows);
  for (int64_t c = 0; c < C; ++c) {
    const double m1 = total[c] / n;
    mean_d[c] = pivot[c] + m1;
    var_d[c] = std::max(total[C + c] / n - m1 * m1, 0.0);
    mean_out[c] = static_cast<float>(mean_d[c]);
    invstd_out[c] = static_cast<float>(1.0 / std::sqrt(var_d[c] + static_cast<double>(eps)));
  }
  scale_shift(w, b, mean_out, invstd_out, C, scale.data(), shift.data());
  const std::vector<vf> sc = as_vectors(scale.data(), C), sh = as_vectors(shift.data(), C);
  for_rows(rows, [&](int, int64_t begin, int64_t end) {
    const Local a(sc), c(sh);
    for (int64_t r = begin; r < end; ++r) {
      const S* in = xp + r * C;
      S* out = yp + r * C;
      for (int64_t q = 0; q < nc; ++q) T::store(out + q * kW, relu(T::load(in + q * kW) * a.v[q] + c.v[q]));
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor running_mean,
    at::Tensor running_var, double momentum, double eps) {
  check_input(x, "input");
  const int64_t C = x.size(1);
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&weight, &bias, &running_mean, &running_var})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == C,
                "posefast: batch-norm parameters and buffers must be contiguous float32 of ", C,
                " values");
  const int64_t rows = x.numel() / C;
  TORCH_CHECK(rows > 1, "posefast: expected more than 1 value per channel when training");
  at::Tensor y = at::empty_like(x);
  at::Tensor mean = at::empty({C}, weight.options());
  at::Tensor invstd = at::empty({C}, weight.options());
  std::vector<double> mean_d, var_d;
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16)
    forward_impl<BF16>(x, y, w, b, static_cast<float>(eps), mean.mutable_data_ptr<float>(),
                       invstd.mutable_data_ptr<float>(), mean_d, var_d);
  else
    forward_impl<F32>(x, y, w, b, static_cast<float>(eps), mean.mutable_data_ptr<float>(),
                      invstd.mutable_data_ptr<float>(), mean_d, var_d);
  float* rm = running_mean.mutable_data_ptr<float>();
  float* rv = running_var.mutable_data_ptr<float>();
  const double unbias = static_cast<double>(rows) / static_cast<double>(rows - 1);
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = static_cast<float>((1.0 - momentum) * rm[c] + momentum * mean_d[c]);
    rv[c] = static_cast<float>((1.0 - momentum) * rv[c] + momentum * var_d[c] * unbias);
  }
  return {y, mean, invstd};
}

template <typename T>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const float* w, const float* bias,
                   const float* mean, const float* invstd, at::Tensor& dx, float* dw, float* db) {
  using S = typename T::storage;
  const int64_t C = x.size(1), rows = x.numel() / C;
  const S* dyp = reinterpret_cast<const S*>(dy.const_data_ptr());
  const S* xp = reinterpret_cast<const S*>(x.const_data_ptr());
  S* dxp = reinterpret_cast<S*>(dx.mutable_data_ptr());
  std::vector<float> scale(C), shift(C);
  scale_shift(w, bias, mean, invstd, C, scale.data(), shift.data());

  Sums s(C);  // [sum dv (C), sum dv * (x - mean) (C)]
  const int64_t nc = C / kW;
  const std::vector<vf> mu = as_vectors(mean, C), sc = as_vectors(scale.data(), C), sh = as_vectors(shift.data(), C);
  for_rows(rows, [&](int t, int64_t begin, int64_t end) {
    double* mine = s.of(t);
    const Local m(mu), a(sc), c(sh);
    Local a0(nc), a1(nc);
    for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
      const int64_t b1 = std::min(end, b0 + kBlock);
      for (int64_t r = b0; r < b1; ++r) {
        const S* g = dyp + r * C;
        const S* in = xp + r * C;
        for (int64_t q = 0; q < nc; ++q) {
          const vf v = T::load(in + q * kW);
          const vf dv = where_positive(v * a.v[q] + c.v[q], T::load(g + q * kW));
          a0.v[q] += dv;
          a1.v[q] += dv * (v - m.v[q]);
        }
      }
      flush(a0.v, nc, mine);
      flush(a1.v, nc, mine + C);
    }
  });
  const std::vector<double> sums = s.total();
  std::vector<float> mean_dv(C), k(C);
  const double n = static_cast<double>(rows);
  for (int64_t c = 0; c < C; ++c) {
    db[c] = static_cast<float>(sums[c]);
    dw[c] = static_cast<float>(sums[C + c] * invstd[c]);
    mean_dv[c] = static_cast<float>(sums[c] / n);
    k[c] = static_cast<float>(sums[C + c] / n * invstd[c] * invstd[c]);
  }
  const std::vector<vf> md = as_vectors(mean_dv.data(), C), kk = as_vectors(k.data(), C);
  for_rows(rows, [&](int, int64_t begin, int64_t end) {
    const Local m(mu), a(sc), c(sh), d(md), e(kk);
    for (int64_t r = begin; r < end; ++r) {
      const S* g = dyp + r * C;
      const S* in = xp + r * C;
      S* o = dxp + r * C;
      for (int64_t q = 0; q < nc; ++q) {
        const vf v = T::load(in + q * kW);
        const vf dv = where_positive(v * a.v[q] + c.v[q], T::load(g + q * kW));
        T::store(o + q * kW, (dv - d.v[q] - (v - m.v[q]) * e.v[q]) * a.v[q]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd) {
  check_input(x, "input");
  at::Tensor dy = grad_out.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(dy.sizes() == x.sizes(), "posefast: gradient and input differ in shape");
  const int64_t C = x.size(1);
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty({C}, weight.options());
  at::Tensor db = at::empty({C}, weight.options());
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.const_data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16)
    backward_impl<BF16>(dy, x, w, b, mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
                        dx, dw.mutable_data_ptr<float>(), db.mutable_data_ptr<float>());
  else
    backward_impl<F32>(dy, x, w, b, mean.const_data_ptr<float>(), invstd.const_data_ptr<float>(),
                       dx, dw.mutable_data_ptr<float>(), db.mutable_data_ptr<float>());
  return {dx, dw, db};
}

// The autograd node in C++: a Python autograd.Function costs about 100 us per pair and step.
class BNReLU : public torch::autograd::Function<BNReLU> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& weight, const at::Tensor& bias, at::Tensor running_mean,
                            at::Tensor running_var, double momentum, double eps) {
    auto [y, mean, invstd] = bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps);
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw, db] = bn_relu_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4]);
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor bn_relu_train(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         at::Tensor running_mean, at::Tensor running_var, double momentum, double eps) {
  return BNReLU::apply(x, weight, bias, running_mean, running_var, momentum, eps);
}

// ----------------------------------------------------------------------------- additions

// a + b for two bfloat16 tensors of the same sizes and strides (dense): each sum in float, rounded
// to nearest even, as PyTorch's CPU addition; one pass, where PyTorch's bfloat16 addition ran
// at a third of the memory bandwidth (the residual sums of the hourglass family).
at::Tensor add_forward(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "posefast: add takes bfloat16 tensors, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes() && a.strides() == b.strides() && a.is_non_overlapping_and_dense(),
              "posefast: add takes two dense tensors of the same sizes and strides");
  at::Tensor out = at::empty_like(a);
  const uint16_t* ap = reinterpret_cast<const uint16_t*>(a.const_data_ptr());
  const uint16_t* bp = reinterpret_cast<const uint16_t*>(b.const_data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  const int64_t n = a.numel(), vectors = n / kW;
  at::parallel_for(0, vectors, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) BF16::store(op + i * kW, BF16::load(ap + i * kW) + BF16::load(bp + i * kW));
  });
  const c10::BFloat16* at_ = a.const_data_ptr<c10::BFloat16>();
  const c10::BFloat16* bt = b.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* ot = out.mutable_data_ptr<c10::BFloat16>();
  for (int64_t i = vectors * kW; i < n; ++i) ot[i] = c10::BFloat16(static_cast<float>(at_[i]) + static_cast<float>(bt[i]));
  return out;
}

class Add : public torch::autograd::Function<Add> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& a, const at::Tensor& b) {
    return add_forward(a, b);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext*,
                                                 torch::autograd::variable_list grads) {
    return {grads[0], grads[0]};
  }
};

at::Tensor add_train(const at::Tensor& a, const at::Tensor& b) { return Add::apply(a, b); }

// ----------------------------------------------------------------------------- 2x2 max-pooling

// Max-pooling over 2x2 windows with stride 2 (the hourglass family's nn.MaxPool2d(2, 2)) of a
// channels-last tensor with even height and width and a multiple of 16 channels. PyTorch's
// kernel writes an int64 index per output value and its backward zero-fills the input gradient,
// then scatters into it; here the backward recomputes each window's winner from the input with
// the same rule (a value wins when it is greater than the maximum so far, or NaN, scanning the
// window row by row) and writes every input gradient once: the same values bit for bit.
template <typename T>
void max_pool_pass(const at::Tensor& x, const at::Tensor* grad, at::Tensor& out) {
  using S = typename T::storage;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), OH = H / 2, OW = W / 2;
  const int64_t nc = C / kW;
  const S* xp = reinterpret_cast<const S*>(x.const_data_ptr());
  const S* gp = grad ? reinterpret_cast<const S*>(grad->const_data_ptr()) : nullptr;
  S* op = reinterpret_cast<S*>(out.mutable_data_ptr());
  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / OH, oh = row % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t o = (row * OW + ow) * C;
        const int64_t corner = ((n * H + 2 * oh) * W + 2 * ow) * C;
        const int64_t at[4] = {corner, corner + C, corner + W * C, corner + W * C + C};
        for (int64_t q = 0; q < nc; ++q) {
          vf best = T::load(xp + at[0] + q * kW);
          vu which = vu{};
          for (uint32_t k = 1; k < 4; ++k) pool_step(best, which, T::load(xp + at[k] + q * kW), k);
          if (!gp) {
            T::store(op + o + q * kW, best);
            continue;
          }
          const vf g = T::load(gp + o + q * kW);
          for (uint32_t k = 0; k < 4; ++k) T::store(op + at[k] + q * kW, where_equal(which, k, g));
        }
      }
    }
  });
}

void check_pool_input(const at::Tensor& x) {
  check_input(x, "input");
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, "posefast: max_pool2 takes an even height and width, got ",
              x.size(2), "x", x.size(3));
}

at::Tensor max_pool2_forward(const at::Tensor& x) {
  check_pool_input(x);
  at::Tensor out = at::empty({x.size(0), x.size(1), x.size(2) / 2, x.size(3) / 2},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (x.scalar_type() == at::kBFloat16)
    max_pool_pass<BF16>(x, nullptr, out);
  else
    max_pool_pass<F32>(x, nullptr, out);
  return out;
}

at::Tensor max_pool2_backward(const at::Tensor& grad_out, const at::Tensor& x) {
  check_pool_input(x);
  const at::Tensor g = grad_out.to(x.scalar_type()).contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(g.size(0) == x.size(0) && g.size(1) == x.size(1) && g.size(2) * 2 == x.size(2) &&
                  g.size(3) * 2 == x.size(3), "posefast: max_pool2 gradient and input differ in shape");
  at::Tensor dx = at::empty_like(x);
  if (x.scalar_type() == at::kBFloat16)
    max_pool_pass<BF16>(x, &g, dx);
  else
    max_pool_pass<F32>(x, &g, dx);
  return dx;
}

class MaxPool2 : public torch::autograd::Function<MaxPool2> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    return max_pool2_forward(x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {max_pool2_backward(grads[0], ctx->get_saved_variables()[0])};
  }
};

at::Tensor max_pool2_train(const at::Tensor& x) { return MaxPool2::apply(x); }

// ----------------------------------------------------------------------------- the hourglass's merge

// upper + the lower branch upsampled by 2 (nearest), the hourglass family's merge of its two
// branches, on channels-last bfloat16 tensors: one pass, without the upsampled tensor (each sum
// in float rounded to nearest even: PyTorch's upsampling then addition, bit for bit); backward,
// the gradient of the upper branch is the output's and that of the lower branch the sum of
// each 2x2 window's, in float, rounded once.
void check_up2(const at::Tensor& upper, const at::Tensor& lower) {
  check_input(upper, "upper branch");
  check_input(lower, "lower branch");
  TORCH_CHECK(upper.scalar_type() == at::kBFloat16 && lower.scalar_type() == at::kBFloat16,
              "posefast: add_up2 takes bfloat16 tensors");
  TORCH_CHECK(upper.size(0) == lower.size(0) && upper.size(1) == lower.size(1) && upper.size(2) == 2 * lower.size(2) &&
                  upper.size(3) == 2 * lower.size(3),
              "posefast: add_up2 takes a lower branch of half the upper's height and width");
}

at::Tensor add_up2_forward(const at::Tensor& upper, const at::Tensor& lower) {
  check_up2(upper, lower);
  const int64_t N = upper.size(0), C = upper.size(1), H = upper.size(2), W = upper.size(3), nc = C / kW;
  at::Tensor out = at::empty_like(upper);
  const uint16_t* up = reinterpret_cast<const uint16_t*>(upper.const_data_ptr());
  const uint16_t* lo = reinterpret_cast<const uint16_t*>(lower.const_data_ptr());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  at::parallel_for(0, N * H, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / H, h = row % H;
      const uint16_t* lrow = lo + ((n * (H / 2) + h / 2) * (W / 2)) * C;
      for (int64_t w = 0; w < W; ++w) {
        const int64_t o = (row * W + w) * C;
        const uint16_t* l = lrow + (w / 2) * C;
        for (int64_t q = 0; q < nc; ++q) BF16::store(op + o + q * kW, BF16::load(up + o + q * kW) + BF16::load(l + q * kW));
      }
    }
  });
  return out;
}

// The lower branch's gradient: (N, C, LH, LW) from the output's (N, C, 2 LH, 2 LW).
at::Tensor add_up2_backward_lower(const at::Tensor& grad, int64_t N, int64_t C, int64_t LH, int64_t LW) {
  const at::Tensor g = grad.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(g.dim() == 4 && g.size(0) == N && g.size(1) == C && g.size(2) == 2 * LH && g.size(3) == 2 * LW,
              "posefast: add_up2 gradient and output differ in shape");
  const int64_t W = 2 * LW, nc = C / kW;
  at::Tensor dl = at::empty({N, C, LH, LW}, g.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* gp = reinterpret_cast<const uint16_t*>(g.const_data_ptr());
  uint16_t* dp = reinterpret_cast<uint16_t*>(dl.mutable_data_ptr());
  at::parallel_for(0, N * LH, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / LH, i = row % LH;
      const uint16_t* top = gp + ((n * 2 * LH + 2 * i) * W) * C;
      const uint16_t* bottom = top + W * C;
      for (int64_t j = 0; j < LW; ++j) {
        const int64_t a = 2 * j * C, b = a + C;
        for (int64_t q = 0; q < nc; ++q) {
          const int64_t c = q * kW;
          BF16::store(dp + (row * LW + j) * C + c,
                      ((BF16::load(top + a + c) + BF16::load(top + b + c)) + BF16::load(bottom + a + c)) + BF16::load(bottom + b + c));
        }
      }
    }
  });
  return dl;
}

class AddUp2 : public torch::autograd::Function<AddUp2> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& upper, const at::Tensor& lower) {
    ctx->saved_data["lower"] = std::vector<int64_t>(lower.sizes().begin(), lower.sizes().end());
    return add_up2_forward(upper, lower);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const std::vector<int64_t> s = ctx->saved_data["lower"].toIntVector();
    return {grads[0], add_up2_backward_lower(grads[0], s[0], s[1], s[2], s[3])};
  }
};

at::Tensor add_up2_train(const at::Tensor& upper, const at::Tensor& lower) { return AddUp2::apply(upper, lower); }

// ----------------------------------------------------------------------------- convolutions

#ifdef POSEFAST_AVX512BF16
// 1x1 and 3x3 convolutions (stride 1, 'same' padding) of channels-last bfloat16 tensors under
// autocast. oneDNN, through PyTorch, spends 50-250 us per call on setting a convolution up
// (primitive descriptors, weight reorders, several parallel regions: most of the time of the
// hourglass's small levels), and its weight gradients run at about two thirds of its forward
// rate. Here a k x k convolution is k*k matrix products of the N*H*W pixels (rows of C_in
// values) with the (C_out, C_in) slices of the weight, summed, on the AVX-512 BF16 dot product
// (vdpbf16ps: a float accumulator += the products of two adjacent bfloat16 pairs), each thread
// holding a tile of the output in registers:
//   forward   y[p, o]  = b[o] + sum_t sum_i xpad[p + t, i] w[o, i, t]   (pairs along i)
//   backward  dx[p, i] = sum_t sum_o dypad[p + t, o] w[o, i, flip t]   (pairs along o)
//             dw[o, i, t] = sum_p dy[p, o] xpad[p + t, i]             (pairs of pixels)
//             db[o] = sum_p dy[p, o]
// (xpad, dypad: copies with a zero border of k/2 pixels; p + t: the pixel shifted by tap t) in
// float accumulators, as under autocast: the float32 weight and bias rounded to bfloat16 for
// the products, the output rounded once to bfloat16. The weight and bias gradients are the
// float sums themselves (autocast's path rounds them to bfloat16 on the way back).

struct ConvShape {
  int64_t N, H, W, Ci, Co, k;
  int64_t pad() const { return k / 2; }
  int64_t HP() const { return H + 2 * pad(); }
  int64_t WP() const { return W + 2 * pad(); }
  int64_t taps() const { return k * k; }
  int64_t pixels() const { return N * H * W; }
  // offset (in pixels) of tap t from a pixel of a padded image
  int64_t tap(int64_t t) const { return (t / k) * WP() + t % k; }
  // the padded pixel under output pixel (n, h, w): its index in the padded tensor
  int64_t padded(int64_t n, int64_t h, int64_t w) const { return (n * HP() + h) * WP() + w; }
};

// The offset of w[o, i, tap t] in a (Co, Ci, k, k) weight of any layout (the trainer's weights are
// channels-last, whose contiguous copy would cost a strided pass of its own).
struct WeightIndex {
  int64_t so, si, sh, sw, k;
  explicit WeightIndex(const at::Tensor& w)
      : so(w.stride(0)), si(w.stride(1)), sh(w.stride(2)), sw(w.stride(3)), k(w.size(3)) {}
  int64_t operator()(int64_t o, int64_t i, int64_t t) const { return o * so + i * si + (t / k) * sh + (t % k) * sw; }
};

// R pixels x V vectors of 16 outputs: out[r, 16v + j] = bias + sum over taps and pairs of
// a[r + tap] pair p . b[tap][p][16v + j]. a: bfloat16 pixel rows (lda values apart), b: pairs
// [taps][P][ldb].
template <int R, int V>
inline void product_tile(const uint16_t* a, int64_t lda, const int64_t* tap, int64_t taps, const uint32_t* b,
                         int64_t ldb, int64_t P, const float* bias, uint16_t* out, int64_t ldo) {
  __m512 acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = bias ? _mm512_loadu_ps(bias + kW * v) : _mm512_setzero_ps();
  for (int64_t t = 0; t < taps; ++t) {
    const uint16_t* at_ = a + tap[t] * lda;
    const uint32_t* bt = b + t * P * ldb;
    for (int64_t p = 0; p < P; ++p) {
      __m512bh bv[V];
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(bt + p * ldb + kW * v);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        uint32_t two;
        std::memcpy(&two, at_ + r * lda + 2 * p, sizeof two);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(two));
#pragma GCC unroll 8
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + kW * v), (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
}

// A run of n consecutive pixels: tiles of R (a power of two), the rest in halving tiles.
template <int R, int V>
inline void product_run(const uint16_t* a, int64_t lda, int64_t n, const int64_t* tap, int64_t taps,
                        const uint32_t* b, int64_t ldb, int64_t P, const float* bias, uint16_t* out, int64_t ldo) {
  int64_t i = 0;
  for (; i + R <= n; i += R) product_tile<R, V>(a + i * lda, lda, tap, taps, b, ldb, P, bias, out + i * ldo, ldo);
  if constexpr (R > 1) {
    if (i < n) product_run<R / 2, V>(a + i * lda, lda, n - i, tap, taps, b, ldb, P, bias, out + i * ldo, ldo);
  }
}

// out (pixels x cols) = the sum over taps of a's shifted pixels . b; for a 1x1 convolution the
// pixels are one run, for a 3x3 one each image row is a run of W pixels of the padded input.
template <int V>
void product_cols(const uint16_t* a, const ConvShape& s, int64_t cin, const int64_t* tap, const uint32_t* b,
                  int64_t ldb, const float* bias, uint16_t* out, int64_t ldo) {
  constexpr int R = V == 1 ? 16 : (V <= 3 ? 8 : 4);  // at most 24 accumulators
  const int64_t P = s.k * cin / 2, taps = s.k;  // per row of the window (product)
  if (s.k == 1) {
    const int64_t M = s.pixels(), chunk = 4 * R;
    at::parallel_for(0, (M + chunk - 1) / chunk, 4, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t m = c * chunk, n = std::min(chunk, M - m);
        product_run<R, V>(a + m * cin, cin, n, tap, taps, b, ldb, P, bias, out + m * ldo, ldo);
      }
    });
    return;
  }
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / s.H, h = row % s.H;
      product_run<R, V>(a + s.padded(n, h, 0) * cin, cin, s.W, tap, taps, b, ldb, P, bias,
                        out + row * s.W * ldo, ldo);
    }
  });
}

// The columns in chunks of up to 6 vectors (96 channels).
void product(const uint16_t* a, const ConvShape& s, int64_t cin, int64_t cols, const uint32_t* b,
             const float* bias, uint16_t* out) {
  // one tap per row of the window: its k pixels are k * cin contiguous values of the padded
  // input, and the packed weight's taps of a row follow each other the same way, so a row's taps
  // are one run of k * cin / 2 pairs (the same products in the same order as tap by tap)
  std::vector<int64_t> tap(s.k);
  for (int64_t dy = 0; dy < s.k; ++dy) tap[dy] = s.tap(dy * s.k);
  for (int64_t c0 = 0; c0 < cols; c0 += 6 * kW) {
    const float* bc = bias ? bias + c0 : nullptr;
    switch (std::min<int64_t>(6, (cols - c0) / kW)) {
      case 1: product_cols<1>(a, s, cin, tap.data(), b + c0, cols, bc, out + c0, cols); break;
      case 2: product_cols<2>(a, s, cin, tap.data(), b + c0, cols, bc, out + c0, cols); break;
      case 3: product_cols<3>(a, s, cin, tap.data(), b + c0, cols, bc, out + c0, cols); break;
      case 4: product_cols<4>(a, s, cin, tap.data(), b + c0, cols, bc, out + c0, cols); break;
      case 5: product_cols<5>(a, s, cin, tap.data(), b + c0, cols, bc, out + c0, cols); break;
      default: product_cols<6>(a, s, cin, tap.data(), b + c0, cols, bc, out + c0, cols); break;
    }
  }
}

// 16 pairs (r0[j], r1[j]) of two bfloat16 rows.
inline __m512i interleave(const uint16_t* r0, const uint16_t* r1) {
  const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
  const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1)));
  return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}

constexpr int64_t kPixelPairs = 32;  // pixel pairs per block of the weight gradient

// dw[t, 16v + j] += sum_p dy pair p of output t . x pair p of input 16v + j, a T x V tile.
template <int T, int V>
inline void weight_tile(const uint32_t* dy, int64_t ldy, const uint32_t* x, int64_t ldx, int64_t P, float* dw,
                        int64_t ldw) {
  __m512 acc[T][V];
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh xv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(x + p * ldx + kW * v);
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512bh g = (__m512bh)_mm512_set1_epi32(static_cast<int>(dy[p * ldy + t]));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], g, xv[v]);
    }
  }
#pragma GCC unroll 16
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(dw + t * ldw + kW * v, _mm512_add_ps(_mm512_loadu_ps(dw + t * ldw + kW * v), acc[t][v]));
}

template <int V>
void weight_block(const uint32_t* dy, int64_t Co, const uint32_t* x, int64_t Ci, int64_t P, float* dw) {
  constexpr int T = V <= 3 ? 8 : 4;
  int64_t o = 0;
  for (; o + T <= Co; o += T) weight_tile<T, V>(dy + o, Co, x, Ci, P, dw + o * Ci, Ci);
  for (; o < Co; ++o) weight_tile<1, V>(dy + o, Co, x, Ci, P, dw + o * Ci, Ci);
}

// Asks for the input and gradient rows of the block from pixel m0 (the input, saved in the
// forward pass, comes from memory) while the block before it computes.
void prefetch_block(const uint16_t* x, const uint16_t* dy, const ConvShape& s, int64_t m0) {
  const int64_t M = s.pixels(), m1 = std::min(M, m0 + 2 * kPixelPairs) - 1;
  auto at = [&](int64_t m) { return s.k == 1 ? m : s.padded(m / (s.H * s.W), (m / s.W) % s.H, m % s.W); };
  const int64_t first = at(m0), last = at(m1) + (s.k == 1 ? 0 : 2 * s.WP() + 2);
  const char* xb = reinterpret_cast<const char*>(x + first * s.Ci);
  const char* xe = reinterpret_cast<const char*>(x + (last + 1) * s.Ci);
  for (const char* q = xb; q < xe; q += 64) _mm_prefetch(q, _MM_HINT_T1);
  const char* gb = reinterpret_cast<const char*>(dy + m0 * s.Co);
  const char* ge = reinterpret_cast<const char*>(dy + (m1 + 1) * s.Co);
  for (const char* q = gb; q < ge; q += 64) _mm_prefetch(q, _MM_HINT_T1);
}

// dw ([taps][Co][Ci]) and db (Co), float, from dy (pixels x Co) and x (the padded input for a
// 3x3 convolution): each thread sums its blocks of 2 * kPixelPairs pixels into float sums of
// its own, then the threads' sums add.
void weight_grad(const uint16_t* dy, const uint16_t* x, const ConvShape& s, at::Tensor& dwt, float* db) {
  const int64_t Co = s.Co, Ci = s.Ci, M = s.pixels(), taps = s.taps();
  const int nt = at::get_num_threads();
  const int64_t per = taps * Co * Ci + Co;
  // each thread clears its own sums (in parallel, not a serial fill before the region); a
  // thread that gets no block leaves its sums out, which adds the same bits as adding its zeros
  std::unique_ptr<float[]> sums(new float[static_cast<size_t>(nt) * per]);
  std::vector<char> used(nt, 0);
  const std::vector<uint16_t> zeros(std::max(Co, Ci), 0);
  const int64_t blocks = (M + 2 * kPixelPairs - 1) / (2 * kPixelPairs);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int me = at::get_thread_num();
    float* mine = sums.get() + static_cast<size_t>(me) * per;
    float* mdb = mine + taps * Co * Ci;
    std::fill(mine, mine + per, 0.f);
    used[me] = 1;
    std::vector<uint32_t> gp(kPixelPairs * Co), xp(kPixelPairs * Ci);
    std::vector<int64_t> base(2 * kPixelPairs);  // each pixel's padded index (-1: past the end)
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t m0 = blk * 2 * kPixelPairs, P = std::min<int64_t>(kPixelPairs, (M - m0 + 1) / 2);
      // (n, h, w) of pixel m0, then stepped along: no division per pixel
      int64_t n = m0 / (s.H * s.W), h = (m0 / s.W) % s.H, w = m0 % s.W;
      for (int64_t j = 0; j < 2 * P; ++j) {
        const int64_t m = m0 + j;
        base[j] = m >= M ? -1 : (s.k == 1 ? m : s.padded(n, h, w));
        if (++w == s.W) {
          w = 0;
          if (++h == s.H) h = 0, ++n;
        }
      }
      if (blk + 1 < b1) prefetch_block(x, dy, s, m0 + 2 * kPixelPairs);
      // the block's pixel pairs of dy, 16 outputs at a time; db from the same loads, the thread's
      // running sum kept in a register over the block (the same additions in the same order)
      for (int64_t c = 0; c < Co; c += kW) {
        __m512 sum = _mm512_loadu_ps(mdb + c);
        for (int64_t p = 0; p < P; ++p) {
          const uint16_t* ga = dy + (m0 + 2 * p) * Co;
          const uint16_t* gb = base[2 * p + 1] < 0 ? zeros.data() : ga + Co;
          const __m512i v = interleave(ga + c, gb + c);
          _mm512_storeu_si512(gp.data() + p * Co + c, v);
          const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
          const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
          sum = _mm512_add_ps(sum, _mm512_add_ps(lo, hi));
        }
        _mm512_storeu_ps(mdb + c, sum);
      }
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t shift = s.k == 1 ? 0 : s.tap(t);
        for (int64_t p = 0; p < P; ++p) {
          const uint16_t* xa = x + (base[2 * p] + shift) * Ci;
          const uint16_t* xb = base[2 * p + 1] < 0 ? zeros.data() : x + (base[2 * p + 1] + shift) * Ci;
          for (int64_t c = 0; c < Ci; c += kW) _mm512_storeu_si512(xp.data() + p * Ci + c, interleave(xa + c, xb + c));
        }
        for (int64_t c0 = 0; c0 < Ci; c0 += 6 * kW) {
          const uint32_t* xc = xp.data() + c0;
          float* d = mine + t * Co * Ci + c0;
          switch (std::min<int64_t>(6, (Ci - c0) / kW)) {
            case 1: weight_block<1>(gp.data(), Co, xc, Ci, P, d); break;
            case 2: weight_block<2>(gp.data(), Co, xc, Ci, P, d); break;
            case 3: weight_block<3>(gp.data(), Co, xc, Ci, P, d); break;
            case 4: weight_block<4>(gp.data(), Co, xc, Ci, P, d); break;
            case 5: weight_block<5>(gp.data(), Co, xc, Ci, P, d); break;
            default: weight_block<6>(gp.data(), Co, xc, Ci, P, d); break;
          }
        }
      }
    }
  });
  // [taps][Co][Ci] -> the weight gradient's (Co, Ci, k, k), in the weight's layout, the threads'
  // sums added in thread order, rows of outputs in parallel
  std::vector<const float*> part;
  for (int th = 0; th < nt; ++th)
    if (used[th]) part.push_back(sums.get() + static_cast<size_t>(th) * per);
  float* dw = dwt.mutable_data_ptr<float>();
  const WeightIndex at_(dwt);
  at::parallel_for(0, taps * Co, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / Co, o = r % Co, off = r * Ci;
      if (at_.si == 1) {  // the inputs contiguous (channels-last, or 1x1): 16 at a time, the same sums
        for (int64_t i = 0; i < Ci; i += kW) {
          __m512 v = _mm512_setzero_ps();
          for (const float* q : part) v = _mm512_add_ps(v, _mm512_loadu_ps(q + off + i));
          _mm512_storeu_ps(dw + at_(o, i, t), v);
        }
      } else {
        for (int64_t i = 0; i < Ci; ++i) {
          float v = 0.f;
          for (const float* q : part) v += q[off + i];
          dw[at_(o, i, t)] = v;
        }
      }
    }
  });
  for (int64_t o = 0; o < Co; ++o) {
    float v = 0.f;
    for (const float* q : part) v += q[taps * Co * Ci + o];
    db[o] = v;
  }
}

ConvShape check_conv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "posefast: conv takes a channels-last bfloat16 4-d input");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.scalar_type() == at::kFloat &&
                  weight.size(2) == weight.size(3) && (weight.size(2) == 1 || weight.size(2) == 3),
              "posefast: conv takes a float32 (C_out, C_in, k, k) weight, k 1 or 3, matching the input's ",
              x.size(1), " channels");
  TORCH_CHECK(x.size(1) % kW == 0 && weight.size(0) % kW == 0, "posefast: conv takes multiples of ", kW,
              " channels, got ", x.size(1), " -> ", weight.size(0));
  return {x.size(0), x.size(2), x.size(3), x.size(1), weight.size(0), weight.size(2)};
}

// A channels-last copy of x with a zero border of `pad` pixels (x itself when pad is 0).
at::Tensor padded_copy(const at::Tensor& x, int64_t pad) {
  if (pad == 0) return x;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::empty({N, C, H + 2 * pad, W + 2 * pad}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const uint16_t* src = reinterpret_cast<const uint16_t*>(x.const_data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  const int64_t WP = W + 2 * pad, HP = H + 2 * pad;
  at::parallel_for(0, N * HP, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t n = row / HP, h = row % HP - pad;
      uint16_t* d = dst + row * WP * C;
      if (h < 0 || h >= H) {
        std::memset(d, 0, WP * C * sizeof(uint16_t));
        continue;
      }
      std::memset(d, 0, pad * C * sizeof(uint16_t));
      std::memcpy(d + pad * C, src + (n * H + h) * W * C, W * C * sizeof(uint16_t));
      std::memset(d + (pad + W) * C, 0, pad * C * sizeof(uint16_t));
    }
  });
  return out;
}

// The 32-bit pair of two bfloat16 values: lo in the low half.
inline uint32_t pair_of(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }
inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }

// The weight, rounded to bfloat16 as autocast rounds it, as pairs for the products: a plain loop
// for small weights (PyTorch's operations cost more in calls than they save there), PyTorch's
// vectorised conversion and copy from 32768 values on (a 256 x 256 3x3 weight: 0.4 ms, not 1.3).
constexpr int64_t kLargeWeight = 32768;

// 16 floats rounded to bfloat16, to nearest even as c10::BFloat16 rounds them. The instruction
// flushes denormals (c10 keeps them), which vdpbf16ps treats as zero anyway, and keeps NaNs NaN.
inline __m256i bf16_of(const float* p) { return (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(p)); }

// Forward: [taps][Ci / 2][Co] pairs along the inputs.
at::Tensor pack_forward(const at::Tensor& weight, int64_t Co, int64_t Ci, int64_t taps) {
  if (weight.numel() >= kLargeWeight)  // (Co, Ci / 2, 2, taps) -> (taps, Ci / 2, Co, 2)
    return weight.contiguous().to(at::kBFloat16).view({Co, Ci / 2, 2, taps}).permute({3, 1, 0, 2}).contiguous();
  at::Tensor packed = at::empty({taps, Ci / 2, Co, 2}, weight.options().dtype(at::kBFloat16));
  const float* wp = weight.const_data_ptr<float>();
  const WeightIndex at_(weight);
  uint32_t* pp = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr());
  if (at_.si == 1) {  // the inputs contiguous (channels-last, or 1x1): 16 values are 8 pairs
    at::parallel_for(0, Co, 8, [&](int64_t o0, int64_t o1) {
      alignas(32) uint32_t pairs[kW / 2];
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t t = 0; t < taps; ++t) {
          const float* row = wp + at_(o, 0, t);
          for (int64_t p0 = 0; p0 < Ci / 2; p0 += kW / 2) {
            _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), bf16_of(row + 2 * p0));
            for (int j = 0; j < kW / 2; ++j) pp[(t * (Ci / 2) + p0 + j) * Co + o] = pairs[j];
          }
        }
    });
    return packed;
  }
  at::parallel_for(0, taps * (Ci / 2), 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / (Ci / 2), p = r % (Ci / 2);
      for (int64_t o = 0; o < Co; ++o)
        pp[r * Co + o] = pair_of(bf16_bits(wp[at_(o, 2 * p, t)]), bf16_bits(wp[at_(o, 2 * p + 1, t)]));
    }
  });
  return packed;
}

// Input gradient: [taps][Co / 2][Ci] pairs along the outputs, the taps reversed.
at::Tensor pack_backward(const at::Tensor& weight, int64_t Co, int64_t Ci, int64_t taps) {
  if (weight.numel() >= kLargeWeight)  // (Co / 2, 2, Ci, taps) -> (taps reversed, Co / 2, Ci, 2)
    return weight.contiguous().to(at::kBFloat16).view({Co / 2, 2, Ci, taps}).flip({3}).permute({3, 0, 2, 1}).contiguous();
  at::Tensor packed = at::empty({taps, Co / 2, Ci, 2}, weight.options().dtype(at::kBFloat16));
  const float* wp = weight.const_data_ptr<float>();
  const WeightIndex at_(weight);
  uint32_t* pp = reinterpret_cast<uint32_t*>(packed.mutable_data_ptr());
  at::parallel_for(0, taps * (Co / 2), 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = r / (Co / 2), p = r % (Co / 2);
      uint32_t* out = pp + r * Ci;
      if (at_.si == 1) {  // 16 inputs of two outputs at a time
        const float* w0 = wp + at_(2 * p, 0, taps - 1 - t);
        const float* w1 = wp + at_(2 * p + 1, 0, taps - 1 - t);
        for (int64_t i = 0; i < Ci; i += kW) {
          const __m512i lo = _mm512_cvtepu16_epi32(bf16_of(w0 + i));
          const __m512i hi = _mm512_cvtepu16_epi32(bf16_of(w1 + i));
          _mm512_storeu_si512(out + i, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      } else {
        for (int64_t i = 0; i < Ci; ++i)
          out[i] = pair_of(bf16_bits(wp[at_(2 * p, i, taps - 1 - t)]), bf16_bits(wp[at_(2 * p + 1, i, taps - 1 - t)]));
      }
    }
  });
  return packed;
}

// y from the padded input.
at::Tensor conv_forward_padded(const at::Tensor& xpad, const ConvShape& s, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& like) {
  const int64_t Ci = s.Ci, Co = s.Co, taps = s.taps();
  const at::Tensor packed = pack_forward(weight, Co, Ci, taps);
  std::vector<float> b;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == Co, "posefast: conv takes a float32 bias of ",
                Co, " values");
    const at::Tensor bc = bias->contiguous();
    for (int64_t o = 0; o < Co; ++o) b.push_back(static_cast<float>(c10::BFloat16(bc.const_data_ptr<float>()[o])));
  }
  at::Tensor y = at::empty({s.N, Co, s.H, s.W}, like.options().memory_format(at::MemoryFormat::ChannelsLast));
  product(reinterpret_cast<const uint16_t*>(xpad.const_data_ptr()), s, Ci, Co,
          reinterpret_cast<const uint32_t*>(packed.const_data_ptr()), b.empty() ? nullptr : b.data(),
          reinterpret_cast<uint16_t*>(y.mutable_data_ptr()));
  return y;
}

at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const ConvShape s = check_conv(x, weight);
  return conv_forward_padded(padded_copy(x, s.pad()), s, weight, bias, x);
}

// dx (when wanted), dw, db (when there is a bias), from the padded input.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(const at::Tensor& grad_out, const at::Tensor& xpad,
                                                             const ConvShape& s, const at::Tensor& weight,
                                                             bool input_grad, bool bias_grad) {
  const at::Tensor dy = grad_out.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == s.N && dy.size(1) == s.Co && dy.size(2) == s.H && dy.size(3) == s.W,
              "posefast: conv gradient and output differ in shape");
  const int64_t Ci = s.Ci, Co = s.Co, taps = s.taps();
  const uint16_t* g = reinterpret_cast<const uint16_t*>(dy.const_data_ptr());
  at::Tensor dx;
  if (input_grad) {
    const at::Tensor packed = pack_backward(weight, Co, Ci, taps);
    const at::Tensor dypad = padded_copy(dy, s.pad());
    ConvShape back = s;
    back.Ci = Co;
    back.Co = Ci;
    dx = at::empty({s.N, Ci, s.H, s.W}, dy.options().memory_format(at::MemoryFormat::ChannelsLast));
    product(reinterpret_cast<const uint16_t*>(dypad.const_data_ptr()), back, Co, Ci,
            reinterpret_cast<const uint32_t*>(packed.const_data_ptr()), nullptr,
            reinterpret_cast<uint16_t*>(dx.mutable_data_ptr()));
  }
  // in the weight's layout (channels-last in the trainer), which autograd keeps as the gradient
  // without a copy
  at::Tensor dw = at::empty(weight.sizes(), weight.options().memory_format(weight.suggest_memory_format()));
  at::Tensor db = at::empty({Co}, weight.options());
  weight_grad(g, reinterpret_cast<const uint16_t*>(xpad.const_data_ptr()), s, dw, db.mutable_data_ptr<float>());
  return {dx, dw, bias_grad ? db : at::Tensor()};
}

// The autograd node saves the padded input (a 3x3 convolution's backward reads it for the
// weight gradient).
class Conv : public torch::autograd::Function<Conv> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    const ConvShape s = check_conv(x, weight);
    const at::Tensor xpad = padded_copy(x, s.pad());
    ctx->save_for_backward({xpad, weight});
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["shape"] = std::vector<int64_t>{s.N, s.H, s.W, s.Ci, s.Co, s.k};
    return conv_forward_padded(xpad, s, weight, bias, x);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::vector<int64_t> v = ctx->saved_data["shape"].toIntVector();
    const ConvShape s{v[0], v[1], v[2], v[3], v[4], v[5]};
    auto [dx, dw, db] = conv_backward(grads[0], saved[0], s, saved[1], ctx->needs_input_grad(0),
                                      ctx->saved_data["bias"].toBool());
    return {dx, dw, db};
  }
};

at::Tensor conv_train(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return Conv::apply(x, weight, bias);
}

// ----------------------------------------------------------------------------- residual branch

// The pre-activation bottleneck's branch, BN-ReLU-conv1x1 - BN-ReLU-conv3x3 - BN-ReLU-conv1x1,
// as one autograd node: the kernels above in the order the six separate nodes run them, so the
// same values and gradients bit for bit, without the Python calls, checks and graph nodes of
// six layers (about 0.1 ms a block). params: per layer the BatchNorm weight and bias, then the
// convolution's weight and bias (12); buffers: per layer running mean, running variance and
// num_batches_tracked (9), updated as the separate layers update them.
struct BranchForward {
  at::Tensor y;
  std::vector<at::Tensor> saved;  // per layer: BN input, mean, invstd, conv input (padded)
  std::vector<ConvShape> shapes;
};

BranchForward branch_run(const at::Tensor& x, at::TensorList params, at::TensorList buffers, double momentum,
                         double eps) {
  TORCH_CHECK(params.size() == 12 && buffers.size() == 9,
              "posefast: branch takes 12 parameters and 9 buffers (3 BatchNorm + convolution layers)");
  BranchForward out;
  at::Tensor h = x;
  for (int layer = 0; layer < 3; ++layer) {
    const at::Tensor& gamma = params[4 * layer];
    const at::Tensor& beta = params[4 * layer + 1];
    const at::Tensor& weight = params[4 * layer + 2];
    const at::Tensor& bias = params[4 * layer + 3];
    auto [a, mean, invstd] = bn_relu_forward(h, gamma, beta, buffers[3 * layer], buffers[3 * layer + 1], momentum, eps);
    at::Tensor tracked = buffers[3 * layer + 2];
    TORCH_CHECK(tracked.scalar_type() == at::kLong && tracked.numel() == 1,
                "posefast: branch: num_batches_tracked must be one int64 value");
    tracked.add_(1);
    const ConvShape s = check_conv(a, weight);
    const at::Tensor apad = padded_copy(a, s.pad());
    out.saved.insert(out.saved.end(), {h, mean, invstd, apad});
    out.shapes.push_back(s);
    h = conv_forward_padded(apad, s, weight, bias, a);
  }
  out.y = h;
  return out;
}

at::Tensor branch_forward(const at::Tensor& x, at::TensorList params, at::TensorList buffers, double momentum,
                          double eps) {
  return branch_run(x, params, buffers, momentum, eps).y;
}

class Branch : public torch::autograd::Function<Branch> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, at::TensorList params,
                            at::TensorList buffers, double momentum, double eps) {
    BranchForward f = branch_run(x, params, buffers, momentum, eps);
    std::vector<at::Tensor> keep = f.saved;
    keep.insert(keep.end(), params.begin(), params.end());
    ctx->save_for_backward(keep);
    std::vector<int64_t> shape;
    for (const ConvShape& s : f.shapes) shape.insert(shape.end(), {s.N, s.H, s.W, s.Ci, s.Co, s.k});
    ctx->saved_data["shapes"] = shape;
    return f.y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();  // 12 per-layer tensors, then the 12 parameters
    const std::vector<int64_t> v = ctx->saved_data["shapes"].toIntVector();
    std::vector<at::Tensor> param_grads(12);
    at::Tensor g = grads[0];
    for (int layer = 2; layer >= 0; --layer) {
      const ConvShape s{v[6 * layer], v[6 * layer + 1], v[6 * layer + 2], v[6 * layer + 3], v[6 * layer + 4],
                        v[6 * layer + 5]};
      const at::Tensor& bn_in = saved[4 * layer];
      const at::Tensor& gamma = saved[12 + 4 * layer];
      const at::Tensor& beta = saved[12 + 4 * layer + 1];
      auto [da, dw, db] = conv_backward(g, saved[4 * layer + 3], s, saved[12 + 4 * layer + 2], true, true);
      param_grads[4 * layer + 2] = dw;
      param_grads[4 * layer + 3] = db;
      const bool input_grad = layer > 0 || ctx->needs_input_grad(0);
      auto [dx, dgamma, dbeta] = bn_relu_backward(da, bn_in, gamma, beta, saved[4 * layer + 1], saved[4 * layer + 2]);
      param_grads[4 * layer] = dgamma;
      param_grads[4 * layer + 1] = dbeta;
      g = input_grad ? dx : at::Tensor();
    }
    torch::autograd::variable_list out;
    out.push_back(g);
    out.insert(out.end(), param_grads.begin(), param_grads.end());
    out.resize(out.size() + 9);  // the buffers
    out.resize(out.size() + 2);  // momentum, eps
    return out;
  }
};

at::Tensor branch_train(const at::Tensor& x, at::TensorList params, at::TensorList buffers, double momentum,
                        double eps) {
  return Branch::apply(x, params, buffers, momentum, eps);
}
#endif  // POSEFAST_AVX512BF16

#ifdef POSEFAST_AVX2
// ----------------------------------------------------------------------------- float32 weight gradients (AVX2)

// The weight and bias gradients of a 1x1 or 3x3 convolution (stride 1, 'same' zero padding, no
// groups) on channels-last float32 tensors: dw[o][tap][i] = sum over the output pixels p of
// dy[p][o] * x[p + tap][i]. oneDNN's float32 kernels reach about 0.65x their forward rate on
// these (AVX2, Zen 2); here each (R outputs x 16 inputs) tile keeps its 2R sums in registers
// over a block of pixels, broadcasting dy and loading x in 8-float halves, the pixels of a block
// read from the caches by every tile. Threads own disjoint output channels, so every sum runs in
// the same order whatever the thread count: blocks of output rows in order, pixels in order.
struct WgradShape {
  int64_t N, H, W, Ci, Co, k;
  int64_t HP() const { return H + k - 1; }
  int64_t WP() const { return W + k - 1; }
};

constexpr int64_t kWgPixels = 128;  // output pixels per block (whole output rows, at least 4)
constexpr int kWgR = 6;              // output channels per tile

// dw[r * ld + j], r < R, j < 16: += sum over the rows' pixels p of g[q][p][r] * x[q][p][j]: row
// q's W pixels at g + q * gs (6 values each, packed) and x + q * xs (16 values each, px apart)
template <int R>
void wgrad_tile(const float* g, int64_t gs, const float* x, int64_t xs, int64_t px, int64_t nrows, int64_t W,
                float* dw, int64_t ld) {
  // the 2R sums as named registers (GCC kept an array of them on the stack, a store per product)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, b4 = a0, b5 = a0;
  for (int64_t q = 0; q < nrows; ++q) {
    const float* gp = g + q * gs;
    const float* xp = x + q * xs;
    for (int64_t p = 0; p < W; ++p, gp += kWgR, xp += px) {
      const __m256 x0 = _mm256_loadu_ps(xp), x1 = _mm256_loadu_ps(xp + 8);
      __m256 v = _mm256_broadcast_ss(gp);
      a0 = _mm256_fmadd_ps(v, x0, a0);
      b0 = _mm256_fmadd_ps(v, x1, b0);
      if constexpr (R > 1) {
        v = _mm256_broadcast_ss(gp + 1);
        a1 = _mm256_fmadd_ps(v, x0, a1);
        b1 = _mm256_fmadd_ps(v, x1, b1);
      }
      if constexpr (R > 2) {
        v = _mm256_broadcast_ss(gp + 2);
        a2 = _mm256_fmadd_ps(v, x0, a2);
        b2 = _mm256_fmadd_ps(v, x1, b2);
      }
      if constexpr (R > 3) {
        v = _mm256_broadcast_ss(gp + 3);
        a3 = _mm256_fmadd_ps(v, x0, a3);
        b3 = _mm256_fmadd_ps(v, x1, b3);
      }
      if constexpr (R > 4) {
        v = _mm256_broadcast_ss(gp + 4);
        a4 = _mm256_fmadd_ps(v, x0, a4);
        b4 = _mm256_fmadd_ps(v, x1, b4);
      }
      if constexpr (R > 5) {
        v = _mm256_broadcast_ss(gp + 5);
        a5 = _mm256_fmadd_ps(v, x0, a5);
        b5 = _mm256_fmadd_ps(v, x1, b5);
      }
    }
  }
  const __m256 lo[6] = {a0, a1, a2, a3, a4, a5}, hi[6] = {b0, b1, b2, b3, b4, b5};
  for (int r = 0; r < R; ++r) {
    float* d = dw + r * ld;
    _mm256_storeu_ps(d, _mm256_add_ps(_mm256_loadu_ps(d), lo[r]));
    _mm256_storeu_ps(d + 8, _mm256_add_ps(_mm256_loadu_ps(d + 8), hi[r]));
  }
}

using WgradTileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, int64_t, float*,
                             int64_t);
constexpr WgradTileFn kWgradTiles[7] = {nullptr, wgrad_tile<1>, wgrad_tile<2>, wgrad_tile<3>,
                                        wgrad_tile<4>, wgrad_tile<5>, wgrad_tile<6>};

// x with k // 2 zeros around each image (channels-last, float32)
at::Tensor padded_f32(const at::Tensor& x, int64_t pad) {
  if (pad == 0) return x;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  at::Tensor out = at::zeros({N, H + 2 * pad, W + 2 * pad, C}, x.options());
  const float* src = x.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  at::parallel_for(0, N * H, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, h = row % H;
      std::memcpy(dst + ((n * (H + 2 * pad) + h + pad) * (W + 2 * pad) + pad) * C, src + row * W * C,
                  sizeof(float) * W * C);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(k == 1 || k == 3, "posefast: conv_weight_grad takes 1x1 and 3x3 kernels, got ", k);
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "posefast: conv_weight_grad: the input must be a channels-last float32 4-d tensor");
  TORCH_CHECK(x.size(1) % 16 == 0, "posefast: conv_weight_grad: ", x.size(1), " input channels, not a multiple of 16");
  at::Tensor dy = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(dy.dim() == 4 && dy.scalar_type() == at::kFloat && dy.size(0) == x.size(0) && dy.size(2) == x.size(2) &&
              dy.size(3) == x.size(3), "posefast: conv_weight_grad: the gradient must be float32 of the input's batch and size");
  const WgradShape s{x.size(0), x.size(2), x.size(3), x.size(1), dy.size(1), k};
  const at::Tensor xp = padded_f32(x, k / 2);
  const float* xd = xp.const_data_ptr<float>();
  const float* g = dy.const_data_ptr<float>();
  // [o][tap][i]: the channels-last layout of a (Co, Ci, k, k) weight
  at::Tensor dw = at::zeros({s.Co, k, k, s.Ci}, x.options());
  float* dwp = dw.mutable_data_ptr<float>();
  const int64_t rows = s.N * s.H, taps = k * k, W = s.W, WP = s.WP();
  const int64_t block = std::max<int64_t>(4, kWgPixels / W);  // output rows per block
  const int64_t otiles = (s.Co + kWgR - 1) / kWgR, itiles = s.Ci / 16;
  at::parallel_for(0, otiles * itiles, 1, [&](int64_t t0, int64_t t1) {
    // this thread's tiles, (o-tile, i-tile) pairs t0..t1-1: the o-tiles it touches and all i-tiles
    const int64_t ot0 = t0 / itiles, ot1 = (t1 - 1) / itiles + 1;
    // panels of a block: dy [o-tile][row][W][6], the padded input [i-tile][row][kh][WP][16] (3x3;
    // a 1x1 one reads the input in place: a block's pixels are consecutive rows of it)
    const int64_t gs = W * kWgR, xs = k * WP * 16;
    std::vector<float> gpack((ot1 - ot0) * block * gs, 0.f), xpack(k == 1 ? 0 : itiles * block * xs);
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t nrows = std::min(rows, r0 + block) - r0;
      for (int64_t q = 0; q < nrows; ++q) {
        const int64_t row = r0 + q, n = row / s.H, h = row % s.H;
        const float* gr = g + row * W * s.Co;
        for (int64_t ot = ot0; ot < ot1; ++ot) {
          const int64_t o0 = ot * kWgR, nr = std::min<int64_t>(kWgR, s.Co - o0);
          float* dst = gpack.data() + ((ot - ot0) * block + q) * gs;
          for (int64_t p = 0; p < W; ++p)
            for (int64_t r = 0; r < nr; ++r) dst[p * kWgR + r] = gr[p * s.Co + o0 + r];
        }
        for (int64_t kh = 0; kh < k && k > 1; ++kh) {
          const float* xr = xd + (n * s.HP() + h + kh) * WP * s.Ci;
          for (int64_t it = 0; it < itiles; ++it) {
            float* dst = xpack.data() + (it * block + q) * xs + kh * WP * 16;
            for (int64_t p = 0; p < WP; ++p) std::memcpy(dst + 16 * p, xr + p * s.Ci + 16 * it, 16 * sizeof(float));
          }
        }
      }
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t kh = tap / k, kw = tap % k;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t ot = t / itiles, it = t % itiles, o0 = ot * kWgR;
          const float* gt = gpack.data() + (ot - ot0) * block * gs;
          float* d = dwp + (o0 * taps + tap) * s.Ci + 16 * it;
          const WgradTileFn tile = kWgradTiles[std::min<int64_t>(kWgR, s.Co - o0)];
          if (k == 1)  // the block's pixels as one run
            tile(gt, 0, xd + r0 * W * s.Ci + 16 * it, 0, s.Ci, 1, nrows * W, d, s.Ci);
          else
            tile(gt, gs, xpack.data() + it * block * xs + (kh * WP + kw) * 16, xs, 16, nrows, W, d, taps * s.Ci);
        }
      }
    }
  });
  return {dw.permute({0, 3, 1, 2}), dy.sum({0, 2, 3})};
}
#endif  // POSEFAST_AVX2

at::Tensor bn_relu_train_no_grad(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 at::Tensor running_mean, at::Tensor running_var, double momentum,
                                 double eps) {
  return std::get<0>(bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps));
}

// ----------------------------------------------------------------------------- the heatmap loss

// mean((o - t)^2 * w[b, k]) over a float (B, K, H, W) output o and target t of the same strides
// (channels-last or contiguous) with per-joint weights w (B, K): the heatmap codecs' loss
// (datasets/codecs.py), one pass forward and one backward where PyTorch's expression takes a
// dozen elementwise passes. The gradient is autograd's of that expression bit for bit: with
// s = g / N (g the incoming gradient, N the element count), do = (s * w) * (2 * (o - t)), the
// same float operations in the same order. The loss itself is the same sum in another order
// (in double, per joint, then across threads): within a few float roundings of PyTorch's.
struct HeatmapLayout {
  int64_t B, K, HW, N;
  bool channels_last;
};

HeatmapLayout check_heatmaps(const at::Tensor& o, const at::Tensor& t, const at::Tensor& w) {
  TORCH_CHECK(o.dim() == 4 && o.scalar_type() == at::kFloat && t.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat,
              "posefast: heatmap_mse takes float32 (B, K, H, W) outputs and targets and (B, K) weights");
  TORCH_CHECK(t.sizes() == o.sizes() && t.strides() == o.strides(),
              "posefast: heatmap_mse: the target must have the output's shape and strides, got ", t.sizes(), " and ",
              o.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(0) == o.size(0) && w.size(1) == o.size(1) && w.is_contiguous(),
              "posefast: heatmap_mse: the weights must be a contiguous (", o.size(0), ", ", o.size(1), ") tensor, got ",
              w.sizes());
  const bool cl = o.is_contiguous(at::MemoryFormat::ChannelsLast) && o.size(1) > 1;
  TORCH_CHECK(cl || o.is_contiguous(), "posefast: heatmap_mse takes channels-last or contiguous tensors");
  return {o.size(0), o.size(1), o.size(2) * o.size(3), o.numel(), cl};
}

// fn(r0, r1) over ranges of runs, in parallel: channels-last, run r is pixel r's K joints (the
// weights w[r / (H*W), 0..K)); contiguous, run r is the H*W pixels of sample and joint r (w[r])
template <typename Fn>
void for_heatmap_runs(const HeatmapLayout& L, Fn fn) {
  if (L.channels_last) {
    at::parallel_for(0, L.B * L.HW, 256, [&](int64_t r0, int64_t r1) { fn(r0, r1); });
  } else {
    at::parallel_for(0, L.B * L.K, 4, [&](int64_t r0, int64_t r1) { fn(r0, r1); });
  }
}

at::Tensor heatmap_mse_forward(const at::Tensor& o, const at::Tensor& t, const at::Tensor& w) {
  const HeatmapLayout L = check_heatmaps(o, t, w);
  const float* op = o.const_data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const int nt = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nt), 0.0);
  for_heatmap_runs(L, [&](int64_t r0, int64_t r1) {
    double total = 0.0;
    if (L.channels_last) {  // rows of K joints, one double sum per joint
      std::vector<double> acc(L.K, 0.0);
      for (int64_t r = r0; r < r1; ++r) {
        const float* wb = wp + (r / L.HW) * L.K;
        const float* a = op + r * L.K;
        const float* b = tp + r * L.K;
        for (int64_t k = 0; k < L.K; ++k) {
          const float d = a[k] - b[k];
          acc[k] += static_cast<double>((d * d) * wb[k]);
        }
      }
      for (double v : acc) total += v;
    } else {  // planes of H*W pixels, one weight each, sums in 16 lanes
      for (int64_t r = r0; r < r1; ++r) {
        const float wk = wp[r];
        const float* a = op + r * L.HW;
        const float* b = tp + r * L.HW;
        double acc[16] = {};
        int64_t i = 0;
        for (; i + 16 <= L.HW; i += 16)
          for (int j = 0; j < 16; ++j) {
            const float d = a[i + j] - b[i + j];
            acc[j] += static_cast<double>((d * d) * wk);
          }
        for (; i < L.HW; ++i) {
          const float d = a[i] - b[i];
          acc[0] += static_cast<double>((d * d) * wk);
        }
        for (double v : acc) total += v;
      }
    }
    partial[at::get_thread_num()] += total;
  });
  double sum = 0.0;
  for (double v : partial) sum += v;
  return at::scalar_tensor(static_cast<float>(L.N ? sum / static_cast<double>(L.N) : NAN), o.options());
}

at::Tensor heatmap_mse_backward(const at::Tensor& grad, const at::Tensor& o, const at::Tensor& t,
                                const at::Tensor& w) {
  const HeatmapLayout L = check_heatmaps(o, t, w);
  // autograd's mean backward: the incoming gradient over N, a float division
  const float s = grad.item<float>() / static_cast<float>(L.N);
  at::Tensor dout = at::empty_like(o);
  const float* op = o.const_data_ptr<float>();
  const float* tp = t.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  float* dp = dout.mutable_data_ptr<float>();
  for_heatmap_runs(L, [&](int64_t r0, int64_t r1) {
    if (L.channels_last) {
      std::vector<float> sw(L.K);
      int64_t sample = -1;
      for (int64_t r = r0; r < r1; ++r) {
        if (r / L.HW != sample) {
          sample = r / L.HW;
          for (int64_t k = 0; k < L.K; ++k) sw[k] = s * wp[sample * L.K + k];
        }
        const float* a = op + r * L.K;
        const float* b = tp + r * L.K;
        float* d = dp + r * L.K;
        for (int64_t k = 0; k < L.K; ++k) d[k] = sw[k] * (2.f * (a[k] - b[k]));
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        const float sw = s * wp[r];
        const float* a = op + r * L.HW;
        const float* b = tp + r * L.HW;
        float* d = dp + r * L.HW;
        for (int64_t i = 0; i < L.HW; ++i) d[i] = sw * (2.f * (a[i] - b[i]));
      }
    }
  });
  return dout;
}

class HeatmapMSE : public torch::autograd::Function<HeatmapMSE> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& o, const at::Tensor& t,
                            const at::Tensor& w) {
    ctx->save_for_backward({o, t, w});
    return heatmap_mse_forward(o, t, w);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    return {heatmap_mse_backward(grads[0], saved[0], saved[1], saved[2]), at::Tensor(), at::Tensor()};
  }
};

at::Tensor heatmap_mse_train(const at::Tensor& o, const at::Tensor& t, const at::Tensor& w) {
  return HeatmapMSE::apply(o, t, w);
}

// dst[i] = src[i] for lists of tensors of equal shapes (the optimiser's gradients into its flat
// buffer, utils/optim.py): one call and one parallel region for all of them, a memcpy for each
// pair with the same strides over a dense block of memory, Tensor::copy_ for any other pair.
void flat_copy(at::TensorList src, at::TensorList dst) {
  TORCH_CHECK(src.size() == dst.size(), "posefast: flat_copy takes two lists of one length, not ", src.size(),
              " and ", dst.size());
  std::vector<char> raw(src.size(), 0);
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor &a = src[i], &b = dst[i];
    TORCH_CHECK(a.sizes() == b.sizes(), "posefast: flat_copy: tensor ", i, " has shape ", a.sizes(),
                ", its destination ", b.sizes());
    raw[i] = a.device().is_cpu() && b.device().is_cpu() && a.scalar_type() == b.scalar_type() &&
             a.strides() == b.strides() && a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense();
  }
  at::parallel_for(0, static_cast<int64_t>(src.size()), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      if (raw[i]) std::memcpy(dst[i].data_ptr(), src[i].data_ptr(), src[i].numel() * src[i].element_size());
  });
  for (size_t i = 0; i < src.size(); ++i)
    if (!raw[i]) at::Tensor(dst[i]).copy_(src[i]);
}

}  // namespace

TORCH_LIBRARY(posefast, m) {
  m.def("bn_relu_train(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float momentum, float eps) -> Tensor");
  m.def("bn_relu_forward(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, "
        "Tensor(b!) running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("bn_relu_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor bias, Tensor mean, "
        "Tensor invstd) -> (Tensor, Tensor, Tensor)");
  m.def("add(Tensor a, Tensor b) -> Tensor");
  m.def("max_pool2(Tensor x) -> Tensor");
  m.def("max_pool2_backward(Tensor grad_out, Tensor x) -> Tensor");
  m.def("add_up2(Tensor upper, Tensor lower) -> Tensor");
  m.def("flat_copy(Tensor[] src, Tensor(a!)[] dst) -> ()");
  m.def("heatmap_mse(Tensor output, Tensor target, Tensor weight) -> Tensor");
#ifdef POSEFAST_AVX2
  m.def("conv_weight_grad(Tensor grad_out, Tensor x, int k) -> (Tensor, Tensor)");
#endif
#ifdef POSEFAST_AVX512BF16
  m.def("conv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("branch(Tensor x, Tensor[] params, Tensor(a!)[] buffers, float momentum, float eps) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(posefast, Autograd, m) {
  m.impl("bn_relu_train", &bn_relu_train);
  m.impl("add", &add_train);
  m.impl("max_pool2", &max_pool2_train);
  m.impl("add_up2", &add_up2_train);
  m.impl("heatmap_mse", &heatmap_mse_train);
#ifdef POSEFAST_AVX512BF16
  m.impl("conv", &conv_train);
  m.impl("branch", &branch_train);
#endif
}

TORCH_LIBRARY_IMPL(posefast, CPU, m) {
  m.impl("bn_relu_train", &bn_relu_train_no_grad);
  m.impl("bn_relu_forward", &bn_relu_forward);
  m.impl("bn_relu_backward", &bn_relu_backward);
  m.impl("add", &add_forward);
  m.impl("max_pool2", &max_pool2_forward);
  m.impl("max_pool2_backward", &max_pool2_backward);
  m.impl("add_up2", &add_up2_forward);
  m.impl("flat_copy", &flat_copy);
  m.impl("heatmap_mse", &heatmap_mse_forward);
#ifdef POSEFAST_AVX2
  m.impl("conv_weight_grad", &conv_weight_grad);
#endif
#ifdef POSEFAST_AVX512BF16
  m.impl("conv", &conv_forward);
  m.impl("branch", &branch_forward);
#endif
}
