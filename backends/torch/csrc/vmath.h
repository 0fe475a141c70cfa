/* Vectorisable math for the CPU kernels (scans.c and the generated loop steps). */
#ifndef RECDSL_VMATH_H
#define RECDSL_VMATH_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* exp for float that the compiler can vectorise (Cephes' range reduction and polynomial,
 * about 1 ulp on [-87, 88]; 0 below, inf above). libm's expf is not vectorised without
 * -ffast-math, which would also break the -inf identities the semiring scans rely on; this
 * one vectorises with -fno-trapping-math -fno-math-errno, which keep IEEE inf and NaN. */
static inline float vexpf_core(float xc) {   /* xc in [-87, 88] */
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float z = r * r;
    float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}
static inline float vexpf(float x) {
    float out = vexpf_core(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
    out = x > 88.0f ? INFINITY : out;
    return x < -87.0f ? 0.0f : out;
}
/* exp saturating at e^-87 and e^88 instead of 0 and inf: for sigmoid and tanh, whose
 * results are the same to float precision (1 / (1 + e^88) is 0 to within 1e-38), and two
 * selects per call cheaper (a tenth of an LSTM step's gate math). */
static inline float vexpf_sat(float x) { return vexpf_core(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x)); }
static inline float vsigmoidf(float x) { return 1.0f / (1.0f + vexpf_sat(-x)); }
/* tanh through exp (absolute error ~1e-7 in float), vectorisable like vexpf. */
static inline float vtanhf(float x) { return 1.0f - 2.0f / (vexpf_sat(2.0f * x) + 1.0f); }

#endif
