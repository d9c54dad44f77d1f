/* The io_uring loop of an engine thread.
 *
 * Every leg socket has one multishot RECVMSG outstanding that fills buffers from a ring of provided
 * buffers; relayed packets go out as SENDMSG submissions straight from the buffer they arrived in;
 * one io_uring_enter per loop iteration submits all of them and waits for the next completions (or
 * the writer's tick).  Compared with epoll + recvmmsg + sendmmsg this removes the readiness polling
 * and one or two system calls per packet.  The ring is created by the engine thread itself
 * (SINGLE_ISSUER + DEFER_TASKRUN: completions are reaped only when this thread enters), and
 * checked with a loopback datagram before use; without it (Linux < 6.1, io_uring disabled or
 * filtered) the engine runs its epoll loop instead.
 *
 * Completions carry user_data = type << 56 | generation << 32 | index: a receive names a slot of
 * the socket table (its generation changes when the socket closes, so late completions of a closed
 * socket are recognised), a send names the buffer it sends from.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "engine_int.h"

#define UR_SQ 4096
#define UR_CQ 16384
#define UR_NBUF 4096                   /* provided receive buffers (a power of two) */
#define UR_BUFSZ 2048
#define UR_BGID 0
/* An iteration waits for this many completions or the writer's tick (at most 1 ms): under load the
 * batches grow and the wake-ups become rarer, at low load a packet waits for the tick at worst.
 * While packets are being relayed the batch stays small (relay latency); traffic that is only
 * recorded waits for larger batches (the reorder window is 100 ms anyway), which saves wake-ups and
 * the timer re-arming that each one costs (a VM exit on a KVM guest). */
#define UR_WAIT_RELAY 32
#define UR_WAIT_RECORD 128

enum { UD_RECV = 1, UD_SEND = 2, UD_CMD = 3, UD_OTHER = 4, UD_PROBE = 5, UD_PKT = 6 };

typedef struct {
    struct msghdr mh;
    struct iovec iov;
    struct sockaddr_in to;
    uint32_t sock, gen;                /* the sending socket, for its counters */
} ur_send_t;

struct rc_uring {
    int fd;
    unsigned sq_entries, tail;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ring, *cq_ring;
    size_t sq_ring_sz, cq_ring_sz, sqes_sz;
    /* provided buffers */
    struct io_uring_buf_ring *br;
    size_t br_sz;
    uint8_t *bufs;
    ur_send_t *sends;                  /* [UR_NBUF]: sends from received buffers; [UR_NBUF + i]: copies */
    uint8_t *cbufs;                    /* io "packet": the copies relayed packets are sent from ... */
    uint32_t *cfree, ncfree;           /* ... and the free ones, a stack (the warmest first) */
    uint16_t br_tail;
    struct msghdr recv_mh;
    /* socket table */
    rc_sock_t **socks;
    uint32_t *gens, *free_ids;
    uint32_t nsocks, cap, nfree;
    uint64_t recv_rearms;
    uint32_t nfixed;                   /* registered-file slots (0: none): the socket table's first ones */
    int send_to;                       /* IORING_OP_SEND with an address works (else SENDMSG) */
    unsigned relays;                   /* sends queued in the current iteration */
    int64_t relayed_at;                /* the last iteration that queued any */
};

static inline uint64_t ud(unsigned type, uint32_t gen, uint32_t idx)
{
    return ((uint64_t)type << 56) | ((uint64_t)(gen & 0xffffffu) << 32) | idx;
}

static int ur_enter(struct rc_uring *u, unsigned to_submit, unsigned min_complete, unsigned flags, void *arg,
                    size_t argsz)
{
    return (int)syscall(__NR_io_uring_enter, u->fd, to_submit, min_complete, flags, arg, argsz);
}

