// Plain float64 references of the forward and backward of each op (no blocking, no chunk
// trees, no threads), the ground truth the fp32 backward kernels are compared with.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace lockstep::reference {

using Vec = std::vector<double>;

// y [T, N] = x [T, K] . W[N, K]^T.
inline Vec linear(const Vec& x, const Vec& w, int64_t T, int64_t N, int64_t K) {
  Vec y(T * N, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) y[t * N + n] += x[t * K + k] * w[n * K + k];
  return y;
}
inline void linear_backward(const Vec& x, const Vec& w, const Vec& dy, Vec& dx, Vec& dw, int64_t T, int64_t N,
                            int64_t K) {
  dx.assign(T * K, 0.0);
  dw.assign(N * K, 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        dx[t * K + k] += dy[t * N + n] * w[n * K + k];
        dw[n * K + k] += dy[t * N + n] * x[t * K + k];
      }
}

inline Vec rmsnorm(const Vec& x, const Vec& w, int64_t rows, int64_t n, double eps) {
  Vec y(rows * n);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += x[r * n + i] * x[r * n + i];
    double inv = 1.0 / std::sqrt(ss / double(n) + eps);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = w[i] * x[r * n + i] * inv;
  }
  return y;
}
inline void rmsnorm_backward(const Vec& x, const Vec& w, const Vec& dy, Vec& dx, Vec& dw, int64_t rows, int64_t n,
                             double eps) {
  dx.assign(rows * n, 0.0);
  dw.assign(n, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0, s = 0;
    for (int64_t i = 0; i < n; ++i) ss += x[r * n + i] * x[r * n + i];
    double inv = 1.0 / std::sqrt(ss / double(n) + eps);
    for (int64_t i = 0; i < n; ++i) s += w[i] * dy[r * n + i] * x[r * n + i];
    for (int64_t i = 0; i < n; ++i) {
      dx[r * n + i] = inv * w[i] * dy[r * n + i] - x[r * n + i] * inv * inv * inv * s / double(n);
      dw[i] += dy[r * n + i] * x[r * n + i] * inv;
    }
  }
}

// Rotate-half rope with the given per-(position, i) angle tables.
inline Vec rope(const Vec& x, const std::vector<int32_t>& pos, int64_t heads, int64_t d, const Vec& cos,
                const Vec& sin) {
  Vec y(x.size());
  const int64_t half = d / 2;
  for (size_t t = 0; t < pos.size(); ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        size_t b = (t * heads + h) * d;
        double c = cos[pos[t] * half + i], s = sin[pos[t] * half + i];
        y[b + i] = x[b + i] * c - x[b + i + half] * s;
        y[b + i + half] = x[b + i + half] * c + x[b + i] * s;
      }
  return y;
}

inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }
inline Vec swiglu(const Vec& g, const Vec& u) {
  Vec y(g.size());
  for (size_t i = 0; i < g.size(); ++i) y[i] = g[i] * sigmoid(g[i]) * u[i];
  return y;
}
inline void swiglu_backward(const Vec& g, const Vec& u, const Vec& dy, Vec& dg, Vec& du) {
  dg.resize(g.size());
  du.resize(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    double s = sigmoid(g[i]);
    du[i] = dy[i] * g[i] * s;
    dg[i] = dy[i] * u[i] * s * (1 + g[i] * (1 - s));
  }
}

