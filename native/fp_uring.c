/*
 * fp_uring.c - the thin C shim over liburing behind flashpack's "uring" reader.
 *
 * Python (flashpack/io/uring.py) never touches liburing structures: it calls the few fp_ functions
 * below through cffi (API mode, out of line; cffi releases the GIL around every call). Each function
 * returns >= 0 on success or -errno, like liburing itself.
 *
 * Model: one ring per open file. A ring has `depth` request slots; each slot holds one extent (a read
 * of `nbytes` bytes at `file_offset` into `addr`) and keeps exactly one SQE in flight for it until the
 * extent is complete. Short reads, -EAGAIN and -EINTR are resubmitted here at the exact offset reached,
 * reads longer than the kernel's 0x7ffff000-byte cap are split, and the page-aligned body of a
 * FP_DIRECT extent goes to the O_DIRECT descriptor while any unaligned remainder (a tail, or whatever
 * follows a short or refused direct read) goes to the buffered descriptor: an unaligned remainder is
 * never resubmitted with O_DIRECT. Python gets one fp_done record per finished extent.
 *
 * Not thread-safe: one thread drives a ring at a time.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

/* Request flags (struct fp_read.flags). */
#define FP_DIRECT 1u /* read the page-aligned body on the O_DIRECT descriptor */
#define FP_FIXED 2u  /* buf_index names a registered buffer that holds [addr, addr + nbytes) */

/* Completion flags (struct fp_done.flags). */
#define FP_DONE_DIRECT_REFUSED 1u /* a direct read failed with EINVAL/EBADF/EOPNOTSUPP; finished buffered */
#define FP_DONE_SHORT 2u          /* a buffered read returned 0 before nbytes: the file is shorter */

/* Ring setup flags accepted by fp_ring_open (dropped one at a time when the kernel refuses them). */
#define FP_SETUP_COOP_TASKRUN 1u

#define FP_PAGE_NBYTES 4096u
#define FP_MAX_RW_NBYTES 0x7ffff000ull /* read(2), NOTES: the most one read transfers */

struct fp_read {
    uint64_t tag;         /* the caller's id, returned unchanged in fp_done */
    uint64_t file_offset; /* first byte of the file to read */
    uint64_t nbytes;      /* bytes to read */
    uint64_t addr;        /* destination address; the caller keeps it valid until fp_done */
    uint32_t flags;       /* FP_DIRECT | FP_FIXED */
    uint32_t buf_index;   /* registered buffer index when FP_FIXED */
};

struct fp_done {
    uint64_t tag;             /* fp_read.tag */
    uint64_t nbytes_direct;   /* bytes read with O_DIRECT */
    uint64_t nbytes_buffered; /* bytes read through the page cache */
    uint64_t fail_offset;     /* error != 0: file offset of the failed read */
    uint64_t fail_nbytes;     /* error != 0: length of the failed read */
    int32_t error;            /* 0, or the positive errno of the read that failed */
    uint32_t flags;           /* FP_DONE_* */
    int32_t direct_error;     /* FP_DONE_DIRECT_REFUSED: the positive errno of the refused direct read */
};

/* Fault injection for tests: applied to each CQE's result before it is handled. */
struct fp_fault {
    int64_t max_res;           /* > 0: a successful read reports at most this many bytes */
    int64_t direct_max_nbytes; /* >= 0: direct reads of one extent stop (return 0) after this many bytes */
    int32_t direct_errno;      /* != 0: every direct read fails with -direct_errno */
    int32_t err_errno;         /* != 0: a read whose range holds byte err_offset fails with -err_errno */
    int64_t err_offset;
    int64_t eof_offset; /* >= 0: reads see the file end at this byte (0 at or past it) */
};

struct fp_ring_stats {
    uint64_t sqes;       /* SQEs prepared */
    uint64_t resubmits;  /* of which resubmissions (short read, EAGAIN, split, switch to buffered) */
    uint64_t enter_waits;/* times the reaper blocked in the kernel */
};

struct fp_slot {
    struct fp_read req;
    uint64_t done;      /* bytes of req finished */
    uint64_t ndirect;   /* of which O_DIRECT */
    uint64_t cur_offset;/* the SQE in flight: file offset and length */
    uint64_t cur_nbytes;
    uint32_t direct;    /* the body is still being read with O_DIRECT */
    uint32_t cur_direct;
    uint32_t dflags;    /* FP_DONE_* so far */
    int32_t direct_error;
    uint32_t in_use;
};