/* submits what is queued; with wait_nr, waits up to timeout_ns for that many completions */
static void ur_submit(struct rc_uring *u, unsigned wait_nr, int64_t timeout_ns)
{
    unsigned head = __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
    unsigned to_submit = u->tail - head;
    __atomic_store_n(&u->br->tail, u->br_tail, __ATOMIC_RELEASE);
    __atomic_store_n(u->sq_tail, u->tail, __ATOMIC_RELEASE);
    if (wait_nr) {
        struct __kernel_timespec ts;
        struct io_uring_getevents_arg arg;
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        memset(&arg, 0, sizeof arg);
        arg.sigmask_sz = _NSIG / 8;
        arg.ts = (uint64_t)(uintptr_t)&ts;
        ur_enter(u, to_submit, wait_nr, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, &arg, sizeof arg);
    } else {
        ur_enter(u, to_submit, 0, IORING_ENTER_GETEVENTS, NULL, 0);
    }
}

static struct io_uring_sqe *get_sqe(struct rc_uring *u)
{
    struct io_uring_sqe *sqe;
    if (u->tail - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE) >= u->sq_entries) {
        ur_submit(u, 0, 0);
        if (u->tail - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE) >= u->sq_entries)
            return NULL;
    }
    sqe = &u->sqes[u->tail & *u->sq_mask];
    memset(sqe, 0, sizeof *sqe);
    u->tail++;
    return sqe;
}

static void put_buf(struct rc_uring *u, unsigned bid)
{
    /* write the fields one by one: the ring's tail overlays bufs[0].resv */
    struct io_uring_buf *b = &u->br->bufs[u->br_tail & (UR_NBUF - 1)];
    b->addr = (uint64_t)(uintptr_t)(u->bufs + (size_t)bid * UR_BUFSZ);
    b->len = UR_BUFSZ;
    b->bid = (uint16_t)bid;
    u->br_tail++;
}

static int arm_recv_fd(struct rc_uring *u, int fd, uint64_t user_data)
{
    struct io_uring_sqe *sqe = get_sqe(u);
    if (!sqe)
        return -1;
    sqe->opcode = IORING_OP_RECVMSG;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)&u->recv_mh;
    sqe->len = 1;
    sqe->ioprio = IORING_RECV_MULTISHOT;
    sqe->flags = IOSQE_BUFFER_SELECT;
    sqe->buf_group = UR_BGID;
    sqe->user_data = user_data;
    return 0;
}

static void arm_cmd(rc_thread_t *t)
{
    struct io_uring_sqe *sqe = get_sqe(t->ur);
    if (!sqe)
        return;
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = t->cmdfd;
    sqe->poll32_events = POLLIN;
    sqe->len = IORING_POLL_ADD_MULTI;
    sqe->user_data = ud(UD_CMD, 0, 0);
}

static void cancel(struct rc_uring *u, uint64_t target)
{
    struct io_uring_sqe *sqe = get_sqe(u);
    if (!sqe)
        return;
    sqe->opcode = IORING_OP_ASYNC_CANCEL;
    sqe->addr = target;
    sqe->user_data = ud(UD_OTHER, 0, 0);
}

/* puts fd (or -1: empty) into registered-file slot idx */
static int set_fixed(struct rc_uring *u, uint32_t idx, int fd)
{
    struct io_uring_files_update up;
    memset(&up, 0, sizeof up);
    up.offset = idx;
    up.fds = (uint64_t)(uintptr_t)&fd;
    return syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_FILES_UPDATE, &up, 1) == 1 ? 0 : -1;
}

/* ---- sockets ------------------------------------------------------------------------------- */

int rc_uring_add_sock(rc_thread_t *t, rc_sock_t *k)
{
    struct rc_uring *u = t->ur;
    uint32_t idx;
    if (u->nfree) {
        idx = u->free_ids[--u->nfree];
    } else {
        if (u->nsocks == u->cap) {
            uint32_t cap = u->cap * 2;
            rc_sock_t **socks = realloc(u->socks, cap * sizeof *socks);
            uint32_t *gens, *free_ids;
            if (!socks)
                return -1;
            u->socks = socks;
            gens = realloc(u->gens, cap * sizeof *gens);
            if (!gens)
                return -1;
            u->gens = gens;
            free_ids = realloc(u->free_ids, cap * sizeof *free_ids);
            if (!free_ids)
                return -1;
            u->free_ids = free_ids;
            memset(u->gens + u->cap, 0, (cap - u->cap) * sizeof *gens);
            u->cap = cap;
        }
        idx = u->nsocks++;
    }
    u->socks[idx] = k;
    u->gens[idx] = (u->gens[idx] + 1) & 0xffffffu;
    k->slot = idx;
    k->fixed = idx < u->nfixed && set_fixed(u, idx, k->fd) == 0;
    if (t->pk)
        return 0;                      /* the packet ring receives for it */
    return arm_recv_fd(u, k->fd, ud(UD_RECV, u->gens[idx], idx));
}

