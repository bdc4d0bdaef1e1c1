/*
 * fp_uring.c - the thin C shim over liburing behind flashpack's "uring" reader.
 *
 * The interface (structs, flags, constants, prototypes and their man-page comments) is declared once
 * in fp_uring.h. Python (flashpack/io/uring.py) never touches liburing structures: it calls these
 * functions through cffi (API mode, out of line; cffi releases the GIL around every call).
 *
 * Model: one ring per open file. A ring has `depth` request slots; each slot holds one extent (a read
 * of `nbytes` bytes at `file_offset` into `addr`) and keeps exactly one SQE in flight for it until the
 * extent is complete. Short reads, -EAGAIN and -EINTR are resubmitted here at the exact offset reached,
 * reads longer than the kernel's 0x7ffff000-byte cap are split, and the page-aligned body of a
 * FP_DIRECT extent goes to the O_DIRECT descriptor while any unaligned remainder (a tail, or whatever
 * follows a short or refused direct read) goes to the buffered descriptor: an unaligned remainder is
 * never resubmitted with O_DIRECT. Python gets one fp_done record per finished extent.
 *
 * A hard submission error (io_uring_submit failing with anything but EAGAIN/EBUSY/EINTR) turns every
 * SQE the kernel has not consumed into a no-op with the same user_data and fails its extent at once
 * (fp_done.error = that errno): no extent is lost, and no buffer is written after its extent was
 * reported failed. The slot stays busy until the no-op's CQE arrives, so a slot index is never reused
 * while the kernel may still hold an SQE for it.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* F_DUPFD_CLOEXEC with older glibc */
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "fp_uring.h"

#define FP_PAGE_NBYTES 4096u
#define FP_MAX_RW_NBYTES 0x7ffff000ull /* read(2), NOTES: the most one read transfers */

struct fp_slot {
    struct fp_read req;
    uint64_t done;       /* bytes of req finished */
    uint64_t ndirect;    /* of which O_DIRECT */
    uint64_t cur_offset; /* the SQE in flight: file offset and length */
    uint64_t cur_nbytes;
    uint32_t direct;     /* the body is still being read with O_DIRECT */
    uint32_t cur_direct;
    uint32_t dflags;     /* FP_DONE_* so far */
    int32_t direct_error;
    uint32_t in_use;
    int32_t failed;      /* != 0: submission failed with this errno; its SQE is a no-op */
};

struct fp_ring {
    struct io_uring ring;
    unsigned depth;
    unsigned in_use;     /* busy slots: an unfinished extent, or a failed one waiting for its no-op */
    unsigned sqes;       /* SQEs prepared and not yet completed */
    int fds[2];          /* owned duplicates: [0] O_DIRECT (or -1), [1] buffered */
    int fixed_files;     /* fds registered: SQEs use indices 0/1 with IOSQE_FIXED_FILE */
    struct fp_ring_stats stats;
    unsigned *free_slots;
    unsigned nfree;
    unsigned *failed;    /* slots failed at submission, fp_done not yet returned */
    unsigned nfailed;
    struct fp_slot *slots;
#ifdef FP_TESTING
    int has_fault;
    struct fp_fault fault;
    int32_t submit_calls;
#endif
};

int fp_ring_open(unsigned depth, unsigned setup_flags, struct fp_ring **out)
{
    struct fp_ring *r;
    struct io_uring_params p;
    unsigned flags = setup_flags;
    int ret;

    if (depth == 0 || depth > FP_MAX_QUEUE_DEPTH)
        return -EINVAL;
    r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->slots = calloc(depth, sizeof(*r->slots));
    r->free_slots = calloc(depth, sizeof(*r->free_slots));
    r->failed = calloc(depth, sizeof(*r->failed));
    if (!r->slots || !r->free_slots || !r->failed) {
        ret = -ENOMEM;
        goto fail;
    }
    for (;;) {
        memset(&p, 0, sizeof(p));
        if (flags & FP_SETUP_COOP_TASKRUN)
            p.flags |= IORING_SETUP_COOP_TASKRUN;
        ret = io_uring_queue_init_params(depth, &r->ring, &p);
        if (ret == -EINVAL && flags) {
            flags &= flags - 1; /* drop the lowest flag, retry */
            continue;
        }
        break;
    }
    if (ret < 0)
        goto fail;
    r->depth = depth;
    r->fds[0] = r->fds[1] = -1;
    for (unsigned i = 0; i < depth; i++)
        r->free_slots[i] = depth - 1 - i;
    r->nfree = depth;
    *out = r;
    return (int)flags;
fail:
    free(r->slots);
    free(r->free_slots);
    free(r->failed);
    free(r);
    return ret;
}

