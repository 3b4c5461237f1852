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
// bn_relu_train (the autograd node, in C++), bn_relu_forward and bn_relu_backward; and add, the
// bfloat16 residual sum (forward one pass, backward the gradient to both inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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
inline vf relu(vf v) { return v > 0.f ? v : vf{}; }
inline vf where_positive(vf o, vf g) { return o > 0.f ? g : vf{}; }

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
  static inline void store(uint16_t* p, vf v) {  // round to nearest even, as c10::BFloat16
    vu u;
    std::memcpy(&u, &v, sizeof u);
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu bits = (u & 0x7fffffffu) > 0x7f800000u ? vu{} + 0x7fc0u : rounded;
    const vh h = __builtin_convertvector(bits, vh);
    std::memcpy(p, &h, sizeof h);
  }
};
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
          for (uint32_t k = 1; k < 4; ++k) {
            const vf v = T::load(xp + at[k] + q * kW);
            const auto wins = (v > best) | (v != v);
            best = wins ? v : best;
            which = wins ? vu{} + k : which;
          }
          if (!gp) {
            T::store(op + o + q * kW, best);
            continue;
          }
          const vf g = T::load(gp + o + q * kW);
          for (uint32_t k = 0; k < 4; ++k) T::store(op + at[k] + q * kW, which == k ? g : vf{});
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

// ----------------------------------------------------------------------------- 1x1 convolutions

#ifdef POSEFAST_AVX512BF16
// A 1x1 convolution of a channels-last tensor is a matrix product of its N*H*W rows of C_in
// values with the (C_out, C_in) weight. oneDNN, through PyTorch, spends 50-250 us per call on
// setting the product up (primitive descriptors, weight reorders, several parallel regions:
// most of the time of the hourglass's small levels) and its weight gradient runs at half the
// forward's rate. These products use the AVX-512 BF16 dot product (vdpbf16ps: a float
// accumulator += the products of two adjacent bfloat16 pairs), each thread holding a tile of
// the output in registers:
//   forward   y[m, o]  = b[o] + sum_i x[m, i] w[o, i]      (pairs along i)
//   backward  dx[m, i] = sum_o dy[m, o] w[o, i]            (pairs along o, the same kernel)
//             dw[o, i] = sum_m dy[m, o] x[m, i]            (pairs along m: two rows interleaved)
//             db[o]    = sum_m dy[m, o]
// in float accumulators, as under autocast (the float32 weight and bias rounded to bfloat16
// for the products, the output rounded to bfloat16); the weight and bias gradients are the
// float sums themselves (autocast rounds them to bfloat16 on the way back).

// The 32-bit pair of two bfloat16 values: lo in the low half.
inline uint32_t pair_of(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }
inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }

// R rows x V vectors of 16 outputs: out[r, 16v + j] = bias + sum_p a[r] pair p . b[p][16v + j].
// a: bfloat16 rows (stride lda), b: pairs [P][ldb] (stride ldb 32-bit words).
template <int R, int V>
inline void product_tile(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t P,
                         const float* bias, uint16_t* out, int64_t ldo) {
  __m512 acc[R][V];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = bias ? _mm512_loadu_ps(bias + kW * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * ldb + kW * v);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      uint32_t two;
      std::memcpy(&two, a + r * lda + 2 * p, sizeof two);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(two));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + kW * v), (__m256i)_mm512_cvtneps_pbh(acc[r][v]));
}

// Rows in tiles of R (24 accumulators), in parallel; V vectors of columns.
template <int V>
void product_rows(const uint16_t* a, int64_t lda, int64_t M, const uint32_t* b, int64_t ldb, int64_t P,
                  const float* bias, uint16_t* out, int64_t ldo) {
  constexpr int R = V == 1 ? 16 : (V == 2 ? 12 : (V == 3 ? 8 : (V == 4 ? 6 : 4)));
  at::parallel_for(0, (M + R - 1) / R, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m = t * R;
      if (m + R <= M) {
        product_tile<R, V>(a + m * lda, lda, b, ldb, P, bias, out + m * ldo, ldo);
      } else {
        for (int64_t r = m; r < M; ++r) product_tile<1, V>(a + r * lda, lda, b, ldb, P, bias, out + r * ldo, ldo);
      }
    }
  });
}

// out[M, cols] = a[M, 2P] . b, b as pairs [P][cols]; cols a multiple of 16, in chunks of up
// to 6 vectors.
void product(const uint16_t* a, int64_t lda, int64_t M, const uint32_t* b, int64_t cols, int64_t P,
             const float* bias, uint16_t* out) {
  for (int64_t c0 = 0; c0 < cols; c0 += 6 * kW) {
    const float* bc = bias ? bias + c0 : nullptr;
    switch (std::min<int64_t>(6, (cols - c0) / kW)) {
      case 1: product_rows<1>(a, lda, M, b + c0, cols, P, bc, out + c0, cols); break;
      case 2: product_rows<2>(a, lda, M, b + c0, cols, P, bc, out + c0, cols); break;
      case 3: product_rows<3>(a, lda, M, b + c0, cols, P, bc, out + c0, cols); break;
      case 4: product_rows<4>(a, lda, M, b + c0, cols, P, bc, out + c0, cols); break;
      case 5: product_rows<5>(a, lda, M, b + c0, cols, P, bc, out + c0, cols); break;
      default: product_rows<6>(a, lda, M, b + c0, cols, P, bc, out + c0, cols); break;
    }
  }
}

