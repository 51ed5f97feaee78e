/* One pass over a raw HDF5 chunk: verify its Fletcher-32 checksum and write `value - shift` as float32.
 *
 * The Python reader (raw_chunks.py) reads a chunk's stored bytes with read_direct_chunk and hands them here; this
 * walks the chunk in slabs small enough to stay in L1, summing each slab for the checksum and then converting the
 * rows the slab completed (float16 by the CPU's F16C instructions, int8 codes dequantised with their block's
 * scale and offset), straight into the caller's strided float32 rows. The GIL is released for the whole pass.
 *
 * Fletcher-32 as HDF5 defines it (H5_checksum_fletcher32): big-endian 16-bit words w_0..w_{n-1} (an odd last
 * byte is a word's high byte), sum1 = sum of the words and sum2 = sum of the running sum1, both folded mod 65535
 * with a positive multiple of 65535 reading 0xffff and all-zero data reading 0; the checksum is sum2 << 16 | sum1.
 * So sum1 = S1 mod 65535 and sum2 = S2 mod 65535 with S2 = sum_i (n - i) w_i. A block of m words added to running
 * sums (s1, s2) gives s1 + sum_j w_j and s2 + m * s1 + sum_j (m - j) w_j, which the AVX2 kernel evaluates 16 words
 * at a time with byte sums (a word is 256 * its first byte + its second).
 *
 * int8 values are (float)code * scale + offset - shift, each operation rounded to float32 in that order (built
 * with -ffp-contract=off, and the AVX2 code uses no FMA), as NumPy's `dequantise` then `- shift` compute them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#else
#define HAVE_X86 0
#endif

#define MODULUS 65535u
#define SLAB 16384 /* bytes summed then converted while they are in L1; a multiple of 32 */
#ifndef PREFETCH
#define PREFETCH 8192 /* bytes ahead of the checksum's reads that it prefetches (4096, 8192, 16384 measured: 8192) */
#endif

typedef struct {
    uint64_t s1, s2; /* the running sums, reduced mod 65535 after every slab */
    int nonzero;     /* whether any word so far was nonzero (HDF5's sums stay 0 only for all-zero data) */
} checksum_state;

/* Words one by one: the slab's tail, and the whole slab where AVX2 is missing. */
static void sum_words_scalar(checksum_state *st, const uint8_t *p, size_t n_bytes) {
    uint64_t s1 = st->s1, s2 = st->s2, any = 0;
    size_t i = 0;
    for (; i + 1 < n_bytes; i += 2) {
        uint64_t w = ((uint64_t)p[i] << 8) | p[i + 1];
        any |= w;
        s1 += w;
        s2 += s1;
    }
    if (n_bytes % 2) {
        uint64_t w = (uint64_t)p[i] << 8;
        any |= w;
        s1 += w;
        s2 += s1;
    }
    st->s1 = s1;
    st->s2 = s2;
    st->nonzero |= any != 0;
}

#if HAVE_X86
static inline uint64_t hsum_epi64(__m256i v) __attribute__((target("avx2")));
static inline uint64_t hsum_epi64(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return (uint64_t)_mm_cvtsi128_si64(s) + (uint64_t)_mm_extract_epi64(s, 1);
}

