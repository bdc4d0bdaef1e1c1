/*
 * fp_copy.c - one extent copied and hashed in one C call (fp_copy_extent, declared in fp_uring.h).
 *
 * The threads backend's workers (flashpack/io/base.py, read_extent) used to make five or six calls per
 * extent that each released and took back the GIL (the copy, the unmap, fstat, the hash, the digest).
 * While the caller's thread runs Python, taking the GIL back waits for its switch interval (5 ms), so a
 * load on a background thread ran 5.5x slower than joined. Here the whole extent is one cffi call: the
 * GIL is released once (fp_copy_extents: once for a batch of extents). XXH3-64 comes from the xxhash library's
 * header (inlined, XXH_INLINE_ALL); its digests are those of the Python xxhash package (XXH3 output is stable since
 * xxHash 0.8.0). Hashing in 256 KiB steps with the AVX2 loop took a cached 1 GiB load from 333 to 257 ms on a
 * 2-vCPU Xeon VM (the hash had been 27% of the load's CPU samples, as much as the kernel's copy).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fp_uring.h"

/* XXH3's output is stable from xxHash 0.8.0 on (its README); 0.7.x (Ubuntu 20.04's libxxhash-dev) computes other
 * digests and lacks XXH3_INITSTATE, so with it this file compiles to the stub and the Python steps hash instead. */
#if defined(__has_include)
#if __has_include(<xxhash.h>) && __has_include(<linux/userfaultfd.h>)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__AVX2__)
/* xxhash.h's hooks for runtime dispatch (the recipe of its xxh_x86dispatch.c): the AVX2 loop is compiled with a
 * target attribute beside the default SSE2 one, and hash_update() picks it where the CPU has AVX2. XXH_X86DISPATCH
 * aligns the accumulators to 64 bytes, which the AVX2 loop's aligned loads need. Same digests either way. A build
 * for AVX2 or later (-march=...) has the widest loop as its default already and skips this. */
#define XXH_X86DISPATCH
#define XXH_DISPATCH_AVX2 1
#define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
#define FP_HASH_AVX2 1
#include <immintrin.h>
#endif
#define XXH_INLINE_ALL
#include <xxhash.h>
#if defined(XXH_VERSION_NUMBER) && XXH_VERSION_NUMBER >= 800
#define FP_HAVE_COPY 1
#endif
#endif
#endif

#ifdef FP_HAVE_COPY
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

#define FP_COPY_MAX_RW_NBYTES 0x7ffff000ull /* read(2), NOTES: the most one read transfers */

/* Bytes copied before they are hashed: small enough that the hash reads them from the copying core's L2 cache
 * (512 KiB to 2 MiB a core on current x86_64 servers) rather than from L3 or DRAM. */
#ifndef FP_COPY_HASH_STEP_NBYTES
#define FP_COPY_HASH_STEP_NBYTES (256u * 1024u)
#endif

#ifdef FP_HASH_AVX2
#if XXH_VERSION_NUMBER >= 802 /* 0.8.2 made the update loop take a whole-stripe accumulate function */
#define FP_XXH3_ACCUMULATE_AVX2 XXH3_accumulate_avx2
#else
#define FP_XXH3_ACCUMULATE_AVX2 XXH3_accumulate_512_avx2
#endif
XXH_TARGET_AVX2 static XXH_errorcode hash_update_avx2(XXH3_state_t *state, const void *input, size_t len)
{
    return XXH3_update(state, (const xxh_u8 *)input, len, FP_XXH3_ACCUMULATE_AVX2, XXH3_scrambleAcc_avx2);
}
#endif

/* XXH3_64bits_update with the widest vector loop this CPU runs (the digest does not depend on it). */
static XXH_errorcode hash_update(XXH3_state_t *state, const void *input, size_t len)
{
#ifdef FP_HASH_AVX2
    if (__builtin_cpu_supports("avx2"))
        return hash_update_avx2(state, input, len);
#endif
    return XXH3_64bits_update(state, input, len);
}

