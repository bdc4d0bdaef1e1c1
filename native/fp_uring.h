/*
 * fp_uring.h - the C surface of flashpack's io_uring shim (fp_uring.c), declared once.
 *
 * native/build_uring.py builds the cffi cdef from this file: it drops the preprocessor lines
 * (include guard, #include) and keeps each "#define FP_NAME value" as an integer constant whose
 * value the C compiler supplies, so Python sees exactly these structs, flags and functions. Keep
 * every declaration here in the subset of C that cffi's cdef parser reads: no macros in
 * declarations, one "#define FP_NAME value" per line for constants.
 *
 * Every function returns >= 0 on success or -errno, like liburing itself.
 * Not thread-safe: one thread drives a ring at a time.
 *
 * Declarations between "#ifdef FP_TESTING" and its "#endif" exist only in the test build
 * (compiled with -DFP_TESTING by the tests into a temporary directory, never shipped).
 */

#ifndef FP_URING_H
#define FP_URING_H

#include <stdint.h>

/* Request flags (struct fp_read.flags). */
#define FP_DIRECT 1              /* read the page-aligned body on the O_DIRECT descriptor */
#define FP_FIXED 2               /* buf_index names a registered buffer holding [addr, addr + nbytes) */

/* Completion flags (struct fp_done.flags). */
#define FP_DONE_DIRECT_REFUSED 1 /* a direct read failed with EINVAL/EBADF/EOPNOTSUPP; finished buffered */
#define FP_DONE_SHORT 2          /* a buffered read returned 0 before nbytes: the file is shorter */
#define FP_DONE_NOT_SUBMITTED 4  /* error != 0 came from io_uring_submit: the kernel never saw the read */

/* Ring setup flags accepted by fp_ring_open (dropped one at a time when the kernel refuses them). */
#define FP_SETUP_COOP_TASKRUN 1

/* The most request slots (reads in flight) one ring may have; flashpack.settings.MAX_QUEUE_DEPTH
 * must equal it (native/build_uring.py checks at build time, the tests at run time). */
#define FP_MAX_QUEUE_DEPTH 4096

/* One read request: nbytes bytes at file_offset into addr. */
struct fp_read {
    uint64_t tag;         /* the caller's id, returned unchanged in fp_done */
    uint64_t file_offset; /* first byte of the file to read */
    uint64_t nbytes;      /* bytes to read */
    uint64_t addr;        /* destination address; the caller keeps it valid until its fp_done */
    uint32_t flags;       /* FP_DIRECT | FP_FIXED */
    uint32_t buf_index;   /* registered buffer index when FP_FIXED */
};

/* One finished request, as returned by fp_ring_reap. */
struct fp_done {
    uint64_t tag;             /* fp_read.tag */
    uint64_t nbytes_direct;   /* bytes read with O_DIRECT */
    uint64_t nbytes_buffered; /* bytes read through the page cache */
    uint64_t fail_offset;     /* error != 0: file offset of the failed read */
    uint64_t fail_nbytes;     /* error != 0: length of the failed read */
    int32_t error;            /* 0, or the positive errno of the read (or submit) that failed */
    uint32_t flags;           /* FP_DONE_* */
    int32_t direct_error;     /* FP_DONE_DIRECT_REFUSED: the positive errno of the refused direct read */
};

/* Counters of one ring since fp_ring_open. */
struct fp_ring_stats {
    uint64_t sqes;        /* SQEs prepared */
    uint64_t resubmits;   /* of which resubmissions (short read, EAGAIN, split, switch to buffered) */
    uint64_t enter_waits; /* times the reaper blocked in the kernel */
};

/* Opaque: one ring, its request slots and its two duplicated descriptors. */
struct fp_ring;

/*
 * NAME
 *     fp_ring_open - create a ring with `depth` request slots
 * SYNOPSIS
 *     int fp_ring_open(unsigned depth, unsigned setup_flags, struct fp_ring **out);
 * DESCRIPTION
 *     Sets up an io_uring instance (io_uring_queue_init_params(3)) with `depth` SQ entries and a
 *     table of `depth` slots, and stores it in *out. setup_flags is a mask of FP_SETUP_*; a flag the
 *     kernel refuses with EINVAL is dropped and setup retried without it, as fio does. The ring has
 *     no files until fp_ring_set_files(). Free it with fp_ring_close().
 * RETURN VALUE
 *     The setup flags actually in use (>= 0), or -errno; *out is set only on success.
 * ERRORS
 *     EINVAL  depth is 0 or more than FP_MAX_QUEUE_DEPTH.
 *     EPERM   io_uring_setup(2) refused: seccomp (Docker's default profile), or
 *             kernel.io_uring_disabled=1 and the caller is neither privileged nor in io_uring_group.
 *     ENOSYS  the kernel has no io_uring.
 *     ENOMEM  no memory for the ring (kernels before 5.12 charge it to RLIMIT_MEMLOCK).
 */