int fp_ring_set_files(struct fp_ring *r, int fd_direct, int fd_buffered, int register_files)
{
    if (r->fds[1] >= 0)
        return -EBUSY;
    r->fds[1] = fcntl(fd_buffered, F_DUPFD_CLOEXEC, 0);
    if (r->fds[1] < 0)
        return -errno;
    if (fd_direct >= 0) {
        r->fds[0] = fcntl(fd_direct, F_DUPFD_CLOEXEC, 0);
        if (r->fds[0] < 0) {
            int err = errno;
            close(r->fds[1]);
            r->fds[1] = -1;
            return -err;
        }
    }
    if (register_files) {
        int fds[2] = {r->fds[0] >= 0 ? r->fds[0] : r->fds[1], r->fds[1]};
        r->fixed_files = io_uring_register_files(&r->ring, fds, 2) == 0;
    }
    return r->fixed_files;
}

int fp_ring_buffers_init(struct fp_ring *r, unsigned nr)
{
    return io_uring_register_buffers_sparse(&r->ring, nr);
}

int fp_ring_buffer_set(struct fp_ring *r, unsigned index, uint64_t addr, uint64_t nbytes)
{
    struct iovec iov = {(void *)(uintptr_t)addr, (size_t)nbytes};
    __u64 tag = 0;
    int ret;

    if (nbytes == 0)
        return -EINVAL;
    ret = io_uring_register_buffers_update_tag(&r->ring, index, &iov, &tag, 1);
    return ret < 0 ? ret : 0;
}

#ifdef FP_TESTING
int fp_ring_set_fault(struct fp_ring *r, const struct fp_fault *fault)
{
    r->has_fault = fault != NULL;
    if (fault)
        r->fault = *fault;
    r->submit_calls = 0;
    return 0;
}

/* The injected error of this submit call, or 0. */
static int submit_fault(struct fp_ring *r)
{
    int32_t call = r->submit_calls++;

    if (!r->has_fault || !r->fault.submit_errno)
        return 0;
    if (call >= r->fault.submit_fail_from && call < r->fault.submit_fail_from + r->fault.submit_fail_count)
        return -r->fault.submit_errno;
    return 0;
}
#else
#define submit_fault(r) 0
#endif

static int is_soft(int ret)
{
    return ret == -EAGAIN || ret == -EBUSY || ret == -EINTR || ret == -ETIME;
}

/* Turn one unconsumed SQE into a no-op and fail its extent with err (once per slot). */
static void fail_sqe(struct fp_ring *r, struct io_uring_sqe *sqe, int err)
{
    unsigned idx = (unsigned)sqe->user_data;
    struct fp_slot *s;

    if (idx >= r->depth)
        return;
    s = &r->slots[idx];
    io_uring_prep_nop(sqe);
    sqe->user_data = idx;
    if (!s->in_use || s->failed)
        return;
    s->failed = err;
    r->failed[r->nfailed++] = idx;
}

/*
 * After a hard submission error: every SQE the kernel has not consumed, flushed to the SQ ring
 * ([*khead, *ktail)) or still only prepared ([sqe_head, sqe_tail)), becomes a no-op and its extent
 * fails with err. Without SQPOLL the kernel reads SQEs only inside io_uring_enter, so rewriting them
 * between calls is safe.
 */