/* `n_bytes` (a multiple of 32, at most SLAB) added to the running sums, 16 words per step. */
__attribute__((target("avx2"))) static void sum_words_avx2(checksum_state *st, const uint8_t *p, size_t n_bytes) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i first_bytes = _mm256_set1_epi16(0x00ff); /* byte 2q of each word: its high (first) byte */
    /* word q of a step weighs 16 - q: in the first byte's slot only, and in both slots */
    const __m256i w_first = _mm256_setr_epi8(16, 0, 15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0,
                                             6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0);
    const __m256i w_both = _mm256_setr_epi8(16, 16, 15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8, 7,
                                            7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i sum_first = zero, sum_both = zero;   /* byte sums so far (64-bit lanes) */
    __m256i prev_first = zero, prev_both = zero; /* sum over steps of the byte sums before that step */
    __m256i wsum_first = zero, wsum_both = zero; /* (16 - q) weighted byte sums within steps (32-bit lanes) */
    size_t steps = n_bytes / 32;
    for (size_t t = 0; t < steps; t++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * t));
        if (t % 2 == 0) /* the hardware prefetcher stops at page ends: ask for the bytes a page ahead */
            _mm_prefetch((const char *)(p + 32 * t + PREFETCH), _MM_HINT_T0);
        prev_first = _mm256_add_epi64(prev_first, sum_first);
        prev_both = _mm256_add_epi64(prev_both, sum_both);
        sum_first = _mm256_add_epi64(sum_first, _mm256_sad_epu8(_mm256_and_si256(v, first_bytes), zero));
        sum_both = _mm256_add_epi64(sum_both, _mm256_sad_epu8(v, zero));
        wsum_first = _mm256_add_epi32(wsum_first, _mm256_madd_epi16(_mm256_maddubs_epi16(v, w_first), ones));
        wsum_both = _mm256_add_epi32(wsum_both, _mm256_madd_epi16(_mm256_maddubs_epi16(v, w_both), ones));
    }
    /* a word is 256 * first + second = 255 * first + (first + second) */
    uint64_t first = hsum_epi64(sum_first), both = hsum_epi64(sum_both);
    uint64_t block_sum = 255 * first + both;
    /* word q of step t weighs m - (16 t + q) = 16 (steps - 1 - t) + (16 - q) */
    uint64_t pf = hsum_epi64(prev_first), pb = hsum_epi64(prev_both);
    __m256i wf = _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(wsum_first)),
                                  _mm256_cvtepu32_epi64(_mm256_extracti128_si256(wsum_first, 1)));
    __m256i wb = _mm256_add_epi64(_mm256_cvtepu32_epi64(_mm256_castsi256_si128(wsum_both)),
                                  _mm256_cvtepu32_epi64(_mm256_extracti128_si256(wsum_both, 1)));
    uint64_t within = 255 * hsum_epi64(wf) + hsum_epi64(wb);
    uint64_t weighted = 16 * (255 * pf + pb) + within;
    st->s2 += (uint64_t)(n_bytes / 2) * st->s1 + weighted;
    st->s1 += block_sum;
    st->nonzero |= block_sum != 0;
}
#endif

static int use_avx2 = 0, use_f16c = 0; /* set once at import */

static void sum_slab(checksum_state *st, const uint8_t *p, size_t n_bytes) {
    size_t vec = 0;
#if HAVE_X86
    if (use_avx2) {
        vec = n_bytes & ~(size_t)31;
        if (vec)
            sum_words_avx2(st, p, vec);
    }
#endif
    if (n_bytes > vec)
        sum_words_scalar(st, p + vec, n_bytes - vec);
    st->s1 %= MODULUS;
    st->s2 %= MODULUS;
}

static uint32_t checksum_of(const checksum_state *st) {
    if (!st->nonzero)
        return 0;
    uint32_t s1 = st->s1 ? (uint32_t)st->s1 : 0xffff, s2 = st->s2 ? (uint32_t)st->s2 : 0xffff;
    return (s2 << 16) | s1;
}

/* float16 bits as float32, exactly (NaNs keep their payload; F16C sets a signalling NaN's quiet bit, which any
 * arithmetic on it does too, so after `- shift` both agree). */