// 16 pairs (r0[j], r1[j]) of two bfloat16 rows.
inline __m512i interleave(const uint16_t* r0, const uint16_t* r1) {
  const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0)));
  const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1)));
  return _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
}

constexpr int64_t kRowPairs = 32;  // row pairs per block of the weight gradient

// dw[t, 16v + j] += sum_p dy pair p of output t . x pair p of input 16v + j, T x V tile.
template <int T, int V>
inline void weight_tile(const uint32_t* dy, int64_t ldy, const uint32_t* x, int64_t ldx, int64_t P, float* dw,
                        int64_t ldw) {
  __m512 acc[T][V];
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh xv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(x + p * ldx + kW * v);
#pragma GCC unroll 32
    for (int t = 0; t < T; ++t) {
      const __m512bh g = (__m512bh)_mm512_set1_epi32(static_cast<int>(dy[p * ldy + t]));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], g, xv[v]);
    }
  }
#pragma GCC unroll 32
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v)
      _mm512_storeu_ps(dw + t * ldw + kW * v, _mm512_add_ps(_mm512_loadu_ps(dw + t * ldw + kW * v), acc[t][v]));
}

template <int V>
void weight_block(const uint32_t* dy, int64_t Co, const uint32_t* x, int64_t Ci, int64_t P, float* dw) {
  constexpr int T = V <= 2 ? 8 : (V == 3 ? 6 : 4);
  int64_t o = 0;
  for (; o + T <= Co; o += T) weight_tile<T, V>(dy + o, Co, x, Ci, P, dw + o * Ci, Ci);
  for (; o < Co; ++o) weight_tile<1, V>(dy + o, Co, x, Ci, P, dw + o * Ci, Ci);
}

// dw (Co x Ci) and db (Co), float, from dy (M x Co) and x (M x Ci), bfloat16 rows: each thread
// sums its blocks of 2 * kRowPairs rows into float sums of its own, then the threads' sums add.
void weight_grad(const uint16_t* dy, const uint16_t* x, int64_t M, int64_t Co, int64_t Ci, float* dw, float* db) {
  const int nt = at::get_num_threads();
  const int64_t per = Co * Ci + Co;
  std::vector<float> sums(static_cast<size_t>(nt) * per, 0.f);
  const std::vector<uint16_t> zeros(std::max(Co, Ci), 0);
  const int64_t blocks = (M + 2 * kRowPairs - 1) / (2 * kRowPairs);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    float* mine = sums.data() + static_cast<size_t>(at::get_thread_num()) * per;
    float* mdb = mine + Co * Ci;
    std::vector<uint32_t> gp(kRowPairs * Co), xp(kRowPairs * Ci);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t r0 = blk * 2 * kRowPairs, P = std::min<int64_t>(kRowPairs, (M - r0 + 1) / 2);
      for (int64_t p = 0; p < P; ++p) {  // interleave the block's row pairs; db from the same loads
        const int64_t ra = r0 + 2 * p, rb = ra + 1;
        const uint16_t* ga = dy + ra * Co;
        const uint16_t* gb = rb < M ? dy + rb * Co : zeros.data();
        const uint16_t* xa = x + ra * Ci;
        const uint16_t* xb = rb < M ? x + rb * Ci : zeros.data();
        for (int64_t c = 0; c < Co; c += kW) {
          const __m512i v = interleave(ga + c, gb + c);
          _mm512_storeu_si512(gp.data() + p * Co + c, v);
          const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
          const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
          _mm512_storeu_ps(mdb + c, _mm512_add_ps(_mm512_loadu_ps(mdb + c), _mm512_add_ps(lo, hi)));
        }
        for (int64_t c = 0; c < Ci; c += kW) _mm512_storeu_si512(xp.data() + p * Ci + c, interleave(xa + c, xb + c));
      }
      for (int64_t c0 = 0; c0 < Ci; c0 += 6 * kW) {
        const uint32_t* xc = xp.data() + c0;
        float* d = mine + c0;
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
  });
  for (int64_t k = 0; k < per; ++k) {
    float s = 0.f;
    for (int t = 0; t < nt; ++t) s += sums[static_cast<size_t>(t) * per + k];
    (k < Co * Ci ? dw[k] : db[k - Co * Ci]) = s;
  }
}

void check_conv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "posefast: conv1x1 takes a channels-last bfloat16 4-d input");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1 && weight.size(1) == x.size(1) &&
                  weight.scalar_type() == at::kFloat,
              "posefast: conv1x1 takes a float32 (C_out, C_in, 1, 1) weight matching the input's ", x.size(1),
              " channels");
  TORCH_CHECK(x.size(1) % kW == 0 && weight.size(0) % kW == 0, "posefast: conv1x1 takes multiples of ", kW,
              " channels, got ", x.size(1), " -> ", weight.size(0));
}