void rc_uring_del_sock(rc_thread_t *t, rc_sock_t *k)
{
    struct rc_uring *u = t->ur;
    uint32_t idx = k->slot;
    if (idx >= u->nsocks || u->socks[idx] != k)
        return;
    if (!t->pk)
        cancel(u, ud(UD_RECV, u->gens[idx], idx));
    if (k->fixed) {
        set_fixed(u, idx, -1);         /* the slot's reference would keep the socket open */
        k->fixed = 0;
    }
    u->socks[idx] = NULL;
    u->gens[idx] = (u->gens[idx] + 1) & 0xffffffu;
    u->free_ids[u->nfree++] = idx;
    /* the receive holds the socket open until it is cancelled: do it before the caller closes it */
    ur_submit(u, 0, 0);
}

static rc_sock_t *lookup(struct rc_uring *u, uint64_t user_data)
{
    uint32_t idx = (uint32_t)user_data, gen = (uint32_t)(user_data >> 32) & 0xffffffu;
    return idx < u->nsocks && u->gens[idx] == gen ? u->socks[idx] : NULL;
}

/* ---- completions --------------------------------------------------------------------------- */

/* sends payload (which stays valid until the completion of send slot bid) from k's peer socket */
static int queue_send(struct rc_uring *u, rc_sock_t *k, unsigned bid, uint8_t *payload, size_t len,
                      const struct sockaddr_in *to, int raw_fd)
{
    rc_leg_io_t *peer = &k->s->io[1 - k->leg];
    rc_sock_t *pk = k->rtcp ? &peer->rtcp : &peer->rtp;
    ur_send_t *m = &u->sends[bid];
    struct io_uring_sqe *sqe;
    if (pk->fd < 0 || !(sqe = get_sqe(u)))
        return 0;
    m->to = *to;
    m->sock = pk->slot;
    m->gen = u->gens[pk->slot];
    if (u->send_to) {
        /* a send with an address: no message header to copy in */
        sqe->opcode = IORING_OP_SEND;
        sqe->addr = (uint64_t)(uintptr_t)payload;
        sqe->len = (uint32_t)len;
        sqe->addr2 = (uint64_t)(uintptr_t)&m->to;
        sqe->addr_len = (uint16_t)sizeof m->to;
    } else {
        m->iov.iov_base = payload;
        m->iov.iov_len = len;
        memset(&m->mh, 0, sizeof m->mh);
        m->mh.msg_name = &m->to;
        m->mh.msg_namelen = sizeof m->to;
        m->mh.msg_iov = &m->iov;
        m->mh.msg_iovlen = 1;
        sqe->opcode = IORING_OP_SENDMSG;
        sqe->addr = (uint64_t)(uintptr_t)&m->mh;
        sqe->len = 1;
    }
    if (raw_fd >= 0) {
        sqe->fd = raw_fd;              /* payload is a whole IP datagram from pk's port */
    } else if (pk->fixed) {
        sqe->fd = (int32_t)pk->slot;
        sqe->flags = IOSQE_FIXED_FILE;
    } else {
        sqe->fd = pk->fd;
    }
    sqe->msg_flags = MSG_DONTWAIT;
    sqe->user_data = ud(UD_SEND, 0, bid);
    u->relays++;
    return 1;
}

/* a datagram for socket k: checked, relayed, recorded; 1 if a send now holds buffer bid, which the
 * caller must then not recycle (bid < 0: the payload is not a provided buffer; a relay sends a copy) */