static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (!man) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            e--;
        }
        bits = sign | ((uint32_t)e << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void float16_row_scalar(const uint16_t *src, float *dst, const float *shift, Py_ssize_t n) {
    for (Py_ssize_t q = 0; q < n; q++)
        dst[q] = half_to_float(src[q]) - shift[q];
}

static void int8_row_scalar(const int8_t *src, float *dst, const float *shift, const float *scale,
                            const float *offset, Py_ssize_t n) {
    for (Py_ssize_t q = 0; q < n; q++) {
        float v = (float)src[q] * scale[q];
        v = v + offset[q];
        dst[q] = v - shift[q];
    }
}

#if HAVE_X86
/* The vector rows write whole 64-byte lines of the destination with streaming stores, which skip reading the lines
 * first (the engine's chunk is far larger than the caches, so half of a plain store's memory traffic is that
 * read); the partial lines at a row's ends get plain scalar stores that touch no streamed line (a vector store
 * across into a line being streamed, even a masked one, flushes it half-written: 3x slower, measured). Rows under 32 values use plain stores only,
 * rows under 8 the scalar code (called from plain code: a vector function calling it would leave the vector
 * registers' upper halves dirty for SSE code, which is slow). */
#define STREAMED_ROW(NAME, TARGET, ARGS, VECTOR, TAIL)                                                          \
    __attribute__((target(TARGET))) static void NAME ARGS {                                                     \
        Py_ssize_t q = 0;                                                                                       \
        float part[16];                                                                                         \
        Py_ssize_t head = (Py_ssize_t)((64 - ((uintptr_t)dst & 63)) & 63) / 4;                                  \
        if ((uintptr_t)dst % 4 == 0 && n >= 32) {                                                               \
            if (head) { /* the partial line before the first whole one */                                       \
                _mm256_storeu_ps(part, VECTOR(0));                                                              \
                _mm256_storeu_ps(part + 8, VECTOR(8));                                                          \
                for (Py_ssize_t k = 0; k < head; k++)                                                           \
                    dst[k] = part[k];                                                                           \
            }                                                                                                   \
            for (q = head; q + 16 <= n; q += 16) {                                                              \
                _mm256_stream_ps(dst + q, VECTOR(q));                                                           \
                _mm256_stream_ps(dst + q + 8, VECTOR(q + 8));                                                   \
            }                                                                                                   \
        } else {                                                                                                \
            for (; q + 8 <= n; q += 8)                                                                          \
                _mm256_storeu_ps(dst + q, VECTOR(q));                                                           \
        }                                                                                                       \
        for (; q < n; q += 8) { /* the last values, from copies (no read past the inputs) */                    \
            Py_ssize_t r = n - q < 8 ? n - q : 8;                                                               \
            _mm256_storeu_ps(part, TAIL(q, r));                                                                 \
            for (Py_ssize_t k = 0; k < r; k++)                                                                  \
                dst[q + k] = part[k];                                                                           \
        }                                                                                                       \
    }

#define F16_VECTOR(q)                                                                                           \
    _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + (q)))), _mm256_loadu_ps(shift + (q)))

__attribute__((target("avx2,f16c"))) static inline __m256 float16_tail(const uint16_t *src, const float *shift,
                                                                        Py_ssize_t r) {
    uint16_t h[8] = {0};
    float sh[8] = {0};
    memcpy(h, src, 2 * (size_t)r);
    memcpy(sh, shift, 4 * (size_t)r);
    return _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)), _mm256_loadu_ps(sh));
}
#define F16_TAIL(q, r) float16_tail(src + (q), shift + (q), r)
STREAMED_ROW(float16_row_f16c, "avx2,f16c", (const uint16_t *src, float *dst, const float *shift, Py_ssize_t n),
             F16_VECTOR, F16_TAIL)

__attribute__((target("avx2"))) static inline __m256 int8_vector(const int8_t *src, const float *shift,
                                                                 const float *scale, const float *offset) {
    int64_t eight;
    memcpy(&eight, src, 8);
    __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight)));
    v = _mm256_mul_ps(v, _mm256_loadu_ps(scale));
    v = _mm256_add_ps(v, _mm256_loadu_ps(offset));
    return _mm256_sub_ps(v, _mm256_loadu_ps(shift));
}
#define I8_VECTOR(q) int8_vector(src + (q), shift + (q), scale + (q), offset + (q))