// Causal GQA attention over packed whole sequences (seq_start: first token of each token's
// sequence). q [T, heads, d], k/v [T, kv_heads, d].
struct Attention {
  int64_t T, heads, kv_heads, d;
  double scale;
  std::vector<int64_t> seq_start;
  Vec forward(const Vec& q, const Vec& k, const Vec& v) const {
    Vec out(T * heads * d, 0.0);
    const int64_t group = heads / kv_heads;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        int64_t g = h / group;
        std::vector<double> s;
        for (int64_t j = seq_start[t]; j <= t; ++j) {
          double acc = 0;
          for (int64_t x = 0; x < d; ++x) acc += q[(t * heads + h) * d + x] * k[(j * kv_heads + g) * d + x];
          s.push_back(acc * scale);
        }
        double m = *std::max_element(s.begin(), s.end()), z = 0;
        for (double& e : s) z += (e = std::exp(e - m));
        for (int64_t j = seq_start[t]; j <= t; ++j)
          for (int64_t x = 0; x < d; ++x)
            out[(t * heads + h) * d + x] += s[j - seq_start[t]] / z * v[(j * kv_heads + g) * d + x];
      }
    return out;
  }
  void backward(const Vec& q, const Vec& k, const Vec& v, const Vec& dout, Vec& dq, Vec& dk, Vec& dv) const {
    dq.assign(q.size(), 0.0);
    dk.assign(k.size(), 0.0);
    dv.assign(v.size(), 0.0);
    const int64_t group = heads / kv_heads;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        int64_t g = h / group, n = t - seq_start[t] + 1;
        std::vector<double> p(n), dp(n);
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0;
          for (int64_t x = 0; x < d; ++x)
            acc += q[(t * heads + h) * d + x] * k[((seq_start[t] + j) * kv_heads + g) * d + x];
          p[j] = acc * scale;
        }
        double m = *std::max_element(p.begin(), p.end()), z = 0;
        for (double& e : p) z += (e = std::exp(e - m));
        for (double& e : p) e /= z;
        double pdp = 0;
        for (int64_t j = 0; j < n; ++j) {
          double acc = 0;
          for (int64_t x = 0; x < d; ++x)
            acc += dout[(t * heads + h) * d + x] * v[((seq_start[t] + j) * kv_heads + g) * d + x];
          dp[j] = acc;
          pdp += p[j] * acc;
        }
        for (int64_t j = 0; j < n; ++j) {
          int64_t kj = ((seq_start[t] + j) * kv_heads + g) * d, qi = (t * heads + h) * d;
          double ds = p[j] * (dp[j] - pdp) * scale;
          for (int64_t x = 0; x < d; ++x) {
            dq[qi + x] += ds * k[kj + x];
            dk[kj + x] += ds * q[qi + x];
            dv[kj + x] += p[j] * dout[qi + x];
          }
        }
      }
  }
};

// The MoE block with a fixed routing (expert ids per token, chosen beforehand): weights from
// the softmax of the router logits over the chosen experts (renormalised when normalize).
struct Moe {
  int64_t T, H, I, E, k;
  bool normalize;
  std::vector<int32_t> ids;  // [T, k]
  // Params: router [E, H], gate/up [E][I, H], down [E][H, I].
  Vec forward(const Vec& x, const Vec& router, const std::vector<Vec>& gate, const std::vector<Vec>& up,
              const std::vector<Vec>& down) const {
    Vec z = linear(x, router, T, E, H), out(T * H, 0.0);
    for (int64_t t = 0; t < T; ++t) {
      double m = *std::max_element(z.begin() + t * E, z.begin() + (t + 1) * E), s = 0;
      std::vector<double> p(E);
      for (int64_t e = 0; e < E; ++e) s += (p[e] = std::exp(z[t * E + e] - m));
      for (double& e : p) e /= s;
      double total = 0;
      for (int64_t i = 0; i < k; ++i) total += p[ids[t * k + i]];
      Vec xt(x.begin() + t * H, x.begin() + (t + 1) * H);
      for (int64_t i = 0; i < k; ++i) {
        int32_t e = ids[t * k + i];
        double w = normalize ? p[e] / total : p[e];
        Vec y = linear(swiglu(linear(xt, gate[e], 1, I, H), linear(xt, up[e], 1, I, H)), down[e], 1, H, I);
        for (int64_t h = 0; h < H; ++h) out[t * H + h] += w * y[h];
      }
    }
    return out;
  }
};

// logp[t] = log softmax(z[t])[target[t]], entropy[t] = -sum p log p.
inline void log_softmax_entropy(const Vec& z, const std::vector<int32_t>& target, int64_t T, int64_t V, Vec& logp,
                                Vec& entropy) {
  logp.assign(T, 0.0);
  entropy.assign(T, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    double m = *std::max_element(z.begin() + t * V, z.begin() + (t + 1) * V), s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(z[t * V + v] - m);
    double lse = m + std::log(s);
    logp[t] = z[t * V + target[t]] - lse;
    for (int64_t v = 0; v < V; ++v) {
      double lp = z[t * V + v] - lse;
      entropy[t] -= std::exp(lp) * lp;
    }
  }
}

}  // namespace lockstep::reference
