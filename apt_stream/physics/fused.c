/* Fused element-wise loops of the Approximant engine (CPU).
 *
 * Each function does in one pass over memory what takes torch two to five separate passes (and
 * temporaries): the engine's per-frame arrays are too large to stay in cache between torch ops,
 * so at few probe modes those passes, not the FFTs, were what kept it from its FFT floor
 * (docs/approximant.md). apt_stream/physics/fused.py compiles this file on first use and falls
 * back to the torch expressions, which tests/test_fused.py checks these against.
 *
 * Complex numbers are interleaved (re, im) float32 pairs: torch's complex64 layout. Every array is
 * C-contiguous. Window origins are (row, column) pairs of int64 into an (ny, nx) plane. Threads:
 * OpenMP, as many as the caller passes (torch's intra-op thread count).
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

/* Offset (in floats) of row i of mode m of frame b in a (B, M, h, w) complex array. */
static inline i64 wave_row(i64 b, i64 m, i64 i, i64 nm, i64 h, i64 w) {
    return 2 * (((b * nm + m) * h + i) * w);
}

/* Row i of frame b's window in an (ny, nx) complex plane. */
static inline const float *window_row(const float *plane, const i64 *origins, i64 b, i64 i,
                                      i64 nx) {
    return plane + 2 * ((origins[2 * b] + i) * nx + origins[2 * b + 1]);
}

/* exit[b, m] = psi[b, m] * slice[window b] for a (B, M, h, w) batch of waves. */
void apt_forward_exit(const float *psi, const float *slice, const i64 *origins, i64 nb, i64 nm,
                      i64 h, i64 w, i64 nx, float *out, int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (i64 b = 0; b < nb; b++) {
        for (i64 i = 0; i < h; i++) {
            const float *o = window_row(slice, origins, b, i, nx);
            for (i64 m = 0; m < nm; m++) {
                const i64 row = wave_row(b, m, i, nm, h, w);
                const float *p = psi + row;
                float *e = out + row;
                for (i64 j = 0; j < w; j++) {
                    const float pr = p[2 * j], pi = p[2 * j + 1], orr = o[2 * j], oi = o[2 * j + 1];
                    e[2 * j] = pr * orr - pi * oi;
                    e[2 * j + 1] = pr * oi + pi * orr;
                }
            }
        }
    }
}

/* The amplitude residual in place: with A = sqrt(sum_m |far_m|^2) and d = A - sqrt_i,
 * far_m <- conj(far_m * d / (A + eps)); returns sum d^2 (accumulated in double). */
double apt_residual_conj(float *far, const float *sqrt_i, i64 nb, i64 nm, i64 h, i64 w, float eps,
                         int threads) {
    double loss = 0.0;
#pragma omp parallel for collapse(2) schedule(static) reduction(+ : loss) num_threads(threads)
    for (i64 b = 0; b < nb; b++) {
        for (i64 i = 0; i < h; i++) {
            float scale[w];
            for (i64 j = 0; j < w; j++) scale[j] = 0.0f;
            for (i64 m = 0; m < nm; m++) {
                const float *f = far + wave_row(b, m, i, nm, h, w);
                for (i64 j = 0; j < w; j++) scale[j] += f[2 * j] * f[2 * j] + f[2 * j + 1] * f[2 * j + 1];
            }
            const float *s = sqrt_i + (b * h + i) * w;
            double row_loss = 0.0;
            for (i64 j = 0; j < w; j++) {
                const float amp = sqrtf(scale[j]);
                const float d = amp - s[j];
                row_loss += (double)d * (double)d;
                scale[j] = d / (amp + eps);
            }
            loss += row_loss;
            for (i64 m = 0; m < nm; m++) {
                float *f = far + wave_row(b, m, i, nm, h, w);
                for (i64 j = 0; j < w; j++) {
                    f[2 * j] *= scale[j];
                    f[2 * j + 1] *= -scale[j];
                }
            }
        }
    }
    return loss;
}

/* One slab of the adjoint on the conjugate adjoint wave eta:
 * grad[b] = conj(sum_m wave[b, m] * eta[b, m]); then, if slice is given,
 * eta[b, m] <- eta[b, m] * slice[window b] (the step to the previous slab). */
void apt_adjoint_slab(const float *wave, float *eta, const float *slice, const i64 *origins, i64 nb,
                      i64 nm, i64 h, i64 w, i64 nx, float *grad, int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (i64 b = 0; b < nb; b++) {
        for (i64 i = 0; i < h; i++) {
            float acc[2 * w];
            for (i64 j = 0; j < 2 * w; j++) acc[j] = 0.0f;
            const float *o = slice ? window_row(slice, origins, b, i, nx) : 0;
            for (i64 m = 0; m < nm; m++) {
                const i64 row = wave_row(b, m, i, nm, h, w);
                const float *p = wave + row;
                float *e = eta + row;
                for (i64 j = 0; j < w; j++) {
                    const float pr = p[2 * j], pi = p[2 * j + 1], er = e[2 * j], ei = e[2 * j + 1];
                    acc[2 * j] += pr * er - pi * ei;
                    acc[2 * j + 1] += pr * ei + pi * er;
                    if (o) {
                        const float orr = o[2 * j], oi = o[2 * j + 1];
                        e[2 * j] = er * orr - ei * oi;
                        e[2 * j + 1] = er * oi + ei * orr;
                    }
                }
            }
            float *g = grad + 2 * ((b * h + i) * w);
            for (i64 j = 0; j < w; j++) {
                g[2 * j] = acc[2 * j];
                g[2 * j + 1] = -acc[2 * j + 1];
            }
        }
    }
}