__attribute__((target("avx2"))) static inline __m256 int8_tail(const int8_t *src, const float *shift,
                                                               const float *scale, const float *offset, Py_ssize_t r) {
    int8_t c[8] = {0};
    float sh[8] = {0}, sc[8] = {0}, of[8] = {0};
    memcpy(c, src, (size_t)r);
    memcpy(sh, shift, 4 * (size_t)r);
    memcpy(sc, scale, 4 * (size_t)r);
    memcpy(of, offset, 4 * (size_t)r);
    return int8_vector(c, sh, sc, of);
}
#define I8_TAIL(q, r) int8_tail(src + (q), shift + (q), scale + (q), offset + (q), r)
STREAMED_ROW(int8_row_avx2, "avx2",
             (const int8_t *src, float *dst, const float *shift, const float *scale, const float *offset,
              Py_ssize_t n),
             I8_VECTOR, I8_TAIL)
#endif

typedef struct {
    const uint8_t *raw;    /* the chunk's values, then its 4 checksum bytes */
    size_t chunk_bytes;    /* bytes of values */
    size_t row_bytes;      /* bytes of one row of the chunk */
    Py_ssize_t lo, hi;     /* the chunk's rows to convert */
    Py_ssize_t width;      /* columns converted per row (the chunk's first `width`) */
    char *out;             /* row lo's destination */
    Py_ssize_t out_stride; /* bytes between destination rows */
    const float *shift, *scale, *offset; /* scale NULL: float16 */
} chunk_pass;

static void convert_rows(const chunk_pass *c, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *src = c->raw + (size_t)r * c->row_bytes;
        float *dst = (float *)(c->out + (r - c->lo) * c->out_stride);
        if (!c->scale) {
#if HAVE_X86
            if (use_f16c && c->width >= 8) {
                float16_row_f16c((const uint16_t *)src, dst, c->shift, c->width);
                continue;
            }
#endif
            float16_row_scalar((const uint16_t *)src, dst, c->shift, c->width);
        } else {
#if HAVE_X86
            if (use_avx2 && c->width >= 8) {
                int8_row_avx2((const int8_t *)src, dst, c->shift, c->scale, c->offset, c->width);
                continue;
            }
#endif
            int8_row_scalar((const int8_t *)src, dst, c->shift, c->scale, c->offset, c->width);
        }
    }
}

/* The whole pass; returns whether the stored checksum (either byte order, as HDF5 accepts) matches. */
static int run_pass(const chunk_pass *c) {
    checksum_state st = {0, 0, 0};
    Py_ssize_t done = 0; /* rows whose bytes have all been summed */
    for (size_t pos = 0; pos < c->chunk_bytes; pos += SLAB) {
        size_t end = pos + SLAB < c->chunk_bytes ? pos + SLAB : c->chunk_bytes;
        sum_slab(&st, c->raw + pos, end - pos);
        Py_ssize_t complete = (Py_ssize_t)(end / c->row_bytes);
        Py_ssize_t r0 = done > c->lo ? done : c->lo, r1 = complete < c->hi ? complete : c->hi;
        if (r1 > r0)
            convert_rows(c, r0, r1);
        done = complete;
    }
#if HAVE_X86
    if (use_avx2)
        _mm_sfence(); /* the streamed stores visible before the caller (perhaps another thread) reads the rows */
#endif
    uint32_t sum = checksum_of(&st);
    const uint8_t *t = c->raw + c->chunk_bytes;
    uint32_t little = (uint32_t)t[0] | (uint32_t)t[1] << 8 | (uint32_t)t[2] << 16 | (uint32_t)t[3] << 24;
    uint32_t big = (uint32_t)t[3] | (uint32_t)t[2] << 8 | (uint32_t)t[1] << 16 | (uint32_t)t[0] << 24;
    return sum == little || sum == big;
}