struct fp_ring {
    struct io_uring ring;
    unsigned depth;
    unsigned in_use;    /* slots holding an unfinished extent */
    unsigned sqes;      /* SQEs prepared and not yet completed */
    int fds[2];         /* owned duplicates: [0] O_DIRECT (or -1), [1] buffered */
    int fixed_files;    /* fds registered: SQEs use indices 0/1 with IOSQE_FIXED_FILE */
    int has_fault;
    struct fp_fault fault;
    struct fp_ring_stats stats;
    unsigned *free_slots;
    unsigned nfree;
    struct fp_slot *slots;
};

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
 *     EPERM   io_uring_setup(2) refused: seccomp (Docker's default profile), or
 *             kernel.io_uring_disabled=1 and the caller is neither privileged nor in io_uring_group.
 *     ENOSYS  the kernel has no io_uring.
 *     ENOMEM  no memory for the ring (kernels before 5.12 charge it to RLIMIT_MEMLOCK).
 *     EINVAL  depth is 0 or too large.
 */
int fp_ring_open(unsigned depth, unsigned setup_flags, struct fp_ring **out)
{
    struct fp_ring *r;
    struct io_uring_params p;
    unsigned flags = setup_flags;
    int ret;

    if (depth == 0 || depth > 4096)
        return -EINVAL;
    r = calloc(1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    r->slots = calloc(depth, sizeof(*r->slots));
    r->free_slots = calloc(depth, sizeof(*r->free_slots));
    if (!r->slots || !r->free_slots) {
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
    free(r);
    return ret;
}

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

/*
 * NAME
 *     fp_ring_set_fault - inject faults (tests only)
 * SYNOPSIS
 *     int fp_ring_set_fault(struct fp_ring *r, const struct fp_fault *fault);
 * DESCRIPTION
 *     From now on, rewrite each CQE result as `fault` says before handling it (see struct fp_fault):
 *     the reads are real, only the reported result changes. NULL clears.
 * RETURN VALUE
 *     0.
 */
int fp_ring_set_fault(struct fp_ring *r, const struct fp_fault *fault)
{
    r->has_fault = fault != NULL;
    if (fault)
        r->fault = *fault;
    return 0;
}

static int prep_slot(struct fp_ring *r, unsigned idx)
{
    struct fp_slot *s = &r->slots[idx];
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    uint64_t want, body;
    int fd, which;

    if (!sqe) {
        /* the SQ holds at most one SQE per slot, so this only happens if a submit failed: flush */
        int ret = io_uring_submit(&r->ring);
        if (ret < 0)
            return ret;
        sqe = io_uring_get_sqe(&r->ring);
        if (!sqe)
            return -EBUSY;
    }
    if (s->direct) {
        body = s->req.nbytes - s->req.nbytes % FP_PAGE_NBYTES;
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

/*
 * NAME
 *     fp_ring_submit - start reading extents
 * SYNOPSIS
 *     int fp_ring_submit(struct fp_ring *r, unsigned n, const struct fp_read *reqs);
 * DESCRIPTION
 *     Takes reqs[0..k) into free slots, k = min(n, free slots), prepares one SQE for each and submits
 *     them without waiting. FP_DIRECT is honoured only when the ring has an O_DIRECT descriptor and
 *     file_offset, addr and nbytes >= 4096 suit it (the caller checks alignment); the body, nbytes
 *     rounded down to 4096, is read direct and the rest buffered. Each request ends in one fp_done
 *     from fp_ring_reap().
 * RETURN VALUE
 *     k, the number of requests taken (0 when every slot is busy), or -errno.
 * ERRORS
 *     EBADF   the ring has no files (fp_ring_set_files).
 *     Errors of io_uring_submit(3) other than EAGAIN/EBUSY/EINTR (those leave the SQEs queued; the
 *     next fp_ring_submit or fp_ring_reap submits them).
 */
int fp_ring_submit(struct fp_ring *r, unsigned n, const struct fp_read *reqs)
{
    unsigned k = 0;
    int ret;

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
        if (ret < 0) { /* give the slot back; report what was taken */
            s->in_use = 0;
            r->in_use--;
            r->free_slots[r->nfree++] = idx;
            if (!k)
                return ret;
            break;
        }
        k++;
    }
    ret = io_uring_submit(&r->ring);
    if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR)
        return ret;
    return (int)k;
}

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

/* Handle one CQE: 1 if the slot finished (filled *out), 0 if resubmitted. */
static int handle_cqe(struct fp_ring *r, unsigned idx, int64_t res, struct fp_done *out)
{
    struct fp_slot *s = &r->slots[idx];
    int32_t error = 0;

    if (r->has_fault)
        res = apply_fault(r, s, res);
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
    out->tag = s->req.tag;
    out->nbytes_direct = s->ndirect;
    out->nbytes_buffered = s->done - s->ndirect;
    out->fail_offset = s->cur_offset;
    out->fail_nbytes = s->cur_nbytes;
    out->error = error;
    out->flags = s->dflags;
    out->direct_error = s->direct_error;
    s->in_use = 0;
    r->in_use--;
    r->free_slots[r->nfree++] = idx;
    return 1;
}

/*
 * NAME
 *     fp_ring_reap - wait for extents to finish
 * SYNOPSIS
 *     int fp_ring_reap(struct fp_ring *r, unsigned min_done, int timeout_ms,
 *                      struct fp_done *out, unsigned max_out);
 * DESCRIPTION
 *     Handles completions, resubmitting short reads, EAGAIN/EINTR, the next piece of a split read
 *     and the buffered remainder of a direct read at the exact offset reached, until at least
 *     min_done extents have finished (or none is in flight), then returns the finished ones in
 *     out[0..k), k <= max_out, without waiting for more. A read error ends its extent with
 *     fp_done.error set; it is not an error of this call. A direct read refused with EINVAL, EBADF or
 *     EOPNOTSUPP is retried buffered and flagged FP_DONE_DIRECT_REFUSED. timeout_ms < 0 waits
 *     without limit. Blocks with the GIL released (cffi); keep timeout_ms short so the caller can
 *     notice signals between calls.
 * RETURN VALUE
 *     k >= 0 (possibly fewer than min_done after a timeout or a signal), or -errno.
 * ERRORS
 *     Errors of io_uring_submit_and_wait_timeout(3) other than ETIME and EINTR, returned only when no
 *     extent finished in this call.
 */
int fp_ring_reap(struct fp_ring *r, unsigned min_done, int timeout_ms, struct fp_done *out, unsigned max_out)
{
    unsigned k = 0;
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
        while (k < max_out && io_uring_peek_cqe(&r->ring, &cqe) == 0) {
            unsigned idx = (unsigned)cqe->user_data;
            int64_t res = cqe->res;
            io_uring_cqe_seen(&r->ring, cqe);
            r->sqes--;
            k += (unsigned)handle_cqe(r, idx, res, &out[k]);
        }
        if (k >= min_done || k >= max_out || r->in_use == 0) {
            ret = io_uring_submit(&r->ring); /* resubmissions made while reaping */
            if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR && !k)
                return ret;
            return (int)k;
        }
        r->stats.enter_waits++;
        if (timeout_ms < 0) {
            ret = io_uring_submit_and_wait(&r->ring, 1);
        } else {
            long ns;
            clock_gettime(CLOCK_MONOTONIC, &now);
            ns = (deadline.tv_sec - now.tv_sec) * 1000000000L + (deadline.tv_nsec - now.tv_nsec);
            if (ns <= 0) {
                io_uring_submit(&r->ring);
                return (int)k;
            }
            ts.tv_sec = ns / 1000000000L;
            ts.tv_nsec = ns % 1000000000L;
            ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
        }
        if (ret == -ETIME || ret == -EINTR)
            return (int)k;
        if (ret < 0 && ret != -EAGAIN && ret != -EBUSY)
            return k ? (int)k : ret;
    }
}

/*
 * NAME
 *     fp_ring_in_flight, fp_ring_stats - what the ring is doing
 * SYNOPSIS
 *     int fp_ring_in_flight(const struct fp_ring *r);
 *     int fp_ring_get_stats(const struct fp_ring *r, struct fp_ring_stats *out);
 * RETURN VALUE
 *     The number of extents taken and not yet returned by fp_ring_reap; 0 for fp_ring_get_stats.
 */
int fp_ring_in_flight(const struct fp_ring *r)
{
    return (int)r->in_use;
}

int fp_ring_get_stats(const struct fp_ring *r, struct fp_ring_stats *out)
{
    *out = r->stats;
    return 0;
}

/*
 * NAME
 *     fp_ring_close - drain and free a ring
 * SYNOPSIS
 *     int fp_ring_close(struct fp_ring *r);
 * DESCRIPTION
 *     Waits until every SQE in flight has completed (the kernel may otherwise still write into the
 *     callers' buffers after the ring is gone: ring teardown is asynchronous), discarding the results,
 *     then unregisters buffers and files, exits the ring (io_uring_queue_exit(3)), closes the duplicated
 *     descriptors and frees r. Safe to call with r == NULL. Every extent taken and not reaped is lost.
 * RETURN VALUE
 *     0.
 */
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
    free(r);
    return 0;
}

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