static int datagram(rc_thread_t *t, rc_sock_t *k, int bid, uint8_t *payload, size_t len, int trunc,
                    const struct sockaddr_in *src, int64_t now)
{
    struct rc_uring *u = t->ur;
    rc_session_t *s = k->s;
    int L = k->leg, relay = 0, held = 0;
    struct sockaddr_in *to = NULL;
    rc_rtp_t p;
    if (k->rtcp)
        relay = rc_rtcp_check(s, L, payload, len, trunc, src) && (to = rc_relay_to(s, L, 1));
    else if (rc_rtp_check(s, L, payload, len, trunc, src, &p, now))
        relay = (to = rc_relay_to(s, L, 0)) != NULL;
    else
        return 0;
    if (relay) {
        if (bid >= 0) {
            held = queue_send(u, k, (unsigned)bid, payload, len, to, -1);
        } else if (u->ncfree && len + 28 <= UR_BUFSZ) {
            uint32_t c = u->cfree[--u->ncfree];
            uint8_t *copy = u->cbufs + (size_t)c * UR_BUFSZ;
            int raw = rc_pkt_raw_fd(t);
            size_t n = len;
            if (raw >= 0)
                n = rc_pkt_build(t, copy, payload, len, s->io[1 - L].port + k->rtcp, to);
            else
                memcpy(copy, payload, len);
            if (!queue_send(u, k, UR_NBUF + c, copy, n, to, raw))
                u->cfree[u->ncfree++] = c;
        } else {
            s->io[1 - L].send_errors++; /* more relays in flight than copies: dropped */
        }
    }
    if (!k->rtcp)
        rc_rtp_record(s, L, &p, src, now);
    return held;
}

void rc_uring_datagram(rc_thread_t *t, rc_sock_t *k, uint8_t *payload, size_t len, int trunc,
                       const struct sockaddr_in *src, int64_t now)
{
    datagram(t, k, -1, payload, len, trunc, src, now);
}

static void on_recv(rc_thread_t *t, const struct io_uring_cqe *cqe, int64_t now)
{
    struct rc_uring *u = t->ur;
    rc_sock_t *k = lookup(u, cqe->user_data);
    int bid = (cqe->flags & IORING_CQE_F_BUFFER) ? (int)(cqe->flags >> IORING_CQE_BUFFER_SHIFT) : -1;
    int held = 0;
    size_t hdr = sizeof(struct io_uring_recvmsg_out) + u->recv_mh.msg_namelen + u->recv_mh.msg_controllen;
    if (bid >= 0)
        t->ls.datagrams++;
    if (k && bid >= 0 && cqe->res >= (int)hdr) {
        uint8_t *buf = u->bufs + (size_t)bid * UR_BUFSZ, *payload = buf + hdr;
        const struct io_uring_recvmsg_out *o = (const void *)buf;
        size_t avail = (size_t)cqe->res - hdr, len = o->payloadlen;
        int trunc = (o->flags & MSG_TRUNC) || len > avail;
        if (len > avail)
            len = avail;
        held = datagram(t, k, bid, payload, len, trunc, (const struct sockaddr_in *)(o + 1), now);
    }
    if (bid >= 0 && !held)
        put_buf(u, (unsigned)bid);
    if (k && !(cqe->flags & IORING_CQE_F_MORE)) {
        /* the multishot receive ended: out of buffers, or an error reported on the socket (an ICMP
         * port unreachable for one of its sends); start another unless the socket itself is bad */
        if (cqe->res == -EBADF || cqe->res == -ENOTSOCK || cqe->res == -EINVAL || cqe->res == -EOPNOTSUPP) {
            k->s->rec.leg[k->leg].invalid++;
            return;
        }
        u->recv_rearms++;
        arm_recv_fd(u, k->fd, ud(UD_RECV, u->gens[k->slot], k->slot));
    }
}

static void on_send(struct rc_uring *u, const struct io_uring_cqe *cqe)
{
    unsigned bid = (uint32_t)cqe->user_data;
    ur_send_t *m;
    rc_sock_t *k;
    if (bid >= 2 * UR_NBUF || (bid >= UR_NBUF && !u->cbufs))
        return;
    m = &u->sends[bid];
    k = m->sock < u->nsocks && u->gens[m->sock] == m->gen ? u->socks[m->sock] : NULL;
    if (k) {
        rc_leg_io_t *io = &k->s->io[k->leg];
        if (cqe->res < 0)
            io->send_errors++;
        else if (k->rtcp)
            io->rtcp_relayed++;
        else
            io->relayed++;
    }
    if (bid >= UR_NBUF)
        u->cfree[u->ncfree++] = bid - UR_NBUF;
    else
        put_buf(u, bid);
}