static int float32_vector(Py_buffer *b, Py_ssize_t n, const char *name) {
    if (b->itemsize != 4 || !PyBuffer_IsContiguous(b, 'C') || b->len < 4 * n ||
        (b->format && strcmp(b->format, "f") != 0)) {
        PyErr_Format(PyExc_ValueError, "%s must be a contiguous float32 vector of at least %zd values", name, n);
        return 0;
    }
    return 1;
}

/* Whether rows [lo, lo + n_rows) lie within a chunk of `chunk_bytes` value bytes in rows of `row_bytes`, without
   overflowing on the way; a one-line ValueError when not. */
static int rows_fit(size_t chunk_bytes, size_t row_bytes, Py_ssize_t chunk_cols, Py_ssize_t lo, Py_ssize_t n_rows) {
    size_t rows = chunk_bytes / row_bytes;
    if (chunk_bytes % row_bytes || (size_t)n_rows > rows || (size_t)lo > rows - (size_t)n_rows) {
        PyErr_Format(PyExc_ValueError, "rows %zd..%zd are not within a chunk of %zu bytes of %zd columns", lo,
                     lo + n_rows, chunk_bytes, chunk_cols);
        return 0;
    }
    return 1;
}

/* The destination: float32 rows whose columns are contiguous (rows may be strided). */
static int get_rows_out(PyObject *out_obj, Py_buffer *out) {
    if (PyObject_GetBuffer(out_obj, out, PyBUF_RECORDS) < 0)
        return 0;
    if (out->ndim != 2 || out->itemsize != 4 || (out->format && strcmp(out->format, "f") != 0) ||
        out->strides[1] != 4) {
        PyErr_SetString(PyExc_ValueError, "out must be float32 rows with contiguous columns");
        return 0;
    }
    return 1;
}

/* The per-column vectors of a conversion: `shift`, and for int8 codes `scale` and `offset`. */
typedef struct {
    Py_buffer shift, scale, offset;
} conversion;

static int get_conversion(conversion *v, PyObject *shift_obj, PyObject *scale_obj, PyObject *offset_obj,
                          int quantised, Py_ssize_t width) {
    if (PyObject_GetBuffer(shift_obj, &v->shift, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0 ||
        !float32_vector(&v->shift, width, "shift"))
        return 0;
    if (!quantised)
        return 1;
    if (offset_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "int8 codes need both a scale and an offset");
        return 0;
    }
    return PyObject_GetBuffer(scale_obj, &v->scale, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) >= 0 &&
           float32_vector(&v->scale, width, "scale") &&
           PyObject_GetBuffer(offset_obj, &v->offset, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) >= 0 &&
           float32_vector(&v->offset, width, "offset");
}

static void release_conversion(conversion *v) {
    if (v->shift.obj)
        PyBuffer_Release(&v->shift);
    if (v->scale.obj)
        PyBuffer_Release(&v->scale);
    if (v->offset.obj)
        PyBuffer_Release(&v->offset);
}

PyDoc_STRVAR(check_convert_doc,
             "check_convert(raw, chunk_cols, lo, out, shift, scale=None, offset=None) -> bool\n\n"
             "Verify the Fletcher-32 checksum of one raw chunk (its values, then 4 checksum bytes) and write rows\n"
             "[lo, lo + len(out)) of its first out.shape[1] columns minus `shift` into the float32 rows `out`.\n"
             "Values are float16, or int8 codes dequantised as code * scale + offset when `scale` is given.\n"
             "Returns whether the checksum matched (the rows are written either way).");