static void fail_unsubmitted(struct fp_ring *r, int err)
{
    struct io_uring_sq *sq = &r->ring.sq;
    unsigned head = io_uring_smp_load_acquire(sq->khead);
    unsigned tail = *sq->ktail;

    for (unsigned i = head; i != tail; i++)
        fail_sqe(r, &sq->sqes[sq->array[i & sq->ring_mask] & sq->ring_mask], err);
    for (unsigned i = sq->sqe_head; i != sq->sqe_tail; i++)
        fail_sqe(r, &sq->sqes[i & sq->ring_mask], err);
}

/* io_uring_submit, failing the unsubmitted extents on a hard error. Returns 0 or the hard -errno. */
static int ring_submit(struct fp_ring *r)
{
    int ret = submit_fault(r);

    if (ret == 0)
        ret = io_uring_submit(&r->ring);
    if (ret >= 0 || is_soft(ret))
        return 0;
    fail_unsubmitted(r, -ret);
    return ret;
}

static int prep_slot(struct fp_ring *r, unsigned idx)
{
    struct fp_slot *s = &r->slots[idx];
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    uint64_t want;
    int fd, which;

    if (!sqe) /* cannot happen: each busy slot holds at most one SQE and the SQ has one per slot */
        return -EBUSY;
    if (s->direct) {
        uint64_t body = s->req.nbytes - s->req.nbytes % FP_PAGE_NBYTES;
        want = body - s->done;
        if (want > FP_MAX_RW_NBYTES - FP_MAX_RW_NBYTES % FP_PAGE_NBYTES)
            want = FP_MAX_RW_NBYTES - FP_MAX_RW_NBYTES % FP_PAGE_NBYTES;
        which = 0;
    } else {
        want = s->req.nbytes - s->done;
        if (want > FP_MAX_RW_NBYTES)
            want = FP_MAX_RW_NBYTES;
        which = 1;
    }
    fd = r->fixed_files ? which : r->fds[which];
    s->cur_offset = s->req.file_offset + s->done;
    s->cur_nbytes = want;
    s->cur_direct = s->direct;
    if (s->req.flags & FP_FIXED)
        io_uring_prep_read_fixed(sqe, fd, (void *)(uintptr_t)(s->req.addr + s->done), (unsigned)want,
                                 s->cur_offset, (int)s->req.buf_index);
    else
        io_uring_prep_read(sqe, fd, (void *)(uintptr_t)(s->req.addr + s->done), (unsigned)want, s->cur_offset);
    if (r->fixed_files)
        sqe->flags |= IOSQE_FIXED_FILE;
    sqe->user_data = idx;
    r->sqes++;
    r->stats.sqes++;
    return 0;
}

static void free_slot(struct fp_ring *r, unsigned idx)
{
    r->slots[idx].in_use = 0;
    r->in_use--;
    r->free_slots[r->nfree++] = idx;
}

int fp_ring_submit(struct fp_ring *r, unsigned n, const struct fp_read *reqs)
{
    unsigned k = 0;
    int ret = 0;

    if (r->fds[1] < 0)
        return -EBADF;
    while (k < n && r->nfree) {
        unsigned idx = r->free_slots[--r->nfree];
        struct fp_slot *s = &r->slots[idx];
        memset(s, 0, sizeof(*s));
        s->req = reqs[k];
        s->direct = (s->req.flags & FP_DIRECT) && r->fds[0] >= 0 && s->req.nbytes >= FP_PAGE_NBYTES;
        s->in_use = 1;
        r->in_use++;
        ret = prep_slot(r, idx);
        if (ret < 0) { /* no SQE for it (nothing was prepared): give the slot back */
            free_slot(r, idx);
            break;
        }
        k++;
    }
    ring_submit(r); /* a hard error fails the taken extents through fp_ring_reap, never here */
    return k || ret >= 0 ? (int)k : ret;
}