int fp_ring_open(unsigned depth, unsigned setup_flags, struct fp_ring **out);

/*
 * NAME
 *     fp_ring_set_files - give the ring the file it reads
 * SYNOPSIS
 *     int fp_ring_set_files(struct fp_ring *r, int fd_direct, int fd_buffered, int register_files);
 * DESCRIPTION
 *     Duplicates fd_direct (an O_DIRECT descriptor, or -1 for none) and fd_buffered; the ring owns the
 *     duplicates, so the caller may close its own descriptors at any time (a descriptor number reused
 *     by a later open(2) can never be read by mistake). With register_files, the duplicates are also
 *     registered (io_uring_register_files(3)) and SQEs name them by index; if registration fails the
 *     ring goes on with plain descriptors. Call once, with no request in flight.
 * RETURN VALUE
 *     1 if the files are registered, 0 if not, or -errno.
 * ERRORS
 *     EBADF   fd_buffered is not an open descriptor.
 *     EBUSY   the ring already has files.
 *     EMFILE  no descriptor left for the duplicates.
 */
int fp_ring_set_files(struct fp_ring *r, int fd_direct, int fd_buffered, int register_files);

/*
 * NAME
 *     fp_ring_buffers_init, fp_ring_buffer_set - registered buffers (READ_FIXED)
 * SYNOPSIS
 *     int fp_ring_buffers_init(struct fp_ring *r, unsigned nr);
 *     int fp_ring_buffer_set(struct fp_ring *r, unsigned index, uint64_t addr, uint64_t nbytes);
 * DESCRIPTION
 *     fp_ring_buffers_init makes a table of nr empty buffer slots (io_uring_register_buffers_sparse(3));
 *     fp_ring_buffer_set registers [addr, addr + nbytes) in slot index
 *     (io_uring_register_buffers_update_tag(3)), pinning its pages until fp_ring_close. A request
 *     with FP_FIXED and buf_index = index must lie inside that range. The caller keeps the memory
 *     alive while it is registered. Set a slot only while no request uses it.
 * RETURN VALUE
 *     0, or -errno.
 * ERRORS
 *     ENOMEM  pinning would exceed RLIMIT_MEMLOCK (the caller lacks CAP_IPC_LOCK), or no memory.
 *     EFAULT  the range is not ordinary anonymous or shmem memory, or longer than 1 GiB.
 *     EINVAL  index out of range, or nbytes is 0.
 *     EBUSY   the table already exists.
 */
int fp_ring_buffers_init(struct fp_ring *r, unsigned nr);
int fp_ring_buffer_set(struct fp_ring *r, unsigned index, uint64_t addr, uint64_t nbytes);

/*
 * NAME
 *     fp_ring_submit - start reading extents
 * SYNOPSIS
 *     int fp_ring_submit(struct fp_ring *r, unsigned n, const struct fp_read *reqs);
 * DESCRIPTION
 *     Takes reqs[0..k) into free slots, k = min(n, free slots), prepares one SQE for each and submits
 *     them without waiting. FP_DIRECT is honoured only when the ring has an O_DIRECT descriptor and
 *     nbytes >= 4096 (the caller checks the alignment of file_offset and addr); the body, nbytes
 *     rounded down to 4096, is read direct and the rest buffered.
 *
 *     Every request taken ends in exactly one fp_done from fp_ring_reap(), even when submission
 *     fails: if io_uring_submit(3) fails with anything but EAGAIN, EBUSY or EINTR (which leave the
 *     SQEs queued for the next call), each SQE the kernel has not consumed is turned into a no-op
 *     (so the kernel can never write into its buffer afterwards) and its request finishes with
 *     fp_done.error set to that errno and FP_DONE_NOT_SUBMITTED; its slot is free again once the
 *     no-op has completed. A negative return therefore never leaves a prepared SQE behind.
 * RETURN VALUE
 *     k, the number of requests taken (0 when every slot is busy), or -errno when none was taken.
 * ERRORS
 *     EBADF   the ring has no files (fp_ring_set_files).
 *     EBUSY   no SQE could be had for the first request.
 */
int fp_ring_submit(struct fp_ring *r, unsigned n, const struct fp_read *reqs);

