/* The eager CPU selective scan of vmamba_kernels.reference, forward only, fp32: one pass over the states.

   R independent rows of Dg channels share B_t and C_t (N each) within a row. Given u and delta (L, R, Dg), the
   optional delta_bias (R, Dg), A (R, N, Dg), and B, C by strides (step, row, state; a step stride of 0 shares
   one step), it writes y_t = <C_t, h_t> (L, R, Dg) and the last state (R, N, Dg) of
       dt_t = softplus(delta_t + bias)   (or delta_t + bias),
       h_t  = exp(dt_t A) h_{t-1} + (dt_t u_t) B_t,    h_{-1} = 0,
   the decays as exp2(dt_t A log2(e)).
   Every state stays in registers from the first step to the last: the PyTorch form streams each state through
   memory several times. Lanes of TILE floats hold TILE channels of one row where rows have at least TILE / 2
   channels, else one channel of TILE rows. Work items are spread over OpenMP threads.

   Built and loaded by vmamba_kernels/cpu_scan.py: plain C with GCC/Clang vector extensions, no Python or torch
   headers, so that it compiles in about a second whatever the torch version. */
#include <stdint.h>
#include <string.h>

#define TILE 16
#define LOG2_E 1.4426950408889634f
/* TILE floats as one value: the compiler maps it onto the machine's vector registers (one AVX-512 register,
   two AVX2 ones, four NEON ones), and each operation on it is one vector operation per register. */
typedef float vfloat __attribute__((vector_size(4 * TILE)));
typedef int32_t vint __attribute__((vector_size(4 * TILE)));

static inline vfloat splat(float x) {
    return (vfloat){0} + x;
}

/* Lanes where mask is set take a, the others b. */
static inline vfloat select(vint mask, vfloat a, vfloat b) {
    return (vfloat)(((vint)a & mask) | ((vint)b & ~mask));
}

/* 2^(x + n) for x in [-1/2, 1/2] and an integral n in [-126, 127]: a degree-5 polynomial within 2 ulp, times
   2^n built from its exponent bits. NaN stays NaN. */
static inline vfloat exp2_reduced(vfloat x, vfloat n) {
    vfloat p = splat(1.326472731307149e-3f);
    p = p * x + 9.671512991189957e-3f;
    p = p * x + 5.550733581185341e-2f;
    p = p * x + 2.4022242426872253e-1f;
    p = p * x + 6.931470036506653e-1f;
    p = p * x + 1.0f;
    return p * (vfloat)((__builtin_convertvector(n, vint) + 127) << 23);
}

static inline vfloat round_to_integer(vfloat x) {  /* for |x| < 2^22, to nearest */
    const float round_magic = 12582912.0f; /* 1.5 * 2^23 */
    return (x + round_magic) - round_magic;
}

/* 2^x for x <= 0 (the decays whenever dt >= 0 and A <= 0); below -126 it is 2^-126 instead of 0 (or a
   subnormal), which no state can tell from 0. NaN stays NaN. */
static inline vfloat exp2_nonpositive(vfloat x) {
    const vfloat lo = splat(-126.0f);
    x = select(x < lo, lo, x);
    const vfloat n = round_to_integer(x);
    return exp2_reduced(x - n, n);
}

/* 2^x for any x: below -126 it is 0, from 128 infinity (between 127.5 and 128 within 5e-5). NaN stays NaN. */
static inline vfloat exp2_approx(vfloat x) {
    const vfloat lo = splat(-126.0f), hi = splat(127.0f);
    const vint below = x < lo, above = x >= 128.0f;
    const vfloat n = round_to_integer(select(below, lo, select(x > hi, hi, x)));
    return select(above, splat(__builtin_inff()), select(below, splat(0.0f), exp2_reduced(x - n, n)));
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)) to within a few ulp, log1p(e) as 2 atanh(e / (2 + e)) by its
   series (e / (2 + e) <= 1/3). Above 20 it is x, as in torch's threshold. NaN stays NaN. */
static inline vfloat softplus(vfloat x) {
    const vint positive = x > 0.0f;
    const vfloat e = exp2_approx(select(positive, -x, x) * LOG2_E);  /* exp(-|x|) */
    const vfloat s = e / (e + 2.0f), s2 = s * s;
    vfloat series = splat(1.0f / 13.0f);
    series = series * s2 + 1.0f / 11.0f;
    series = series * s2 + 1.0f / 9.0f;
    series = series * s2 + 1.0f / 7.0f;
    series = series * s2 + 1.0f / 5.0f;
    series = series * s2 + 1.0f / 3.0f;
    series = series * s2 + 1.0f;
    return select(x > 20.0f, x, select(positive, x, splat(0.0f)) + 2.0f * s * series);
}

/* TILE floats from p with the given stride (lanes at or after width read 0). */
static inline vfloat load(const float *p, int64_t stride, int64_t width) {
    vfloat v = {0};
    if (stride == 1 && width == TILE) {
        memcpy(&v, p, sizeof v);
    } else {
        for (int64_t w = 0; w < width; ++w)
            v[w] = p[w * stride];
    }
    return v;
}

