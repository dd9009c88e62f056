/* Fused CPU kernels for the gLN blocks and the mask head's backward of fast_tasnet.py
 * (float32, channels-last (B, T, C)).
 *
 * Each kernel does in one pass over a (B, T, C) activation what torch does in several
 * (elementwise op, then separate reductions), which is where the time beyond the GEMMs of a
 * Conv-TasNet training step goes on CPU.  Loaded through ctypes by tcn_native.py.
 *
 * Reductions: each task covers CHUNK frames of one item and sums in float per frame row (or per
 * chunk), the tasks' partial sums are added in double in a fixed order, so the results do not
 * depend on the number of threads (runs are reproducible) and long sums keep their digits.
 * Norm statistics are centred: each row's mean and sum of squared deviations from it (a
 * corrected two-pass sum over the row, in cache), merged in double by Chan's formula; never
 * E[x^2] - mean^2, which cancels when the mean is large against the spread.
 */
#include <stdlib.h>
#include <string.h>

#define CHUNK 128

/* malloc that never returns NULL for a zero size (no frames), so NULL always means failure. */
static void *alloc(size_t bytes) { return malloc(bytes ? bytes : 1); }

static long n_chunks(long frames) { return (frames + CHUNK - 1) / CHUNK; }

static void chunk_of(long task, long chunks, long frames, long *item, long *t0, long *t1)
{
    *item = task / chunks;
    *t0 = (task % chunks) * CHUNK;
    *t1 = *t0 + CHUNK < frames ? *t0 + CHUNK : frames;
}

/* Sum the per-task partials (tasks x width) of each item into out (items x width). */
static void reduce_items(const double *part, long items, long chunks, long width, double *out)
{
    for (long b = 0; b < items; b++) {
        double *dst = out + b * width;
        memset(dst, 0, sizeof(double) * width);
        for (long j = 0; j < chunks; j++) {
            const double *src = part + (b * chunks + j) * width;
            for (long i = 0; i < width; i++) dst[i] += src[i];
        }
    }
}

/* The per-item sums (items x width) of the tasks' partials, or NULL if a task or this allocation
 * failed; frees part. */
static double *finish_items(double *part, int failed, long items, long chunks, long width)
{
    double *out = failed ? NULL : alloc(sizeof(double) * width * items);
    if (out) reduce_items(part, items, chunks, width, out);
    free(part);
    return out;
}

/* Merge a group of nb values with mean mb and centred sum of squares m2b into (*n, *mean, *m2)
 * (Chan, Golub and LeVeque's pairwise update). */
static inline void merge_moments(double *n, double *mean, double *m2, double nb, double mb,
                                 double m2b)
{
    double total = *n + nb;
    if (nb == 0) return;
    double delta = mb - *mean;
    *mean += delta * (nb / total);
    *m2 += m2b + delta * delta * (*n * nb / total);
    *n = total;
}

/* row = leaky_relu(row, a) in place; merges the row's moments into (*n, *mean, *m2). */
static inline void leaky_row_moments(float *row, long C, float a, double *n, double *mean,
                                     double *m2)
{
    if (C == 0) return;
    float rs = 0;
#pragma omp simd reduction(+ : rs)
    for (long c = 0; c < C; c++) {
        float v = row[c] > 0 ? row[c] : row[c] * a;
        row[c] = v;
        rs += v;
    }
    float shift = rs / (float)C, rd = 0, rdd = 0;
#pragma omp simd reduction(+ : rd, rdd)
    for (long c = 0; c < C; c++) {
        float d = row[c] - shift;
        rd += d;
        rdd += d * d;
    }
    /* corrected two-pass: the float mean's error is removed with the deviations' sum */
    double row_m2 = (double)rdd - (double)rd * rd / C;
    merge_moments(n, mean, m2, (double)C, shift + (double)rd / C, row_m2 > 0 ? row_m2 : 0);
}

/* Moments (mean, centred sum of squares) of each item from its tasks' partials (n, mean, m2),
 * merged in task order. */
static void reduce_moments(const double *part, long items, long chunks, double *out)
{
    for (long b = 0; b < items; b++) {
        double n = 0, mean = 0, m2 = 0;
        for (long j = 0; j < chunks; j++) {
            const double *src = part + 3 * (b * chunks + j);
            merge_moments(&n, &mean, &m2, src[0], src[1], src[2]);
        }
        out[2 * b] = mean;
        out[2 * b + 1] = m2;
    }
}