/*
 * NAME
 *     fp_ring_reap - wait for extents to finish
 * SYNOPSIS
 *     int fp_ring_reap(struct fp_ring *r, unsigned min_done, int timeout_ms,
 *                      struct fp_done *out, unsigned max_out);
 * DESCRIPTION
 *     Handles completions, resubmitting short reads, EAGAIN/EINTR, the next piece of a split read
 *     and the buffered remainder of a direct read at the exact offset reached, until at least
 *     min_done extents have finished, a slot has been freed, or nothing is in flight; then returns
 *     the finished ones in out[0..k), k <= max_out, without waiting for more. Requests that failed
 *     to submit (see fp_ring_submit) are returned first. A read error ends its extent with
 *     fp_done.error set; it is not an error of this call. A direct read refused with EINVAL, EBADF
 *     or EOPNOTSUPP is retried buffered and flagged FP_DONE_DIRECT_REFUSED. timeout_ms < 0 waits
 *     without limit. Blocks with the GIL released (cffi); keep timeout_ms short so the caller can
 *     notice signals between calls.
 * RETURN VALUE
 *     k >= 0 (possibly fewer than min_done after a timeout or a signal), or -errno.
 * ERRORS
 *     Errors of io_uring_submit_and_wait_timeout(3) other than ETIME, EINTR, EAGAIN and EBUSY,
 *     returned only when no extent finished in this call (the ring is then most likely unusable).
 */
int fp_ring_reap(struct fp_ring *r, unsigned min_done, int timeout_ms, struct fp_done *out, unsigned max_out);

/*
 * NAME
 *     fp_ring_in_flight, fp_ring_get_stats - what the ring is doing
 * SYNOPSIS
 *     int fp_ring_in_flight(const struct fp_ring *r);
 *     int fp_ring_get_stats(const struct fp_ring *r, struct fp_ring_stats *out);
 * RETURN VALUE
 *     fp_ring_in_flight: the number of busy slots (requests taken and not yet returned by
 *     fp_ring_reap, plus slots waiting for the no-op of a failed submission); fp_ring_get_stats: 0.
 */
int fp_ring_in_flight(const struct fp_ring *r);
int fp_ring_get_stats(const struct fp_ring *r, struct fp_ring_stats *out);

/*
 * NAME
 *     fp_ring_close - drain and free a ring
 * SYNOPSIS
 *     int fp_ring_close(struct fp_ring *r);
 * DESCRIPTION
 *     Waits until every SQE in flight has completed (the kernel may otherwise still write into the
 *     callers' buffers after the ring is gone: ring teardown is asynchronous), discarding the results,
 *     then unregisters buffers and files, exits the ring (io_uring_queue_exit(3)), closes the duplicated
 *     descriptors and frees r. If the ring is broken (waiting fails), it stops waiting and frees it
 *     anyway, so it always returns. Safe to call with r == NULL. Extents taken and not reaped are lost.
 * RETURN VALUE
 *     0.
 */
int fp_ring_close(struct fp_ring *r);

/*
 * NAME
 *     fp_liburing_version - the liburing version this shim was compiled against
 * SYNOPSIS
 *     int fp_liburing_version(int *major, int *minor);
 * DESCRIPTION
 *     Stores IO_URING_VERSION_MAJOR/MINOR (liburing >= 2.4, <liburing/io_uring_version.h>).
 * RETURN VALUE
 *     0, or -ENOTSUP when the headers carry no version (liburing <= 2.3); ask the package manager.
 */
int fp_liburing_version(int *major, int *minor);

/* Modes of struct fp_copy. */
#define FP_COPY_PREAD 0          /* pread(2) from fd */
#define FP_COPY_FILL 1           /* ioctl(UFFDIO_COPY) from the mapping at src into a userfaultfd region */

/* One extent copied, and hashed as it lands, by fp_copy_extent (all in one call: the GIL is released once). */
struct fp_copy {
    uint64_t dst;          /* in: destination address (FILL: page-aligned, inside uffd's registered range) */
    uint64_t src;          /* in, FILL: address of file byte file_offset in a read-only shared mapping */
    uint64_t file_offset;  /* in: first byte of the file */
    uint64_t nbytes;       /* in: bytes to copy (FILL: a multiple of 4096; the last page may lie past EOF) */
    uint64_t piece_nbytes; /* in: pieces of the copy (FILL: unmapped piece by piece); hashed in 256 KiB steps */
    uint64_t hash_nbytes;  /* in: hash dst[0, hash_nbytes) with XXH3-64 (seed 0); 0: no hash */
    int32_t fd;            /* in: the file (PREAD: read from it; FILL: fstat(2) after the copy) */
    int32_t uffd;          /* in, FILL: the userfaultfd the range is registered with */
    uint32_t mode;         /* in: FP_COPY_PREAD or FP_COPY_FILL */
    uint32_t unmap_src;    /* in, FILL: madvise(MADV_DONTNEED) each source piece once copied */
    uint64_t done;         /* out: bytes landed from the start of the range */
    uint64_t hashed;       /* out: bytes hashed (== hash_nbytes when digest is valid) */
    uint64_t digest;       /* out: XXH3-64 of dst[0, hashed) */
    int64_t file_nbytes;   /* out, FILL: st_size after the copy (fstat(2)); -1 when not asked or failed */
    int32_t error;         /* out: 0, or the positive errno of the call that stopped the copy */
    uint32_t pad;
};