#ifdef FP_TESTING
static int64_t apply_fault(const struct fp_ring *r, const struct fp_slot *s, int64_t res)
{
    const struct fp_fault *f = &r->fault;
    int64_t off = (int64_t)s->cur_offset;

    if (s->cur_direct && f->direct_errno)
        return -f->direct_errno;
    if (f->err_errno && f->err_offset >= off && f->err_offset < off + (int64_t)s->cur_nbytes)
        return -f->err_errno;
    if (res <= 0)
        return res;
    if (f->eof_offset >= 0)
        res = off >= f->eof_offset ? 0 : (res < f->eof_offset - off ? res : f->eof_offset - off);
    if (s->cur_direct && f->direct_max_nbytes >= 0) {
        int64_t left = f->direct_max_nbytes - (int64_t)s->ndirect;
        res = left <= 0 ? 0 : (res < left ? res : left);
    }
    if (f->max_res > 0 && res > f->max_res)
        res = f->max_res;
    return res;
}
#endif

static void fill_done(struct fp_slot *s, int32_t error, struct fp_done *out)
{
    out->tag = s->req.tag;
    out->nbytes_direct = s->ndirect;
    out->nbytes_buffered = s->done - s->ndirect;
    out->fail_offset = s->cur_offset;
    out->fail_nbytes = s->cur_nbytes;
    out->error = error;
    out->flags = s->dflags;
    out->direct_error = s->direct_error;
}

/* Handle one CQE: 1 if the slot's extent finished (filled *out), 0 if resubmitted or a no-op came back
 * (then *freed is set). */
static int handle_cqe(struct fp_ring *r, unsigned idx, int64_t res, struct fp_done *out, int *freed)
{
    struct fp_slot *s = &r->slots[idx];
    int32_t error = 0;

    if (s->failed) { /* the no-op of a failed submission: its fp_done was returned already */
        free_slot(r, idx);
        *freed = 1;
        return 0;
    }
#ifdef FP_TESTING
    if (r->has_fault)
        res = apply_fault(r, s, res);
#endif
    if (res == -EAGAIN || res == -EINTR) {
        /* resubmit as it was */
    } else if (s->cur_direct) {
        if (res == -EINVAL || res == -EBADF || res == -EOPNOTSUPP) {
            s->dflags |= FP_DONE_DIRECT_REFUSED;
            s->direct_error = (int32_t)-res;
            s->direct = 0;
        } else if (res < 0) {
            error = (int32_t)-res;
        } else if (res == 0) {
            s->direct = 0; /* the direct descriptor says EOF: let the buffered one decide */
        } else {
            s->done += (uint64_t)res;
            s->ndirect += (uint64_t)res;
            if (res % FP_PAGE_NBYTES || s->done >= s->req.nbytes - s->req.nbytes % FP_PAGE_NBYTES)
                s->direct = 0; /* an unaligned count or the end of the body: the rest goes buffered */
        }
    } else if (res < 0) {
        error = (int32_t)-res;
    } else if (res == 0 && s->done < s->req.nbytes) {
        s->dflags |= FP_DONE_SHORT;
    } else {
        s->done += (uint64_t)res;
    }
    if (!error && !(s->dflags & FP_DONE_SHORT) && s->done < s->req.nbytes) {
        int ret;
        r->stats.resubmits++;
        ret = prep_slot(r, idx);
        if (ret == 0)
            return 0;
        error = (int32_t)-ret; /* no SQE for it: end the extent with that error */
        s->cur_nbytes = 0;
    }
    fill_done(s, error, out);
    free_slot(r, idx);
    *freed = 1;
    return 1;
}

/* Move failed-at-submission extents into out[k..max_out); returns the new k. */
static unsigned drain_failed(struct fp_ring *r, unsigned k, struct fp_done *out, unsigned max_out)
{
    unsigned i = 0;

    while (i < r->nfailed && k < max_out) {
        struct fp_slot *s = &r->slots[r->failed[i++]];
        fill_done(s, s->failed, &out[k]);
        out[k++].flags |= FP_DONE_NOT_SUBMITTED;
    }
    memmove(r->failed, r->failed + i, (r->nfailed - i) * sizeof(*r->failed));
    r->nfailed -= i;
    return k;
}