/* x = leaky_relu(x + bias, a) in place (bias: (C,), or NULL); sums[b] = (mean, centred sum of
 * squares) of item b of the result.  (Adding the bias here saves the GEMM a pass.) */
int bias_prelu_stats(float *x, const float *bias, long B, long T, long C, float a, double *sums,
                     int threads)
{
    long chunks = n_chunks(T), tasks = B * chunks;
    double *part = alloc(sizeof(double) * 3 * tasks);
    if (!part) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; task++) {
        long b, t0, t1;
        chunk_of(task, chunks, T, &b, &t0, &t1);
        double n = 0, mean = 0, m2 = 0;
        for (long t = t0; t < t1; t++) {
            float *row = x + (b * T + t) * C;
            if (bias) {
#pragma omp simd
                for (long c = 0; c < C; c++) row[c] += bias[c];
            }
            leaky_row_moments(row, C, a, &n, &mean, &m2);
        }
        part[3 * task] = n;
        part[3 * task + 1] = mean;
        part[3 * task + 2] = m2;
    }
    reduce_moments(part, B, chunks, sums);
    free(part);
    return 0;
}

/* Depthwise dilated convolution of the normalised input, then leaky ReLU, with statistics:
 *   out[b,t,c] = leaky(bias[c] + sum_k [0 <= t+o_k < T] (taps[b,k,c] p[b,t+o_k,c] + shift[b,k,c]))
 * taps = depthwise taps times the norm's per-item scale, shift = taps times its per-item shift
 * (zero padding applies to the normalised input, so a padded tap adds nothing).
 * sums[b] = (mean, centred sum of squares) of item b of out. */
int depthwise_prelu_stats(const float *p, float *out, long B, long T, long C, long P,
                          const long *offsets, const float *taps, const float *shift,
                          const float *bias, float a, double *sums, int threads)
{
    long chunks = n_chunks(T), tasks = B * chunks;
    double *part = alloc(sizeof(double) * 3 * tasks);
    if (!part) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; task++) {
        long b, t0, t1;
        chunk_of(task, chunks, T, &b, &t0, &t1);
        double n = 0, mean = 0, m2 = 0;
        for (long t = t0; t < t1; t++) {
            float *row = out + (b * T + t) * C;
            memcpy(row, bias, sizeof(float) * C);
            for (long k = 0; k < P; k++) {
                long src_t = t + offsets[k];
                if (src_t < 0 || src_t >= T) continue;
                const float *src = p + (b * T + src_t) * C;
                const float *w = taps + (b * P + k) * C, *sh = shift + (b * P + k) * C;
#pragma omp simd
                for (long c = 0; c < C; c++) row[c] += w[c] * src[c] + sh[c];
            }
            leaky_row_moments(row, C, a, &n, &mean, &m2);
        }
        part[3 * task] = n;
        part[3 * task + 1] = mean;
        part[3 * task + 2] = m2;
    }
    reduce_moments(part, B, chunks, sums);
    free(part);
    return 0;
}

/* Backward through the second norm's centring/scaling and the second leaky ReLU, with the
 * reductions the depthwise convolution's backward needs, in place on g:
 *   g' = g + coef_q[b] (q - q_mean[b]) + coef_c[b];  g = g' * (q > 0 ? 1 : a)
 * (q: the leaky ReLU output, centred by its norm's mean: no large terms that cancel)
 * neg[b]              = sum g' min(q, 0)          (the slope's gradient times a)
 * item_sum[b,c]       = sum_t g[b,t,c]
 * tap_sum[b,k,c]      = sum_t [0 <= t+o_k < T] g[b,t,c]
 * tap_dot[b,k,c]      = sum_t [0 <= t+o_k < T] g[b,t,c] (p[b,t+o_k,c] - p_mean[b])
 * (p: the first leaky ReLU's output, the input of the depthwise convolution's norm, centred by
 * that norm's mean). */