/*
 * NAME
 *     fp_copy_extent - copy one extent and hash it as it lands, in one call
 * SYNOPSIS
 *     int fp_copy_extent(struct fp_copy *c);
 * DESCRIPTION
 *     Bytes to hash are copied in steps of at most 256 KiB (FP_COPY_HASH_STEP_NBYTES), each hashed right after
 *     it lands, from the copying core's L2 cache; with xxhash's AVX2 loop where the CPU has it.
 *     FP_COPY_PREAD: pread(2) c->nbytes bytes at c->file_offset of c->fd into c->dst, piece by piece;
 *     EINTR is retried and a short read resumed at the exact offset; a read returning 0 stops the copy
 *     (the file is shorter: c->done < c->nbytes, c->error 0).
 *     FP_COPY_FILL: ioctl(c->uffd, UFFDIO_COPY) piece by piece from c->src (ioctl_userfaultfd(2),
 *     UFFDIO_COPY: a partial copy returns EAGAIN with uffdio_copy.copy > 0 and is resumed); after each
 *     piece, with c->unmap_src, madvise(MADV_DONTNEED) on the source piece (the page cache keeps it,
 *     the process's RSS does not); after the last, fstat(c->fd) into c->file_nbytes.
 *     After each step, the bytes landed below c->hash_nbytes are hashed while still in the L2 cache.
 *     The caller owns the policy: error messages, releasing the region, checking the file size.
 * RETURN VALUE
 *     0 (results in *c), -EINVAL for a bad mode or zero piece size, or -ENOSYS when the shim was
 *     compiled without xxhash.h (fp_copy_available() is 0).
 */
int fp_copy_extent(struct fp_copy *c);

/*
 * NAME
 *     fp_copy_extents - fp_copy_extent for each of n requests, in order, in one call
 * SYNOPSIS
 *     int fp_copy_extents(struct fp_copy *c, unsigned n);
 * DESCRIPTION
 *     One call for a worker's batch of extents: the GIL is released once for all of them. A request that
 *     fails (its error, a short read) does not stop the ones after it; each reports in its own struct.
 * RETURN VALUE
 *     0, or the first negative return of fp_copy_extent (nothing after that request was copied).
 */
int fp_copy_extents(struct fp_copy *c, unsigned n);

/* 1 when fp_copy_extent was compiled in (xxhash.h was found at build time), else 0. */
int fp_copy_available(void);

#ifdef FP_TESTING
/* Fault injection (test build only): applied to each CQE's result before it is handled, and to
 * each io_uring submit call. The reads are real; only their reported results change. */
struct fp_fault {
    int64_t max_res;           /* > 0: a successful read reports at most this many bytes */
    int64_t direct_max_nbytes; /* >= 0: direct reads of one extent stop (return 0) after this many bytes */
    int32_t direct_errno;      /* != 0: every direct read fails with -direct_errno */
    int32_t err_errno;         /* != 0: a read whose range holds byte err_offset fails with -err_errno */
    int64_t err_offset;
    int64_t eof_offset;        /* >= 0: reads see the file end at this byte (0 at or past it) */
    int32_t submit_errno;      /* != 0: submit calls number [submit_fail_from, + submit_fail_count) */
    int32_t submit_fail_from;  /*       (counted from 0 per ring) fail with -submit_errno before */
    int32_t submit_fail_count; /*       entering the kernel, as a hard io_uring_submit error would */
    int32_t pad;
};

/*
 * NAME
 *     fp_ring_set_fault - inject faults (test build only)
 * SYNOPSIS
 *     int fp_ring_set_fault(struct fp_ring *r, const struct fp_fault *fault);
 * DESCRIPTION
 *     From now on, rewrite results as `fault` says (see struct fp_fault). NULL clears.
 * RETURN VALUE
 *     0.
 */
int fp_ring_set_fault(struct fp_ring *r, const struct fp_fault *fault);
#endif /* FP_TESTING */

#endif /* FP_URING_H */