at::Tensor conv1x1_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_conv(x, weight);
  const int64_t Ci = x.size(1), Co = weight.size(0), M = x.numel() / Ci;
  const at::Tensor w = weight.contiguous();
  const float* wp = w.const_data_ptr<float>();
  std::vector<uint32_t> packed(Ci / 2 * Co);  // [Ci / 2][Co] pairs of the rounded weight
  for (int64_t p = 0; p < Ci / 2; ++p)
    for (int64_t o = 0; o < Co; ++o)
      packed[p * Co + o] = pair_of(bf16_bits(wp[o * Ci + 2 * p]), bf16_bits(wp[o * Ci + 2 * p + 1]));
  std::vector<float> b;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == Co, "posefast: conv1x1 takes a float32 bias of ",
                Co, " values");
    const at::Tensor bc = bias->contiguous();
    for (int64_t o = 0; o < Co; ++o) b.push_back(static_cast<float>(c10::BFloat16(bc.const_data_ptr<float>()[o])));
  }
  at::Tensor y = at::empty({x.size(0), Co, x.size(2), x.size(3)}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  product(reinterpret_cast<const uint16_t*>(x.const_data_ptr()), Ci, M, packed.data(), Co, Ci / 2,
          b.empty() ? nullptr : b.data(), reinterpret_cast<uint16_t*>(y.mutable_data_ptr()));
  return y;
}

// dx (when wanted), dw, db (when there is a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv1x1_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                const at::Tensor& weight, bool input_grad, bool bias_grad) {
  check_conv(x, weight);
  const at::Tensor dy = grad_out.to(at::kBFloat16).contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t Ci = x.size(1), Co = weight.size(0), M = x.numel() / Ci;
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == Co && dy.size(2) == x.size(2) && dy.size(3) == x.size(3),
              "posefast: conv1x1 gradient and output differ in shape");
  const uint16_t* g = reinterpret_cast<const uint16_t*>(dy.const_data_ptr());
  at::Tensor dx;
  if (input_grad) {
    const at::Tensor w = weight.contiguous();
    const float* wp = w.const_data_ptr<float>();
    std::vector<uint32_t> packed(Co / 2 * Ci);  // [Co / 2][Ci] pairs
    for (int64_t p = 0; p < Co / 2; ++p)
      for (int64_t i = 0; i < Ci; ++i)
        packed[p * Ci + i] = pair_of(bf16_bits(wp[2 * p * Ci + i]), bf16_bits(wp[(2 * p + 1) * Ci + i]));
    dx = at::empty_like(x);
    product(g, Co, M, packed.data(), Ci, Co / 2, nullptr, reinterpret_cast<uint16_t*>(dx.mutable_data_ptr()));
  }
  at::Tensor dw = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor db = at::empty({Co}, weight.options());
  weight_grad(g, reinterpret_cast<const uint16_t*>(x.const_data_ptr()), M, Co, Ci, dw.mutable_data_ptr<float>(),
              db.mutable_data_ptr<float>());
  return {dx, dw, bias_grad ? db : at::Tensor()};
}

class Conv1x1 : public torch::autograd::Function<Conv1x1> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return conv1x1_forward(x, weight, bias);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    auto [dx, dw, db] = conv1x1_backward(grads[0], saved[0], saved[1], ctx->needs_input_grad(0), has_bias);
    return {dx, dw, db};
  }
};

at::Tensor conv1x1_train(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return Conv1x1::apply(x, weight, bias);
}
#endif  // POSEFAST_AVX512BF16

at::Tensor bn_relu_train_no_grad(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 at::Tensor running_mean, at::Tensor running_var, double momentum,
                                 double eps) {
  return std::get<0>(bn_relu_forward(x, weight, bias, running_mean, running_var, momentum, eps));
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
#ifdef POSEFAST_AVX512BF16
  m.def("conv1x1(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
#endif
}

TORCH_LIBRARY_IMPL(posefast, Autograd, m) {
  m.impl("bn_relu_train", &bn_relu_train);
  m.impl("add", &add_train);
  m.impl("max_pool2", &max_pool2_train);
#ifdef POSEFAST_AVX512BF16
  m.impl("conv1x1", &conv1x1_train);
#endif
}

TORCH_LIBRARY_IMPL(posefast, CPU, m) {
  m.impl("bn_relu_train", &bn_relu_train_no_grad);
  m.impl("bn_relu_forward", &bn_relu_forward);
  m.impl("bn_relu_backward", &bn_relu_backward);
  m.impl("add", &add_forward);
  m.impl("max_pool2", &max_pool2_forward);
  m.impl("max_pool2_backward", &max_pool2_backward);
#ifdef POSEFAST_AVX512BF16
  m.impl("conv1x1", &conv1x1_forward);
#endif
}