int fp_ring_reap(struct fp_ring *r, unsigned min_done, int timeout_ms, struct fp_done *out, unsigned max_out)
{
    unsigned k = 0;
    int freed = 0;
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    struct timespec now, deadline;
    int ret;

    if (min_done > max_out)
        min_done = max_out;
    if (timeout_ms >= 0) {
        clock_gettime(CLOCK_MONOTONIC, &deadline);
        deadline.tv_sec += timeout_ms / 1000;
        deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    for (;;) {
        k = drain_failed(r, k, out, max_out);
        while (k < max_out && io_uring_peek_cqe(&r->ring, &cqe) == 0) {
            unsigned idx = (unsigned)cqe->user_data;
            int64_t res = cqe->res;
            io_uring_cqe_seen(&r->ring, cqe);
            r->sqes--;
            if (idx < r->depth && r->slots[idx].in_use)
                k += (unsigned)handle_cqe(r, idx, res, &out[k], &freed);
        }
        if (k >= min_done || k >= max_out || freed || r->in_use == 0) {
            ret = ring_submit(r); /* resubmissions made while reaping */
            k = drain_failed(r, k, out, max_out);
            return k || ret >= 0 ? (int)k : ret;
        }
        r->stats.enter_waits++;
        ret = submit_fault(r);
        if (ret == 0 && timeout_ms < 0) {
            ret = io_uring_submit_and_wait(&r->ring, 1);
        } else if (ret == 0) {
            long ns;
            clock_gettime(CLOCK_MONOTONIC, &now);
            ns = (deadline.tv_sec - now.tv_sec) * 1000000000L + (deadline.tv_nsec - now.tv_nsec);
            if (ns <= 0) {
                ret = ring_submit(r);
                k = drain_failed(r, k, out, max_out);
                return k || ret >= 0 ? (int)k : ret;
            }
            ts.tv_sec = ns / 1000000000L;
            ts.tv_nsec = ns % 1000000000L;
            ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
        }
        if (ret == -ETIME || ret == -EINTR)
            return (int)k;
        if (ret < 0 && !is_soft(ret)) {
            fail_unsubmitted(r, -ret);
            if (r->nfailed)
                continue; /* report them */
            return k ? (int)k : ret;
        }
    }
}

int fp_ring_in_flight(const struct fp_ring *r)
{
    return (int)r->in_use;
}

int fp_ring_get_stats(const struct fp_ring *r, struct fp_ring_stats *out)
{
    *out = r->stats;
    return 0;
}

int fp_ring_close(struct fp_ring *r)
{
    struct io_uring_cqe *cqe;

    if (!r)
        return 0;
    /* No new SQE is prepared from here on: wait for each one prepared to complete. */
    io_uring_submit(&r->ring);
    while (r->sqes) {
        int ret = io_uring_wait_cqe(&r->ring, &cqe);
        if (ret == -EINTR || ret == -EAGAIN)
            continue;
        if (ret < 0)
            break; /* the ring is broken: nothing more will complete */
        r->sqes--;
        io_uring_cqe_seen(&r->ring, cqe);
    }
    io_uring_queue_exit(&r->ring); /* also drops registered buffers and files */
    for (int i = 0; i < 2; i++)
        if (r->fds[i] >= 0)
            close(r->fds[i]);
    free(r->slots);
    free(r->free_slots);
    free(r->failed);
    free(r);
    return 0;
}

int fp_liburing_version(int *major, int *minor)
{
#if defined(IO_URING_VERSION_MAJOR) && defined(IO_URING_VERSION_MINOR)
    *major = IO_URING_VERSION_MAJOR;
    *minor = IO_URING_VERSION_MINOR;
    return 0;
#else
    *major = *minor = -1;
    return -ENOTSUP;
#endif
}