static PyObject *check_convert(PyObject *self, PyObject *args) {
    Py_buffer raw = {0}, out = {0};
    conversion conv = {0};
    PyObject *out_obj, *shift_obj, *scale_obj = Py_None, *offset_obj = Py_None, *result = NULL;
    Py_ssize_t chunk_cols, lo;
    if (!PyArg_ParseTuple(args, "y*nnOO|OO", &raw, &chunk_cols, &lo, &out_obj, &shift_obj, &scale_obj,
                          &offset_obj))
        return NULL;
    int quantised = scale_obj != Py_None;
    size_t itemsize = quantised ? 1 : 2;
    if (!get_rows_out(out_obj, &out))
        goto done;
    Py_ssize_t n_rows = out.shape[0], width = out.shape[1];
    if (chunk_cols <= 0 || raw.len < 4 || width > chunk_cols || lo < 0) {
        PyErr_SetString(PyExc_ValueError, "the chunk's width, first row or output width is out of range");
        goto done;
    }
    size_t chunk_bytes = (size_t)raw.len - 4, row_bytes = (size_t)chunk_cols * itemsize;
    if (!rows_fit(chunk_bytes, row_bytes, chunk_cols, lo, n_rows))
        goto done;
    if (!get_conversion(&conv, shift_obj, scale_obj, offset_obj, quantised, width))
        goto done;
    chunk_pass c = {raw.buf, chunk_bytes, row_bytes, lo, lo + n_rows, width, out.buf, out.strides[0],
                    conv.shift.buf, quantised ? conv.scale.buf : NULL, quantised ? conv.offset.buf : NULL};
    int ok;
    Py_BEGIN_ALLOW_THREADS;
    ok = run_pass(&c);
    Py_END_ALLOW_THREADS;
    result = PyBool_FromLong(ok);
done:
    PyBuffer_Release(&raw);
    if (out.obj)
        PyBuffer_Release(&out);
    release_conversion(&conv);
    return result;
}

PyDoc_STRVAR(mapped_check_convert_doc,
             "mapped_check_convert(file, offsets, stride, chunk_cols, lo, out, shift, scale=None, offset=None) -> int\n\n"
             "A row of chunks straight from the file's bytes `file` (a read-only mapping: chunk k's `stride` stored\n"
             "bytes at byte offsets[k], read from the page cache without a copy), each checked and converted as\n"
             "check_convert does into its columns of `out` (chunk k: columns k * chunk_cols on), without the GIL.\n"
             "Returns -1, or the first chunk whose checksum failed.");