static void arm_pkt(rc_thread_t *t)
{
    struct io_uring_sqe *sqe = get_sqe(t->ur);
    if (!sqe)
        return;
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = rc_pkt_fd(t);
    sqe->poll32_events = POLLIN;
    sqe->len = IORING_POLL_ADD_MULTI;
    sqe->user_data = ud(UD_PKT, 0, 0);
}

void rc_uring_loop(rc_thread_t *t)
{
    struct rc_uring *u = t->ur;
    int64_t next_tick = rc_mono_ns() + TICK_NS;
    arm_cmd(t);
    if (t->pk) {
        /* the ring's blocks become readable one at a time (full, or 1 ms old): one completion
         * each, and any completion or the tick is an occasion to read the ring */
        u->cbufs = malloc((size_t)UR_NBUF * UR_BUFSZ);
        u->cfree = malloc(UR_NBUF * sizeof *u->cfree);
        if (u->cbufs && u->cfree)
            for (unsigned i = 0; i < UR_NBUF; i++)
                u->cfree[u->ncfree++] = UR_NBUF - 1 - i;
        arm_pkt(t);
    }
    while (!t->stop) {
        int64_t now = rc_mono_ns(), t1;
        unsigned head, tail, n = 0;
        int cmds = 0;
        if (u->relays) {
            u->relays = 0;
            u->relayed_at = now;
        }
        if (next_tick > now)
            ur_submit(u, t->pk ? 1 : now - u->relayed_at < 20 * TICK_NS ? UR_WAIT_RELAY : UR_WAIT_RECORD,
                      next_tick - now);
        else
            ur_submit(u, 0, 0);
        t1 = rc_mono_ns();
        head = *u->cq_head;
        tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        while (head != tail) {
            const struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
            switch ((unsigned)(cqe->user_data >> 56)) {
            case UD_RECV:
                on_recv(t, cqe, t1);
                break;
            case UD_SEND:
                on_send(u, cqe);
                break;
            case UD_CMD:
                cmds = 1;
                if (!(cqe->flags & IORING_CQE_F_MORE))
                    arm_cmd(t);
                break;
            case UD_PKT:
                if (!(cqe->flags & IORING_CQE_F_MORE))
                    arm_pkt(t);
                break;
            default:
                if (cqe->flags & IORING_CQE_F_BUFFER)
                    put_buf(u, cqe->flags >> IORING_CQE_BUFFER_SHIFT);
                break;
            }
            head++;
            n++;
            if (head == tail) {
                __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
                tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
            }
        }
        __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
        if (t->pk) {
            n += rc_pkt_drain(t, t1);
            if ((t->ls.iterations & 1023) == 0)
                rc_pkt_stats(t);
        }
        if (cmds) {
            /* queued relays leave before a command can close (and reuse) their sockets' descriptors */
            ur_submit(u, 0, 0);
            rc_process_commands(t);
        }
        now = rc_mono_ns();
        t->ls.iterations++;
        t->ls.events += n;
        if (now - t1 > t->ls.max_io_ns)
            t->ls.max_io_ns = now - t1;
        rc_tick(t, now, &next_tick);
    }
    ur_submit(u, 0, 0);
}

/* ---- setup --------------------------------------------------------------------------------- */

void rc_uring_free(rc_thread_t *t)
{
    struct rc_uring *u = t->ur;
    if (!u)
        return;
    if (u->sqes && u->sqes != MAP_FAILED)
        munmap(u->sqes, u->sqes_sz);
    if (u->cq_ring && u->cq_ring != MAP_FAILED && u->cq_ring != u->sq_ring)
        munmap(u->cq_ring, u->cq_ring_sz);
    if (u->sq_ring && u->sq_ring != MAP_FAILED)
        munmap(u->sq_ring, u->sq_ring_sz);
    if (u->fd >= 0)
        close(u->fd);
    if (u->br && u->br != MAP_FAILED)
        munmap(u->br, u->br_sz);
    free(u->bufs);
    free(u->sends);
    free(u->cbufs);
    free(u->cfree);
    free(u->socks);
    free(u->gens);
    free(u->free_ids);
    free(u);
    t->ur = NULL;
}