int norm_prelu_backward_taps(float *g, const float *q, const float *p, long B, long T, long C,
                             long P, const long *offsets, const float *coef_q,
                             const float *coef_c, const float *q_mean, const float *p_mean,
                             float a, double *neg, double *item_sum,
                             double *tap_sum, double *tap_dot, int threads)
{
    long chunks = n_chunks(T), tasks = B * chunks, width = 1 + (1 + 2 * P) * C;
    double *part = alloc(sizeof(double) * width * tasks);
    if (!part) return 1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; task++) {
        long b, t0, t1;
        chunk_of(task, chunks, T, &b, &t0, &t1);
        /* item_sum | tap_sum | tap_dot of the chunk */
        float *acc = calloc((1 + 2 * P) * C + 1, sizeof(float));
        if (!acc) {
            failed = 1;
            continue;
        }
        double neg_sum = 0;
        float cq = coef_q[b], cc = coef_c[b], qm = q_mean[b], pm = p_mean[b];
        for (long t = t0; t < t1; t++) {
            float *gr = g + (b * T + t) * C;
            const float *qr = q + (b * T + t) * C;
            float rneg = 0;
#pragma omp simd reduction(+ : rneg)
            for (long c = 0; c < C; c++) {
                float gg = gr[c] + cq * (qr[c] - qm) + cc;
                float qv = qr[c];
                rneg += qv < 0 ? gg * qv : 0.0f;
                gg = qv > 0 ? gg : gg * a;
                gr[c] = gg;
                acc[c] += gg;
            }
            neg_sum += rneg;
            for (long k = 0; k < P; k++) {
                long src_t = t + offsets[k];
                if (src_t < 0 || src_t >= T) continue;
                const float *pr = p + (b * T + src_t) * C;
                float *ts = acc + (1 + k) * C, *td = acc + (1 + P + k) * C;
#pragma omp simd
                for (long c = 0; c < C; c++) {
                    ts[c] += gr[c];
                    td[c] += gr[c] * (pr[c] - pm);
                }
            }
        }
        double *dst = part + task * width;
        dst[0] = neg_sum;
        for (long i = 0; i < (1 + 2 * P) * C; i++) dst[1 + i] = acc[i];
        free(acc);
    }
    double *items = finish_items(part, failed, B, chunks, width);
    if (!items) return 1;
    for (long b = 0; b < B; b++) {
        const double *src = items + b * width;
        neg[b] = src[0];
        memcpy(item_sum + b * C, src + 1, sizeof(double) * C);
        memcpy(tap_sum + b * P * C, src + 1 + C, sizeof(double) * P * C);
        memcpy(tap_dot + b * P * C, src + 1 + (1 + P) * C, sizeof(double) * P * C);
    }
    free(items);
    return 0;
}

/* Gradient of the first leaky ReLU's input from that of the depthwise convolution's output g:
 *   h[b,t,c] = coef_c[b] + coef_p[b] (p[b,t,c] - p_mean[b])
 *              + sum_k [0 <= t-o_k < T] taps[b,k,c] g[b,t-o_k,c]
 *   out = h * (p > 0 ? 1 : a)          (p: the leaky ReLU output)
 * neg[b] = sum h min(p, 0);  col_sum[c] = sum over items and frames of out (the bias gradient). */
int norm_depthwise_prelu_backward(const float *p, const float *g, float *out, long B, long T,
                                  long C, long P, const long *offsets, const float *taps,
                                  const float *coef_p, const float *coef_c, const float *p_mean,
                                  float a, double *neg,
                                  double *col_sum, int threads)
{
    long chunks = n_chunks(T), tasks = B * chunks, width = 1 + C;
    double *part = alloc(sizeof(double) * width * tasks);
    if (!part) return 1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; task++) {
        long b, t0, t1;
        chunk_of(task, chunks, T, &b, &t0, &t1);
        float *acc = calloc(C + 1, sizeof(float));
        if (!acc) {
            failed = 1;
            continue;
        }
        double neg_sum = 0;
        float cp = coef_p[b], cc = coef_c[b], pm = p_mean[b];
        for (long t = t0; t < t1; t++) {
            float *row = out + (b * T + t) * C;
            const float *pr = p + (b * T + t) * C;
#pragma omp simd
            for (long c = 0; c < C; c++) row[c] = cc + cp * (pr[c] - pm);
            for (long k = 0; k < P; k++) {
                long src_t = t - offsets[k];
                if (src_t < 0 || src_t >= T) continue;
                const float *gr = g + (b * T + src_t) * C, *w = taps + (b * P + k) * C;
#pragma omp simd
                for (long c = 0; c < C; c++) row[c] += w[c] * gr[c];
            }
            float rneg = 0;
#pragma omp simd reduction(+ : rneg)
            for (long c = 0; c < C; c++) {
                float h = row[c], pv = pr[c];
                rneg += pv < 0 ? h * pv : 0.0f;
                h = pv > 0 ? h : h * a;
                row[c] = h;
                acc[c] += h;
            }
            neg_sum += rneg;
        }
        double *dst = part + task * width;
        dst[0] = neg_sum;
        for (long c = 0; c < C; c++) dst[1 + c] = acc[c];
        free(acc);
    }
    double *items = finish_items(part, failed, B, chunks, width);
    if (!items) return 1;
    memset(col_sum, 0, sizeof(double) * C);
    for (long b = 0; b < B; b++) {
        neg[b] = items[b * width];
        for (long c = 0; c < C; c++) col_sum[c] += items[b * width + 1 + c];
    }
    free(items);
    return 0;
}