static PyObject *mapped_check_convert(PyObject *self, PyObject *args) {
    Py_buffer file = {0}, offsets = {0}, out = {0};
    conversion conv = {0};
    PyObject *offsets_obj, *out_obj, *shift_obj, *scale_obj = Py_None, *offset_obj = Py_None, *result = NULL;
    Py_ssize_t stride, chunk_cols, lo;
    if (!PyArg_ParseTuple(args, "y*OnnnOO|OO", &file, &offsets_obj, &stride, &chunk_cols, &lo, &out_obj,
                          &shift_obj, &scale_obj, &offset_obj))
        return NULL;
    int quantised = scale_obj != Py_None;
    size_t itemsize = quantised ? 1 : 2;
    if (PyObject_GetBuffer(offsets_obj, &offsets, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        goto done;
    if (offsets.itemsize != 8 || (offsets.format && strcmp(offsets.format, "q") != 0 &&
                                  strcmp(offsets.format, "l") != 0)) {
        PyErr_SetString(PyExc_ValueError, "offsets must be a contiguous int64 vector");
        goto done;
    }
    if (!get_rows_out(out_obj, &out))
        goto done;
    Py_ssize_t n_rows = out.shape[0], width = out.shape[1], n_chunks = offsets.len / 8;
    if (chunk_cols <= 0 || stride < 4 || lo < 0 || n_chunks != (width + chunk_cols - 1) / chunk_cols) {
        PyErr_SetString(PyExc_ValueError, "the chunks' width, first row, offsets or output width do not agree");
        goto done;
    }
    size_t chunk_bytes = (size_t)stride - 4, row_bytes = (size_t)chunk_cols * itemsize;
    if (!rows_fit(chunk_bytes, row_bytes, chunk_cols, lo, n_rows))
        goto done;
    const int64_t *at = offsets.buf;
    for (Py_ssize_t k = 0; k < n_chunks; k++) {
        if (at[k] < 0 || at[k] > file.len - stride) {
            PyErr_Format(PyExc_OSError, "chunk %zd of the row lies past the end of the file", k);
            goto done;
        }
    }
    if (!get_conversion(&conv, shift_obj, scale_obj, offset_obj, quantised, width))
        goto done;
    Py_ssize_t bad = -1;
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t k = 0; k < n_chunks; k++) {
        Py_ssize_t c0 = k * chunk_cols, c1 = c0 + chunk_cols < width ? c0 + chunk_cols : width;
        chunk_pass c = {(const uint8_t *)file.buf + at[k],
                        chunk_bytes,
                        row_bytes,
                        lo,
                        lo + n_rows,
                        c1 - c0,
                        (char *)out.buf + 4 * c0,
                        out.strides[0],
                        (const float *)conv.shift.buf + c0,
                        quantised ? (const float *)conv.scale.buf + c0 : NULL,
                        quantised ? (const float *)conv.offset.buf + c0 : NULL};
        if (!run_pass(&c)) {
            bad = k;
            break;
        }
    }
    Py_END_ALLOW_THREADS;
    result = PyLong_FromSsize_t(bad);
done:
    PyBuffer_Release(&file);
    if (offsets.obj)
        PyBuffer_Release(&offsets);
    if (out.obj)
        PyBuffer_Release(&out);
    release_conversion(&conv);
    return result;
}

PyDoc_STRVAR(fletcher32_doc, "fletcher32(data) -> int\n\nHDF5's Fletcher-32 checksum of a bytes-like object.");

static PyObject *fletcher32(PyObject *self, PyObject *args) {
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "y*", &data))
        return NULL;
    checksum_state st = {0, 0, 0};
    const uint8_t *p = data.buf;
    for (Py_ssize_t pos = 0; pos < data.len; pos += SLAB)
        sum_slab(&st, p + pos, (size_t)(data.len - pos < SLAB ? data.len - pos : SLAB));
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(checksum_of(&st));
}

PyDoc_STRVAR(instructions_doc, "instructions() -> str\n\nThe vector instructions this machine lets the pass use.");

static PyObject *instructions(PyObject *self, PyObject *unused) {
    const char *names[] = {"scalar", "avx2", "f16c", "avx2+f16c"};
    return PyUnicode_FromString(names[use_avx2 + 2 * use_f16c]);
}

PyDoc_STRVAR(set_instructions_doc, "set_instructions(avx2, f16c)\n\n"
                                   "Use (or not) AVX2 and F16C where the CPU has them: tests run the scalar code.");

static PyObject *set_instructions(PyObject *self, PyObject *args) {
    int avx2, f16c;
    if (!PyArg_ParseTuple(args, "pp", &avx2, &f16c))
        return NULL;
#if HAVE_X86
    __builtin_cpu_init();
    use_avx2 = avx2 && !!__builtin_cpu_supports("avx2");
    use_f16c = f16c && use_avx2 && __builtin_cpu_supports("f16c");
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"check_convert", check_convert, METH_VARARGS, check_convert_doc},
    {"mapped_check_convert", mapped_check_convert, METH_VARARGS, mapped_check_convert_doc},
    {"fletcher32", fletcher32, METH_VARARGS, fletcher32_doc},
    {"instructions", instructions, METH_NOARGS, instructions_doc},
    {"set_instructions", set_instructions, METH_VARARGS, set_instructions_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused_chunks",
                                    "Raw HDF5 chunks checked and converted in one pass (see raw_chunks.py).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__fused_chunks(void) {
#if HAVE_X86
    __builtin_cpu_init();
    use_avx2 = !!__builtin_cpu_supports("avx2");
    use_f16c = use_avx2 && !!__builtin_cpu_supports("f16c");
#endif
    return PyModule_Create(&module);
}