/* ---- startup probes ------------------------------------------------------------------------ */

/* what the probes learn from their completions */
typedef struct {
    int recv_ok, recv_err;             /* the probe's receive: a datagram came (and the receive goes on) */
    size_t want_len;                   /* ... of this length */
    int sent;                          /* the send with an address: 1 done, -1 refused, 0 not yet */
} probe_t;

/* one round of a probe: submits, waits up to 10 ms for a completion, notes what came */
static void probe_round(struct rc_uring *u, probe_t *pr)
{
    unsigned head = *u->cq_head, tail;
    ur_submit(u, 1, 10000000);
    tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        const struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
        if (cqe->user_data == ud(UD_OTHER, 0, 1))
            pr->sent = cqe->res == (int)pr->want_len ? 1 : -1;
        if ((cqe->user_data >> 56) == UD_PROBE && !(cqe->flags & IORING_CQE_F_BUFFER) && cqe->res < 0)
            pr->recv_err = -cqe->res;
        if (cqe->flags & IORING_CQE_F_BUFFER) {
            unsigned bid = cqe->flags >> IORING_CQE_BUFFER_SHIFT;
            const struct io_uring_recvmsg_out *o = (const void *)(u->bufs + (size_t)bid * UR_BUFSZ);
            if ((cqe->user_data >> 56) == UD_PROBE && cqe->res > 0 && o->payloadlen == pr->want_len &&
                (cqe->flags & IORING_CQE_F_MORE))
                pr->recv_ok = 1;
            put_buf(u, bid);
        }
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
}

/* 1 if IORING_OP_SEND takes a destination address here (Linux 6.10+): a datagram from fd to
 * itself, received by the probe's multishot receive */
static int probe_send_to(struct rc_uring *u, int fd, const struct sockaddr_in *a)
{
    static const char msg[] = "probe-send";
    struct io_uring_sqe *sqe = get_sqe(u);
    probe_t pr = {0, 0, sizeof msg - 1, 0};
    if (!sqe)
        return 0;
    sqe->opcode = IORING_OP_SEND;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)msg;
    sqe->len = sizeof msg - 1;
    sqe->addr2 = (uint64_t)(uintptr_t)a;
    sqe->addr_len = (uint16_t)sizeof *a;
    sqe->msg_flags = MSG_DONTWAIT;
    sqe->user_data = ud(UD_OTHER, 0, 1);
    for (int round = 0; round < 20 && !(pr.sent && pr.recv_ok) && pr.sent >= 0; round++)
        probe_round(u, &pr);
    return pr.sent > 0 && pr.recv_ok;
}

/* a datagram to ourselves through a multishot receive: proves the features we rely on */
static int self_test(rc_thread_t *t)
{
    struct rc_uring *u = t->ur;
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    probe_t pr = {0, 0, 5, 0};
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || getsockname(fd, (struct sockaddr *)&a, &alen) < 0 ||
        arm_recv_fd(u, fd, ud(UD_PROBE, 0, 0)) < 0) {
        close(fd);
        return -1;
    }
    ur_submit(u, 0, 0);
    if (sendto(fd, "probe", 5, 0, (struct sockaddr *)&a, sizeof a) != 5) {
        close(fd);
        return -1;
    }
    for (int round = 0; round < 20 && !pr.recv_ok && !pr.recv_err; round++)
        probe_round(u, &pr);
    if (pr.recv_ok)
        u->send_to = probe_send_to(u, fd, &a);
    else if (pr.recv_err)
        snprintf(t->init_msg, sizeof t->init_msg, "multishot recvmsg: %s", strerror(pr.recv_err));
    cancel(u, ud(UD_PROBE, 0, 0));
    ur_submit(u, 0, 0);
    close(fd);
    if (!pr.recv_ok && !t->init_msg[0])
        snprintf(t->init_msg, sizeof t->init_msg, "no completion for a loopback datagram");
    return pr.recv_ok ? 0 : -1;
}