/* Mask activations (fast_tasnet.py's _MASK_ACTIVATIONS). */
enum { ACT_LINEAR = 0, ACT_RELU = 1, ACT_SIGMOID = 2, ACT_SOFTMAX = 3 };

/* Backward of the mask head: masks m = act(score) over sources, masked = m * tf, decoder frames
 * f = masked @ w^T, for R rows (batch x frames), S sources, N filters, L taps; gf = df:
 *   dmasked[r,s,n] = sum_l gf[r,s,l] w[l,n]           (the decoder's 1x1 transposed conv)
 *   grad_tf[r,n]   = sum_s dmasked[r,s,n] m[r,s,n]
 *   grad_score     = act'(dmasked * tf)              (in terms of m; softmax over s)
 *   grad_w[l,n]    = sum_{r,s} gf[r,s,l] m[r,s,n] tf[r,n]
 * One pass over the rows: dmasked and masked never go to memory.  w: (L, N); scratch: S * N
 * floats per thread are allocated here. */
int mask_decode_backward(const float *gf, const float *w, const float *mask, const float *tf,
                         long R, long S, long N, long L, int act, float *grad_score,
                         float *grad_tf, double *grad_w, int threads)
{
    long tasks = (R + CHUNK - 1) / CHUNK, width = L * N;
    double *part = alloc(sizeof(double) * width * tasks);
    if (!part) return 1;
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long task = 0; task < tasks; task++) {
        long r0 = task * CHUNK, r1 = r0 + CHUNK < R ? r0 + CHUNK : R;
        float *acc = calloc(width, sizeof(float));
        float *dot = alloc(sizeof(float) * N);
        if (!acc || !dot) {
            failed = 1;
            free(acc);
            free(dot);
            continue;
        }
        for (long r = r0; r < r1; r++) {
            const float *tr = tf + r * N;
            float *gt = grad_tf + r * N;
            for (long n = 0; n < N; n++) gt[n] = 0, dot[n] = 0;
            for (long s = 0; s < S; s++) {
                const float *gr = gf + (r * S + s) * L, *mr = mask + (r * S + s) * N;
                float *h = grad_score + (r * S + s) * N;
                for (long n = 0; n < N; n++) h[n] = 0;
                for (long l = 0; l < L; l++) {
                    const float *wl = w + l * N;
                    float *al = acc + l * N;
                    float gl = gr[l];
#pragma omp simd
                    for (long n = 0; n < N; n++) {
                        h[n] += gl * wl[n];
                        al[n] += gl * (mr[n] * tr[n]);
                    }
                }
#pragma omp simd
                for (long n = 0; n < N; n++) {
                    gt[n] += h[n] * mr[n];
                    h[n] *= tr[n];
                    dot[n] += h[n] * mr[n];
                }
            }
            for (long s = 0; s < S; s++) {
                const float *mr = mask + (r * S + s) * N;
                float *h = grad_score + (r * S + s) * N;
                if (act == ACT_SIGMOID) {
#pragma omp simd
                    for (long n = 0; n < N; n++) h[n] *= mr[n] * (1.0f - mr[n]);
                } else if (act == ACT_RELU) {
#pragma omp simd
                    for (long n = 0; n < N; n++) h[n] = mr[n] > 0 ? h[n] : 0.0f;
                } else if (act == ACT_SOFTMAX) {
#pragma omp simd
                    for (long n = 0; n < N; n++) h[n] = mr[n] * (h[n] - dot[n]);
                }
            }
        }
        double *dst = part + task * width;
        for (long i = 0; i < width; i++) dst[i] = acc[i];
        free(acc);
        free(dot);
    }
    double *total = finish_items(part, failed, 1, tasks, width);
    if (!total) return 1;
    memcpy(grad_w, total, sizeof(double) * width);
    free(total);
    return 0;
}