/* pread(2) of [off, off + n) into dst, resuming short reads; returns bytes read, *err set on failure. */
static uint64_t pread_piece(int fd, char *dst, uint64_t off, uint64_t n, int *err)
{
    uint64_t done = 0;
    while (done < n) {
        uint64_t want = n - done;
        if (want > FP_COPY_MAX_RW_NBYTES)
            want = FP_COPY_MAX_RW_NBYTES;
        ssize_t r = pread(fd, dst + done, (size_t)want, (off_t)(off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            break;
        }
        if (r == 0)
            break; /* end of file: the caller sees done < n with no error */
        done += (uint64_t)r;
    }
    return done;
}

/* UFFDIO_COPY of n bytes from src to dst, resuming partial copies (EAGAIN); returns bytes copied. */
static uint64_t fill_piece(int uffd, uint64_t dst, uint64_t src, uint64_t n, int *err)
{
    uint64_t done = 0;
    while (done < n) {
        struct uffdio_copy arg = {.dst = dst + done, .src = src + done, .len = n - done, .mode = 0, .copy = 0};
        int e = 0;
        if (ioctl(uffd, UFFDIO_COPY, &arg) < 0)
            e = errno ? errno : EIO;
        if (arg.copy > 0) {
            done += (uint64_t)arg.copy;
            if (e == 0 || e == EAGAIN)
                continue;
        }
        if (e == 0) /* nothing copied and no error: do not spin */
            e = arg.copy < 0 ? (int)-arg.copy : EIO;
        if (e == EINTR)
            continue;
        *err = e;
        break;
    }
    return done;
}

int fp_copy_extent(struct fp_copy *c)
{
    if (c->piece_nbytes == 0 || (c->mode != FP_COPY_PREAD && c->mode != FP_COPY_FILL))
        return -EINVAL;
    XXH3_state_t state;
    XXH3_INITSTATE(&state);
    XXH3_64bits_reset(&state);
    int err = 0;
    uint64_t done = 0, hashed = 0;
    c->file_nbytes = -1;
    /* A piece (piece_nbytes) is copied in steps, each hashed right after it lands (FP_COPY_HASH_STEP_NBYTES);
     * a fill unmaps its source once a piece (each madvise(MADV_DONTNEED) flushes the TLBs of the other CPUs). */
    int short_copy = 0;
    while (done < c->nbytes && !err && !short_copy) {
        uint64_t piece = c->nbytes - done;
        if (piece > c->piece_nbytes)
            piece = c->piece_nbytes;
        uint64_t start = done;
        while (done < start + piece) {
            uint64_t step = start + piece - done;
            if (done < c->hash_nbytes && step > FP_COPY_HASH_STEP_NBYTES)
                step = FP_COPY_HASH_STEP_NBYTES;
            uint64_t n;
            if (c->mode == FP_COPY_PREAD)
                n = pread_piece(c->fd, (char *)(uintptr_t)(c->dst + done), c->file_offset + done, step, &err);
            else
                n = fill_piece(c->uffd, c->dst + done, c->src + done, step, &err);
            done += n;
            uint64_t hi = done < c->hash_nbytes ? done : c->hash_nbytes;
            if (hi > hashed) {
                hash_update(&state, (const void *)(uintptr_t)(c->dst + hashed), (size_t)(hi - hashed));
                hashed = hi;
            }
            if (n < step) {
                short_copy = 1; /* end of file (PREAD) or an error */
                break;
            }
        }
        if (c->mode == FP_COPY_FILL && c->unmap_src)
            madvise((void *)(uintptr_t)(c->src + start), (size_t)piece, MADV_DONTNEED);
    }
    if (c->mode == FP_COPY_FILL && !err && done) {
        struct stat st;
        if (fstat(c->fd, &st) == 0)
            c->file_nbytes = (int64_t)st.st_size;
    }
    c->done = done;
    c->hashed = hashed;
    c->digest = XXH3_64bits_digest(&state);
    c->error = err;
    return 0;
}

int fp_copy_extents(struct fp_copy *c, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        int rc = fp_copy_extent(&c[i]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

int fp_copy_available(void)
{
    return 1;
}

#else /* no xxhash.h at build time */

int fp_copy_extent(struct fp_copy *c)
{
    (void)c;
    return -ENOSYS;
}

int fp_copy_extents(struct fp_copy *c, unsigned n)
{
    (void)c;
    (void)n;
    return -ENOSYS;
}

int fp_copy_available(void)
{
    return 0;
}

#endif