int rc_uring_init(rc_thread_t *t)
{
    struct io_uring_params p;
    struct io_uring_buf_reg reg;
    struct rc_uring *u = calloc(1, sizeof *u);
    if (!u) {
        snprintf(t->init_msg, sizeof t->init_msg, "out of memory");
        return -1;
    }
    u->fd = -1;
    t->ur = u;
    memset(&p, 0, sizeof p);
    p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL |
              IORING_SETUP_CQSIZE;
    p.cq_entries = UR_CQ;
    u->fd = (int)syscall(__NR_io_uring_setup, UR_SQ, &p);
    if (u->fd < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "io_uring_setup: %s", strerror(errno));
        goto fail;
    }
    u->sq_entries = p.sq_entries;
    u->sq_ring_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_ring_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (u->cq_ring_sz > u->sq_ring_sz)
            u->sq_ring_sz = u->cq_ring_sz;
        u->cq_ring_sz = u->sq_ring_sz;
    }
    u->sq_ring = mmap(NULL, u->sq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd,
                      IORING_OFF_SQ_RING);
    if (u->sq_ring == MAP_FAILED)
        goto fail_errno;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        u->cq_ring = u->sq_ring;
    else {
        u->cq_ring = mmap(NULL, u->cq_ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd,
                          IORING_OFF_CQ_RING);
        if (u->cq_ring == MAP_FAILED)
            goto fail_errno;
    }
    u->sqes_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, u->fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED)
        goto fail_errno;
    u->sq_head = (unsigned *)((char *)u->sq_ring + p.sq_off.head);
    u->sq_tail = (unsigned *)((char *)u->sq_ring + p.sq_off.tail);
    u->sq_mask = (unsigned *)((char *)u->sq_ring + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)((char *)u->sq_ring + p.sq_off.array);
    u->cq_head = (unsigned *)((char *)u->cq_ring + p.cq_off.head);
    u->cq_tail = (unsigned *)((char *)u->cq_ring + p.cq_off.tail);
    u->cq_mask = (unsigned *)((char *)u->cq_ring + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)((char *)u->cq_ring + p.cq_off.cqes);
    for (unsigned i = 0; i < p.sq_entries; i++)
        u->sq_array[i] = i;            /* SQE i is always at SQ slot i */
    u->tail = *u->sq_tail;

    u->br_sz = UR_NBUF * sizeof(struct io_uring_buf);
    u->br = mmap(NULL, u->br_sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    u->bufs = malloc((size_t)UR_NBUF * UR_BUFSZ);
    u->sends = calloc(2 * UR_NBUF, sizeof *u->sends);
    u->cap = 1024;
    u->socks = calloc(u->cap, sizeof *u->socks);
    u->gens = calloc(u->cap, sizeof *u->gens);
    u->free_ids = calloc(u->cap, sizeof *u->free_ids);
    if (u->br == MAP_FAILED || !u->bufs || !u->sends || !u->socks || !u->gens || !u->free_ids) {
        snprintf(t->init_msg, sizeof t->init_msg, "out of memory");
        goto fail;
    }
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)u->br;
    reg.ring_entries = UR_NBUF;
    reg.bgid = UR_BGID;
    if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_PBUF_RING, &reg, 1) < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "buffer ring: %s", strerror(errno));
        goto fail;
    }
    for (unsigned i = 0; i < UR_NBUF; i++)
        put_buf(u, i);
    {
        /* a sparse table of registered files, as large as the descriptor limit allows (the
         * kernel's bound): a send through a slot skips looking the descriptor up; sockets beyond
         * it, or a kernel without the table, send by descriptor */
        struct rlimit rl;
        struct io_uring_rsrc_register rr;
        memset(&rr, 0, sizeof rr);
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
            rr.nr = rl.rlim_cur > 65536 ? 65536 : (uint32_t)rl.rlim_cur;
            rr.flags = IORING_RSRC_REGISTER_SPARSE;
            if (syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_FILES2, &rr, sizeof rr) == 0)
                u->nfixed = rr.nr;
        }
    }
    memset(&u->recv_mh, 0, sizeof u->recv_mh);
    u->recv_mh.msg_namelen = sizeof(struct sockaddr_in);
    if (self_test(t) < 0)
        goto fail;
    return 0;
fail_errno:
    snprintf(t->init_msg, sizeof t->init_msg, "mmap: %s", strerror(errno));
fail:
    rc_uring_free(t);
    return -1;
}
