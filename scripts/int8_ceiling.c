/* The instruction-level ceiling of int8 against f32 matmul on an AVX2 CPU without VNNI
 * (this machine: AMD EPYC, Zen 3), behind the int8 speed goals of `formers bench compress`.
 *
 *   gcc -O2 -mavx2 -mfma scripts/int8_ceiling.c -o /tmp/int8_ceiling && /tmp/int8_ceiling
 *
 * Register-only loops, no memory traffic, one thread: the best any kernel can do.
 * - int8: formers' inner step (kernels/int8.rs): x and W widened to i16, `vpmaddwd`
 *   (16 products into 8 i32 sums) then `vpaddd` into an accumulator; a 2×4 tile (two rows
 *   of x, four of W) is 8 of each per 16 columns: 128 multiply-adds.
 * - int8 with 8-bit x: the sign trick of llama.cpp's AVX2 dot (`vpsignb` moves x's sign onto
 *   W, `vpmaddubsw` multiplies |x| by it, 32 products into 16 exact i16 pair sums, since
 *   2·127² < 2¹⁵, `vpmaddwd` by ones widens them to i32, `vpaddd` accumulates); the same
 *   2×4 tile is 256 multiply-adds per 32 columns: twice the products per `vpmaddubsw`, but
 *   two multiplier instructions per pair sum instead of one, and a `vpsignb` besides.
 * - f32: eight independent `vfmadd` chains (latency 4 × 2 pipes), 8 multiply-adds each.
 * It prints multiply-adds per nanosecond of each and their ratio: the most int8 weights
 * can gain over f32 in compute-bound (batched) matmuls here. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
    const long n = 100000000;
    __m256i acc[8];
    for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
    __m256i x0 = _mm256_set1_epi16(3), x1 = _mm256_set1_epi16(4);
    __m256i w0 = _mm256_set1_epi16(5), w1 = _mm256_set1_epi16(6);
    __m256i w2 = _mm256_set1_epi16(7), w3 = _mm256_set1_epi16(8);
    double t = now();
    for (long s = 0; s < n; s++) {
        /* Opaque operands: nothing is hoisted out of the loop. */
        __asm__ volatile("" : "+x"(x0), "+x"(x1), "+x"(w0), "+x"(w1), "+x"(w2), "+x"(w3));
        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x0, w0));
        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x0, w1));
        acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(x0, w2));
        acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(x0, w3));
        acc[4] = _mm256_add_epi32(acc[4], _mm256_madd_epi16(x1, w0));
        acc[5] = _mm256_add_epi32(acc[5], _mm256_madd_epi16(x1, w1));
        acc[6] = _mm256_add_epi32(acc[6], _mm256_madd_epi16(x1, w2));
        acc[7] = _mm256_add_epi32(acc[7], _mm256_madd_epi16(x1, w3));
    }
    double e = now() - t;
    __asm__ volatile("" ::"x"(acc[0]), "x"(acc[1]), "x"(acc[2]), "x"(acc[3]), "x"(acc[4]),
                     "x"(acc[5]), "x"(acc[6]), "x"(acc[7]));
    double int8 = 128.0 * n / e / 1e9;

    __m256i ones = _mm256_set1_epi16(1);
    __m256i b0 = _mm256_set1_epi8(3), b1 = _mm256_set1_epi8(-4);
    __m256i v0 = _mm256_set1_epi8(5), v1 = _mm256_set1_epi8(6);
    __m256i v2 = _mm256_set1_epi8(-7), v3 = _mm256_set1_epi8(8);
    for (int i = 0; i < 8; i++) acc[i] = _mm256_set1_epi32(i);
    t = now();
    for (long s = 0; s < n; s++) {
        __asm__ volatile("" : "+x"(b0), "+x"(b1), "+x"(v0), "+x"(v1), "+x"(v2), "+x"(v3));
        __m256i a0 = _mm256_sign_epi8(b0, b0), a1 = _mm256_sign_epi8(b1, b1);
#define STEP(k, a, b, v) \
        acc[k] = _mm256_add_epi32(acc[k], \
            _mm256_madd_epi16(_mm256_maddubs_epi16(a, _mm256_sign_epi8(v, b)), ones))
        STEP(0, a0, b0, v0); STEP(1, a0, b0, v1); STEP(2, a0, b0, v2); STEP(3, a0, b0, v3);
        STEP(4, a1, b1, v0); STEP(5, a1, b1, v1); STEP(6, a1, b1, v2); STEP(7, a1, b1, v3);
#undef STEP
    }
    e = now() - t;
    __asm__ volatile("" ::"x"(acc[0]), "x"(acc[1]), "x"(acc[2]), "x"(acc[3]), "x"(acc[4]),
                     "x"(acc[5]), "x"(acc[6]), "x"(acc[7]));
    double ubs = 256.0 * n / e / 1e9;

    __m256 f0 = _mm256_set1_ps(0), f1 = _mm256_set1_ps(1), f2 = _mm256_set1_ps(2);
    __m256 f3 = _mm256_set1_ps(3), f4 = _mm256_set1_ps(4), f5 = _mm256_set1_ps(5);
    __m256 f6 = _mm256_set1_ps(6), f7 = _mm256_set1_ps(7);
    __m256 a = _mm256_set1_ps(1.0001f), b = _mm256_set1_ps(0.9999f);
    t = now();
    for (long s = 0; s < n; s++) {
        __asm__ volatile("" : "+x"(a), "+x"(b));
        f0 = _mm256_fmadd_ps(f0, a, b);
        f1 = _mm256_fmadd_ps(f1, a, b);
        f2 = _mm256_fmadd_ps(f2, a, b);
        f3 = _mm256_fmadd_ps(f3, a, b);
        f4 = _mm256_fmadd_ps(f4, a, b);
        f5 = _mm256_fmadd_ps(f5, a, b);
        f6 = _mm256_fmadd_ps(f6, a, b);
        f7 = _mm256_fmadd_ps(f7, a, b);
    }
    e = now() - t;
    __asm__ volatile("" ::"x"(f0), "x"(f1), "x"(f2), "x"(f3), "x"(f4), "x"(f5), "x"(f6), "x"(f7));
    double f32 = 64.0 * n / e / 1e9;
    printf("int8 (vpmaddwd + vpaddd, 2x4 tile): %.1f multiply-adds/ns\n", int8);
    printf("int8 (vpsignb + vpmaddubsw + vpmaddwd + vpaddd): %.1f multiply-adds/ns\n", ubs);
    printf("f32 (vfmadd, 8 chains):             %.1f multiply-adds/ns\n", f32);
    printf("ceiling of int8 over f32:           %.2fx (vpmaddwd), %.2fx (vpmaddubsw)\n",
           int8 / f32, ubs / f32);
    return 0;
}