static inline void store(float *p, int64_t stride, int64_t width, vfloat v) {
    if (stride == 1 && width == TILE) {
        memcpy(p, &v, sizeof v);
    } else {
        for (int64_t w = 0; w < width; ++w)
            p[w * stride] = v[w];
    }
}

/* The scan's arguments, shared by every work item. */
typedef struct {
    int64_t L, R, N, Dg;
    const float *u, *delta, *bias, *A;
    const float *B, *C;
    int64_t sBt, sBr, sBn, sCt, sCr, sCn;
    int softplus;
    float *y, *last;
} scan_args;

/* The work item of TILE lanes starting at row r0, channel d0: lanes step through channels (lane_channels) or
   through rows; ``width`` lanes are real. */
static inline __attribute__((always_inline)) void scan_lanes_as(const scan_args *s, int64_t r0, int64_t d0,
                                                                 int64_t width, int lane_channels, int nonpositive) {
    const int64_t N = s->N, Dg = s->Dg, R = s->R;
    const int64_t lane_stride = lane_channels ? 1 : Dg;   /* between lanes in (row, channel) arrays */
    const int64_t lane_state_stride = lane_channels ? 1 : N * Dg;  /* between lanes in (row, state, channel) */
    const int64_t lane_row = lane_channels ? 0 : 1;  /* rows per lane */
    vfloat h[N], a[N], b[N], c[N];
    const vfloat bias = s->bias ? load(s->bias + r0 * Dg + d0, lane_stride, width) : splat(0.0f);
    for (int64_t n = 0; n < N; ++n) {
        h[n] = splat(0.0f);
        a[n] = load(s->A + (r0 * N + n) * Dg + d0, lane_state_stride, width) * LOG2_E;
    }
    for (int64_t t = 0; t < s->L; ++t) {
        const int64_t at = (t * R + r0) * Dg + d0;
        vfloat dt = load(s->delta + at, lane_stride, width) + bias;
        if (s->softplus)
            dt = softplus(dt);
        const vfloat du = dt * load(s->u + at, lane_stride, width);
        if (t == 0 || s->sBt != 0 || s->sCt != 0) {  /* B and C of this step, per lane */
            const float *Bt = s->B + t * s->sBt + r0 * s->sBr, *Ct = s->C + t * s->sCt + r0 * s->sCr;
            for (int64_t n = 0; n < N; ++n) {
                b[n] = lane_channels ? splat(Bt[n * s->sBn]) : load(Bt + n * s->sBn, s->sBr * lane_row, width);
                c[n] = lane_channels ? splat(Ct[n * s->sCn]) : load(Ct + n * s->sCn, s->sCr * lane_row, width);
            }
        }
        vfloat acc = splat(0.0f);
        for (int64_t n = 0; n < N; ++n) {
            const vfloat decay = nonpositive ? exp2_nonpositive(dt * a[n]) : exp2_approx(dt * a[n]);
            h[n] = decay * h[n] + du * b[n];
            acc += h[n] * c[n];
        }
        store(s->y + at, lane_stride, width, acc);
    }
    for (int64_t n = 0; n < N; ++n)
        store(s->last + (r0 * N + n) * Dg + d0, lane_state_stride, width, h[n]);
}

/* scan_lanes_as, with the cheaper exp2 where every exponent dt A is at most 0: dt >= 0 (a softplus) and A <= 0. */
static void scan_lanes(const scan_args *s, int64_t r0, int64_t d0, int64_t width, int lane_channels) {
    int nonpositive = s->softplus;
    for (int64_t n = 0; n < s->N && nonpositive; ++n)
        for (int64_t w = 0; w < width; ++w)
            nonpositive &= !(s->A[(r0 * s->N + n) * s->Dg + d0 + w * (lane_channels ? 1 : s->N * s->Dg)] > 0.0f);
    if (nonpositive)
        scan_lanes_as(s, r0, d0, width, lane_channels, 1);
    else
        scan_lanes_as(s, r0, d0, width, lane_channels, 0);
}

/* The entry point (see the top of the file). bias may be NULL; threads: how many OpenMP threads share the
   work items. */
void vmamba_selective_scan_fwd_f32(int64_t L, int64_t R, int64_t N, int64_t Dg, const float *u, const float *delta,
                                   const float *bias, int softplus, const float *A, const float *B, const float *C,
                                   int64_t sBt, int64_t sBr, int64_t sBn, int64_t sCt, int64_t sCr, int64_t sCn,
                                   float *y, float *last, int threads) {
    const scan_args s = {L, R, N, Dg, u, delta, bias, A, B, C, sBt, sBr, sBn, sCt, sCr, sCn, softplus, y, last};
    if (Dg >= TILE / 2) {
        const int64_t tiles = (Dg + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < R * tiles; ++i) {
            const int64_t d0 = (i % tiles) * TILE;
            scan_lanes(&s, i / tiles, d0, Dg - d0 < TILE ? Dg - d0 : TILE, 1);
        }
    } else {
        const int64_t blocks = (R + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t i = 0; i < blocks * Dg; ++i) {
            const int64_t r0 = (i / Dg) * TILE;
            scan_lanes(&s, r0, i % Dg, R - r0 < TILE ? R - r0 : TILE, 0);
        }
    }
}