/* Rows [lo, hi) of a stack of planes owned by thread t of n: the scatters below split the planes'
 * rows between threads, so overlapping windows never race and no atomics are needed. */
static void row_share(i64 rows, i64 *lo, i64 *hi, int t, int n) {
    *lo = rows * t / n;
    *hi = rows * (t + 1) / n;
}

/* plane[l, window b] += patches[l, b] for (L, B, h, w) complex patches into (L, ny, nx). */
void apt_scatter_add(float *plane, const float *patches, const i64 *origins, i64 nl, i64 nb, i64 h,
                     i64 w, i64 ny, i64 nx, int threads) {
#pragma omp parallel num_threads(threads)
    {
        i64 lo, hi;
#ifdef _OPENMP
        row_share(nl * ny, &lo, &hi, omp_get_thread_num(), omp_get_num_threads());
#else
        row_share(nl * ny, &lo, &hi, 0, 1);
#endif
        for (i64 l = 0; l < nl; l++) {
            for (i64 b = 0; b < nb; b++) {
                for (i64 i = 0; i < h; i++) {
                    const i64 r = l * ny + origins[2 * b] + i;
                    if (r < lo || r >= hi) continue;
                    float *t = plane + 2 * (r * nx + origins[2 * b + 1]);
                    const float *p = patches + 2 * (((l * nb + b) * h + i) * w);
                    for (i64 j = 0; j < 2 * w; j++) t[j] += p[j];
                }
            }
        }
    }
}

/* illum[window b] += sum_m |probes[b, m]|^2 for (B, M, h, w) complex probes into a real (ny, nx). */
void apt_scatter_illumination(float *illum, const float *probes, const i64 *origins, i64 nb, i64 nm,
                              i64 h, i64 w, i64 ny, i64 nx, int threads) {
#pragma omp parallel num_threads(threads)
    {
        i64 lo, hi;
#ifdef _OPENMP
        row_share(ny, &lo, &hi, omp_get_thread_num(), omp_get_num_threads());
#else
        row_share(ny, &lo, &hi, 0, 1);
#endif
        for (i64 b = 0; b < nb; b++) {
            for (i64 i = 0; i < h; i++) {
                const i64 r = origins[2 * b] + i;
                if (r < lo || r >= hi) continue;
                float *t = illum + r * nx + origins[2 * b + 1];
                for (i64 m = 0; m < nm; m++) {
                    const float *p = probes + wave_row(b, m, i, nm, h, w);
                    for (i64 j = 0; j < w; j++) t[j] += p[2 * j] * p[2 * j] + p[2 * j + 1] * p[2 * j + 1];
                }
            }
        }
    }
}

/* out[b] = conj(sum_m a[b, m] * c[b, m]) for (B, M, h, w) complex a and c (pass 1's mode sum). */
void apt_mode_sum_conj(const float *a, const float *c, i64 nb, i64 nm, i64 h, i64 w, float *out,
                       int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (i64 b = 0; b < nb; b++) {
        for (i64 i = 0; i < h; i++) {
            float acc[2 * w];
            for (i64 j = 0; j < 2 * w; j++) acc[j] = 0.0f;
            for (i64 m = 0; m < nm; m++) {
                const i64 row = wave_row(b, m, i, nm, h, w);
                const float *x = a + row, *y = c + row;
                for (i64 j = 0; j < w; j++) {
                    const float xr = x[2 * j], xi = x[2 * j + 1], yr = y[2 * j], yi = y[2 * j + 1];
                    acc[2 * j] += xr * yr - xi * yi;
                    acc[2 * j + 1] += xr * yi + xi * yr;
                }
            }
            float *g = out + 2 * ((b * h + i) * w);
            for (i64 j = 0; j < w; j++) {
                g[2 * j] = acc[2 * j];
                g[2 * j + 1] = -acc[2 * j + 1];
            }
        }
    }
}

/* Pass 1's FFT inputs from the factored shift ramps R[b] = rows[b][:, None] * cols[b][None, :]:
 * out[b, m] = table[m] * R[b] when scale is NULL, else table[m] * conj(R[b]) * scale[b]
 * (scale real, (B, h, w)). rows (B, h) and cols (B, w) complex; table (M, h, w). */
void apt_ramp_product(const float *table, const float *rows, const float *cols,
                      const float *scale, i64 nb, i64 nm, i64 h, i64 w, float *out, int threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (i64 b = 0; b < nb; b++) {
        for (i64 i = 0; i < h; i++) {
            float ramp[2 * w];
            const float yr = rows[2 * (b * h + i)], yi = rows[2 * (b * h + i) + 1];
            const float *c = cols + 2 * b * w;
            const float *s = scale ? scale + (b * h + i) * w : 0;
            for (i64 j = 0; j < w; j++) {
                const float rr = yr * c[2 * j] - yi * c[2 * j + 1];
                const float ri = yr * c[2 * j + 1] + yi * c[2 * j];
                if (s) {
                    ramp[2 * j] = rr * s[j];
                    ramp[2 * j + 1] = -ri * s[j];
                } else {
                    ramp[2 * j] = rr;
                    ramp[2 * j + 1] = ri;
                }
            }
            for (i64 m = 0; m < nm; m++) {
                const float *t = table + 2 * ((m * h + i) * w);
                float *o = out + wave_row(b, m, i, nm, h, w);
                for (i64 j = 0; j < w; j++) {
                    const float tr = t[2 * j], ti = t[2 * j + 1];
                    o[2 * j] = tr * ramp[2 * j] - ti * ramp[2 * j + 1];
                    o[2 * j + 1] = tr * ramp[2 * j + 1] + ti * ramp[2 * j];
                }
            }
        }
    }
}
