/* Engine threads: epoll + recvmmsg/sendmmsg over the legs' RTP and RTCP sockets, relay, recording
 * into WAV files, timeouts.  Everything a session owns is touched only by its engine thread; Python
 * reaches it through commands (rc_engine_call) and hears from it through the event queue. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "engine_int.h"

int64_t rc_mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double real_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- events -------------------------------------------------------------------------------- */

static void push_event(rc_engine_t *e, const rc_event_t *ev)
{
    pthread_mutex_lock(&e->ev_mu);
    if (e->evn == e->evcap) {
        size_t cap = e->evcap ? e->evcap * 2 : 64;
        rc_event_t *q = cap <= EVQ_MAX ? realloc(e->evq, cap * sizeof *q) : NULL;
        if (!q) {
            e->ev_dropped++;
            pthread_mutex_unlock(&e->ev_mu);
            return;
        }
        e->evq = q;
        e->evcap = cap;
    }
    e->evq[e->evn++] = *ev;
    if (e->evn == 1) {
        uint64_t one = 1;
        ssize_t w = write(e->evfd, &one, sizeof one);
        (void)w;
    }
    pthread_mutex_unlock(&e->ev_mu);
}

static void session_event(void *ctx, const rc_event_t *ev)
{
    rc_session_t *s = ctx;
    push_event(s->eng, ev);
}

size_t rc_engine_take_events(rc_engine_t *e, rc_event_t **out)
{
    size_t n;
    uint64_t v;
    pthread_mutex_lock(&e->ev_mu);
    n = e->evn;
    *out = NULL;
    if (n) {
        *out = malloc(n * sizeof **out);
        if (*out) {
            memcpy(*out, e->evq, n * sizeof **out);
            e->evn = 0;
        } else {
            n = 0;
        }
    }
    if (e->evn == 0) {
        ssize_t r = read(e->evfd, &v, sizeof v);
        (void)r;
    }
    pthread_mutex_unlock(&e->ev_mu);
    return n;
}

int rc_engine_event_fd(const rc_engine_t *e) { return e->evfd; }

void rc_engine_loop_stats(const rc_engine_t *e, int thread, rc_loop_stats_t *out)
{
    /* counters of a running thread, read without locking: diagnostics only */
    *out = e->threads[thread].ls;
    out->events_dropped = e->ev_dropped;
}
int rc_engine_nthreads(const rc_engine_t *e) { return e->nthreads; }

/* ---- WAV ----------------------------------------------------------------------------------- */

static void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static void put32(uint8_t *p, uint32_t v) { put16(p, v & 0xffff); put16(p + 2, v >> 16); }

static void wav_header(uint8_t h[44], int channels, uint32_t riff, uint32_t data)
{
    memcpy(h, "RIFF", 4);
    put32(h + 4, riff);
    memcpy(h + 8, "WAVEfmt ", 8);
    put32(h + 16, 16);
    put16(h + 20, 1);                            /* PCM */
    put16(h + 22, (uint32_t)channels);
    put32(h + 24, RC_RATE);
    put32(h + 28, RC_RATE * 2 * (uint32_t)channels);
    put16(h + 32, 2 * (uint32_t)channels);
    put16(h + 34, 16);
    memcpy(h + 36, "data", 4);
    put32(h + 40, data);
}

static void wav_flush(rc_session_t *s)
{
    size_t off = 0;
    while (off < s->wlen && s->fd >= 0 && !s->write_errno) {
        ssize_t w = write(s->fd, s->wbuf + off, s->wlen - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            s->write_errno = errno;
            break;
        }
        off += (size_t)w;
    }
    s->wlen = 0;
}

static void wav_sink(void *ctx, const int16_t *pcm, size_t frames, int channels)
{
    rc_session_t *s = ctx;
    size_t n = frames * (size_t)channels * 2;
    const uint8_t *src = (const uint8_t *)pcm;   /* s16le: this engine targets little-endian hosts */
    s->data_bytes += n;
    while (n) {
        size_t k = s->wlimit - s->wlen;
        if (k > n)
            k = n;
        memcpy(s->wbuf + s->wlen, src, k);
        s->wlen += k;
        src += k;
        n -= k;
        if (s->wlen >= s->wlimit)
            wav_flush(s);
    }
}

static void wav_finish(rc_session_t *s)
{
    uint8_t h[44];
    uint64_t data = s->data_bytes > 0xffffffffULL - 36 ? 0xffffffffULL - 36 : s->data_bytes;
    wav_flush(s);
    wav_header(h, s->channels, (uint32_t)(data + 36), (uint32_t)data);
    if (!s->write_errno && pwrite(s->fd, h, sizeof h, 0) != (ssize_t)sizeof h)
        s->write_errno = errno ? errno : EIO;
    if (close(s->fd) < 0 && !s->write_errno)
        s->write_errno = errno;
    s->fd = -1;
}

/* ---- sessions ------------------------------------------------------------------------------ */

static rc_session_t *find_session(rc_thread_t *t, int64_t id, size_t *where)
{
    for (size_t i = 0; i < t->nsess; i++)
        if (t->sessions[i]->id == id) {
            if (where)
                *where = i;
            return t->sessions[i];
        }
    return NULL;
}

static void close_leg_sockets(rc_thread_t *t, rc_leg_io_t *io)
{
    rc_sock_t *socks[2] = {&io->rtp, &io->rtcp};
    if (t->pk && io->rtp.fd >= 0) {
        rc_pkt_set_port(t, io->port, NULL);
        rc_pkt_set_port(t, io->port + 1, NULL);
    }
    if (t->ur)
        for (int i = 0; i < 2; i++)
            if (socks[i]->fd >= 0)
                rc_uring_del_sock(t, socks[i]);
    for (int i = 0; i < t->nhot;)
        if (t->hot[i] == socks[0] || t->hot[i] == socks[1])
            t->hot[i] = t->hot[--t->nhot];
        else
            i++;
    for (int i = 0; i < 2; i++)
        if (socks[i]->fd >= 0) {
            epoll_ctl(t->epfd, EPOLL_CTL_DEL, socks[i]->fd, NULL);
            close(socks[i]->fd);
            socks[i]->fd = -1;
        }
}

static void fill_stats(rc_session_t *s, rc_stats_t *st)
{
    memset(st, 0, sizeof *st);
    st->samples = s->rec.emitted;
    st->channels = s->channels;
    st->recording = s->recording;
    st->mode = s->mode;
    st->start = s->rec.started ? real_now() - (double)(rc_mono_ns() - s->rec.t0_ns) / 1e9 : -1.0;
    st->wav_bytes = s->recording ? 44 + s->data_bytes : 0;
    st->write_errno = s->write_errno;
    for (int i = 0; i < 2; i++) {
        rc_leg_stats_t *ls = &st->legs[i];
        rc_leg_io_t *io = &s->io[i];
        ls->added = io->added;
        ls->port = io->port;
        ls->has_remote = io->has_remote;
        if (io->has_remote) {
            inet_ntop(AF_INET, &io->remote.sin_addr, ls->remote_ip, sizeof ls->remote_ip);
            ls->remote_port = ntohs(io->remote.sin_port);
        }
        ls->relayed = io->relayed;
        ls->rtcp_packets = io->rtcp_packets;
        ls->rtcp_relayed = io->rtcp_relayed;
        ls->send_errors = io->send_errors;
        ls->foreign = io->foreign;
        ls->relatches = io->relatches;
        ls->rec = s->rec.leg[i];
        ls->rec.ring = NULL;
    }
}

static void free_session(rc_session_t *s)
{
    rc_rec_free(&s->rec);
    free(s->wbuf);
    free(s);
}

static void close_session(rc_thread_t *t, rc_session_t *s, rc_stats_t *st)
{
    size_t where;
    close_leg_sockets(t, &s->io[0]);
    close_leg_sockets(t, &s->io[1]);
    rc_rec_flush(&s->rec, rc_mono_ns());
    if (s->fd >= 0)
        wav_finish(s);
    if (st)
        fill_stats(s, st);
    if (find_session(t, s->id, &where))
        t->sessions[where] = t->sessions[--t->nsess];
    free_session(s);
}

static int cmd_open(rc_thread_t *t, rc_cmd_t *c)
{
    rc_session_t *s = calloc(1, sizeof *s);
    if (!s)
        return ENOMEM;
    s->id = c->session;
    s->mode = c->mode;
    s->channels = c->channels;
    s->strict = c->strict;
    s->recording = c->path != NULL;
    s->eng = t->eng;
    s->fd = -1;
    for (int i = 0; i < 2; i++) {
        s->io[i].rtp.fd = s->io[i].rtcp.fd = -1;
        s->io[i].rtp.s = s->io[i].rtcp.s = s;
        s->io[i].rtp.leg = s->io[i].rtcp.leg = i;
        s->io[i].rtcp.rtcp = 1;
    }
    if (rc_rec_init(&s->rec, c->channels, c->reorder_ms, s->recording) < 0) {
        free(s);
        return ENOMEM;
    }
    s->rec.session = s->id;
    s->rec.on_event = session_event;
    s->rec.sink = wav_sink;
    s->rec.ctx = s;
    s->timeout_ns = (int64_t)(c->timeout_s * 1e9);
    s->last_rx = rc_mono_ns();
    if (s->recording) {
        uint8_t h[44];
        s->wbuf = malloc(WBUF);
        /* flush points spread over 8-16 KiB so that sessions opened together do not all write in
         * the same tick */
        s->wlimit = WBUF / 2 + (size_t)(((uint64_t)s->id * 2654435761u) % (WBUF / 2));
        if (!s->wbuf) {
            free_session(s);
            return ENOMEM;
        }
        s->fd = open(c->path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (s->fd < 0) {
            int err = errno;
            snprintf(c->msg, sizeof c->msg, "cannot open %s: %s", c->path, strerror(err));
            free_session(s);
            return err;
        }
        /* placeholder sizes ("until end of file"); rewritten by close_session */
        wav_header(h, s->channels, 0xffffffffU, 0xffffffffU);
        if (write(s->fd, h, sizeof h) != (ssize_t)sizeof h) {
            int err = errno ? errno : EIO;
            snprintf(c->msg, sizeof c->msg, "cannot write %s: %s", c->path, strerror(err));
            close(s->fd);
            free_session(s);
            return err;
        }
    }
    if (t->nsess == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        rc_session_t **a = realloc(t->sessions, cap * sizeof *a);
        if (!a) {
            if (s->fd >= 0)
                close(s->fd);
            free_session(s);
            return ENOMEM;
        }
        t->sessions = a;
        t->cap = cap;
    }
    t->sessions[t->nsess++] = s;
    return 0;
}

static int udp_socket(struct in_addr ip, int port, int *err)
{
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        *err = errno;
        return -1;
    }
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr = ip;
    a.sin_port = htons((uint16_t)port);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        *err = errno;
        close(fd);
        return -1;
    }
    return fd;
}

static int cmd_add_leg(rc_thread_t *t, rc_session_t *s, rc_cmd_t *c)
{
    rc_engine_t *e = t->eng;
    rc_leg_io_t *io = &s->io[c->leg];
    int err = EADDRINUSE, pairs;
    if (io->added) {
        snprintf(c->msg, sizeof c->msg, "leg %d of session %lld already exists", c->leg, (long long)s->id);
        return RC_EVALUE;
    }
    pairs = (t->port_hi - t->port_lo + 1) / 2;
    for (int i = 0; i < pairs; i++) {
        int p = t->port_next, fa, fb;
        t->port_next += 2;
        if (t->port_next + 1 > t->port_hi)
            t->port_next = t->port_lo;
        fa = udp_socket(e->bind_ip, p, &err);
        if (fa < 0) {
            if (err == EADDRINUSE || err == EACCES)
                continue;
            break;
        }
        fb = udp_socket(e->bind_ip, p + 1, &err);
        if (fb < 0) {
            close(fa);
            if (err == EADDRINUSE || err == EACCES)
                continue;
            break;
        }
        io->rtp.fd = fa;
        io->rtcp.fd = fb;
        io->port = p;
        err = 0;
        break;
    }
    if (err) {
        snprintf(c->msg, sizeof c->msg, "no free RTP port pair in %d-%d: %s", t->port_lo, t->port_hi,
                 strerror(err));
        return err;
    }
    if (t->ur) {
        if (rc_uring_add_sock(t, &io->rtp) < 0 || rc_uring_add_sock(t, &io->rtcp) < 0)
            err = ENOMEM;
        else if (t->pk) {
            /* the ring takes this leg's datagrams; its sockets only hold the ports and send */
            if (rc_pkt_drop_all(io->rtp.fd) < 0 || rc_pkt_drop_all(io->rtcp.fd) < 0)
                err = errno;
            rc_pkt_set_port(t, io->port, &io->rtp);
            rc_pkt_set_port(t, io->port + 1, &io->rtcp);
        }
    } else {
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        /* edge-triggered: no re-poll of every ready socket on each epoll_wait; a read that fills a
         * whole batch puts the socket on the hot list instead */
        ev.events = EPOLLIN | EPOLLET;
        ev.data.ptr = &io->rtp;
        if (epoll_ctl(t->epfd, EPOLL_CTL_ADD, io->rtp.fd, &ev) < 0)
            err = errno;
        ev.data.ptr = &io->rtcp;
        if (!err && epoll_ctl(t->epfd, EPOLL_CTL_ADD, io->rtcp.fd, &ev) < 0)
            err = errno;
    }
    if (err) {
        close_leg_sockets(t, io);
        snprintf(c->msg, sizeof c->msg, "registering the sockets: %s", strerror(err));
        return err;
    }
    io->added = 1;
    c->result_port = io->port;
    return 0;
}

static void cmd_set_remote(rc_session_t *s, rc_cmd_t *c)
{
    rc_leg_io_t *io = &s->io[c->leg];
    io->latched = io->rtcp_latched = 0;
    if (c->ip == 0 || c->port == 0) {
        /* SDP placeholder (0.0.0.0 / port 9 or 0): wait for latching */
        io->has_remote = io->has_rtcp_remote = 0;
        return;
    }
    memset(&io->remote, 0, sizeof io->remote);
    io->remote.sin_family = AF_INET;
    io->remote.sin_addr.s_addr = c->ip;
    io->remote.sin_port = htons((uint16_t)c->port);
    io->rtcp_remote = io->remote;
    io->rtcp_remote.sin_port = htons((uint16_t)(c->port + 1));
    io->has_remote = io->has_rtcp_remote = 1;
}

static void run_command(rc_thread_t *t, rc_cmd_t *c)
{
    rc_session_t *s = NULL;
    c->err = 0;
    if (c->op == RC_CMD_STOP) {
        while (t->nsess)
            close_session(t, t->sessions[t->nsess - 1], NULL);
        t->stop = 1;
        return;
    }
    if (c->op == RC_CMD_OPEN) {
        c->err = cmd_open(t, c);
        return;
    }
    s = find_session(t, c->session, NULL);
    if (!s) {
        snprintf(c->msg, sizeof c->msg, "unknown session %lld", (long long)c->session);
        c->err = RC_EVALUE;
        return;
    }
    switch (c->op) {
    case RC_CMD_ADD_LEG:
        c->err = cmd_add_leg(t, s, c);
        break;
    case RC_CMD_SET_REMOTE:
        cmd_set_remote(s, c);
        break;
    case RC_CMD_SET_PTS:
        memcpy(s->rec.leg[c->leg].ptmap, c->ptmap, sizeof c->ptmap);
        break;
    case RC_CMD_SET_RECORDING:
        rc_rec_set_recording(&s->rec, c->enabled, rc_mono_ns());
        break;
    case RC_CMD_STATS:
        if (c->stats)
            fill_stats(s, c->stats);
        break;
    case RC_CMD_CLOSE:
        close_session(t, s, c->stats);
        break;
    default:
        c->err = RC_EVALUE;
        snprintf(c->msg, sizeof c->msg, "unknown command %d", c->op);
    }
}

void rc_process_commands(rc_thread_t *t)
{
    rc_cmd_t *c;
    uint64_t v;
    ssize_t r = read(t->cmdfd, &v, sizeof v);
    (void)r;
    pthread_mutex_lock(&t->mu);
    c = t->head;
    t->head = t->tail = NULL;
    pthread_mutex_unlock(&t->mu);
    while (c) {
        rc_cmd_t *next = c->next;
        run_command(t, c);
        pthread_mutex_lock(&t->mu);
        c->done = 1;       /* the caller may free c from here on */
        pthread_cond_broadcast(&t->cv);
        pthread_mutex_unlock(&t->mu);
        c = next;
    }
}

/* ---- packets ------------------------------------------------------------------------------- */

static void init_batches(rc_thread_t *t)
{
    memset(t->msgs, 0, sizeof t->msgs);
    memset(t->out, 0, sizeof t->out);
    for (int i = 0; i < BATCH; i++) {
        t->iov[i].iov_base = t->bufs[i];
        t->iov[i].iov_len = PKT_MAX;
        t->msgs[i].msg_hdr.msg_iov = &t->iov[i];
        t->msgs[i].msg_hdr.msg_iovlen = 1;
        t->msgs[i].msg_hdr.msg_name = &t->addrs[i];
        t->out[i].msg_hdr.msg_iov = &t->oiov[i];
        t->out[i].msg_hdr.msg_iovlen = 1;
        t->out[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
}

static int recv_batch(rc_thread_t *t, int fd)
{
    for (int i = 0; i < BATCH; i++)
        t->msgs[i].msg_hdr.msg_namelen = sizeof t->addrs[i];
    /* the raw system call: glibc's wrapper is a cancellation point, which costs on every call */
    return (int)syscall(SYS_recvmmsg, fd, t->msgs, BATCH, MSG_DONTWAIT, NULL);
}

static void send_batch(rc_thread_t *t, int fd, int n, uint64_t *sent, uint64_t *errors)
{
    int off = 0;
    while (off < n) {
        int r = (int)syscall(SYS_sendmmsg, fd, t->out + off, (unsigned)(n - off), MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* EAGAIN (socket buffer full) or an ICMP error reported on this socket: drop one, go on */
            (*errors)++;
            off++;
            continue;
        }
        off += r;
        *sent += (uint64_t)r;
    }
}

static void add_out(rc_thread_t *t, int k, int i, struct sockaddr_in *to)
{
    t->oiov[k].iov_base = t->bufs[i];
    t->oiov[k].iov_len = t->msgs[i].msg_len;
    t->out[k].msg_hdr.msg_name = to;
}

static void mark_hot(rc_thread_t *t, rc_sock_t *k, int n)
{
    if (n == BATCH) {
        for (int i = 0; i < t->nhot; i++)
            if (t->hot[i] == k)
                return;
        if (t->nhot < HOT_MAX)
            t->hot[t->nhot++] = k;
    }
}

int rc_rtp_check(rc_session_t *s, int L, const uint8_t *buf, size_t len, int trunc,
                 const struct sockaddr_in *src, rc_rtp_t *p, int64_t now)
{
    rc_leg_io_t *me = &s->io[L];
    if (trunc || rc_parse_rtp(buf, len, p) < 0) {
        s->rec.leg[L].invalid++;
        return 0;
    }
    if (!me->latched) {
        me->remote = *src;
        me->has_remote = me->latched = 1;
    } else if (src->sin_addr.s_addr != me->remote.sin_addr.s_addr || src->sin_port != me->remote.sin_port) {
        if (!s->strict)
            return 1;                  /* recorded and relayed, the remote stays */
        if (now - me->src_last < RELATCH_NS) {
            /* RTP injection: another source while the latched one is live */
            me->foreign++;
            return 0;
        }
        /* the latched source fell silent: NAT rebinding, or the phone moved to another port */
        me->remote = *src;
        me->relatches++;
    }
    me->src_last = now;
    return 1;
}

void rc_rtp_record(rc_session_t *s, int L, const rc_rtp_t *p, const struct sockaddr_in *src, int64_t now)
{
    char ip[48];
    const char *ipp = NULL;
    if (!s->rec.leg[L].started) {
        inet_ntop(AF_INET, &src->sin_addr, ip, sizeof ip);
        ipp = ip;
    }
    rc_rec_packet(&s->rec, L, now, p, ipp, ntohs(src->sin_port));
    s->last_rx = now;
    s->timed_out = 0;
}

int rc_rtcp_check(rc_session_t *s, int L, const uint8_t *buf, size_t len, int trunc,
                  const struct sockaddr_in *src)
{
    rc_leg_io_t *me = &s->io[L];
    /* RFC 3550 6.4: version 2, at least a header and an SSRC */
    if (trunc || len < 8 || (buf[0] >> 6) != 2) {
        s->rec.leg[L].invalid++;
        return 0;
    }
    if (!me->rtcp_latched) {
        me->rtcp_remote = *src;
        me->has_rtcp_remote = me->rtcp_latched = 1;
    } else if (s->strict && (src->sin_addr.s_addr != me->rtcp_remote.sin_addr.s_addr ||
                             src->sin_port != me->rtcp_remote.sin_port)) {
        /* RTCP is sparse (one report per ~5 s), so silence says nothing: it may move to another
         * port of the host the RTP is latched to, never to another host */
        if (!(me->latched && src->sin_addr.s_addr == me->remote.sin_addr.s_addr)) {
            me->foreign++;
            return 0;
        }
        me->rtcp_remote = *src;
    }
    me->rtcp_packets++;
    return 1;
}

struct sockaddr_in *rc_relay_to(rc_session_t *s, int L, int rtcp)
{
    rc_leg_io_t *peer = &s->io[1 - L];
    if (s->mode != RC_MODE_BRIDGE || !peer->added)
        return NULL;
    if (rtcp)
        return peer->has_rtcp_remote ? &peer->rtcp_remote : NULL;
    return peer->has_remote ? &peer->remote : NULL;
}

static void handle_rtp(rc_thread_t *t, rc_sock_t *k)
{
    rc_session_t *s = k->s;
    int L = k->leg, n, nout = 0;
    rc_leg_io_t *peer = &s->io[1 - L];
    struct sockaddr_in *to = rc_relay_to(s, L, 0);
    int64_t now;
    n = recv_batch(t, k->fd);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        mark_hot(t, k, BATCH);         /* an error reported once (ICMP): read the queue next time */
    if (n <= 0)
        return;
    mark_hot(t, k, n);
    t->ls.datagrams += (uint64_t)n;
    now = rc_mono_ns();
    for (int i = 0; i < n; i++) {
        t->valid[i] = rc_rtp_check(s, L, t->bufs[i], t->msgs[i].msg_len, t->msgs[i].msg_hdr.msg_flags & MSG_TRUNC,
                                   &t->addrs[i], &t->parsed[i], now);
        if (t->valid[i] && to)
            add_out(t, nout++, i, to);
    }
    /* relay first, then record */
    if (nout)
        send_batch(t, peer->rtp.fd, nout, &peer->relayed, &peer->send_errors);
    for (int i = 0; i < n; i++)
        if (t->valid[i])
            rc_rtp_record(s, L, &t->parsed[i], &t->addrs[i], now);
}

static void handle_rtcp(rc_thread_t *t, rc_sock_t *k)
{
    rc_session_t *s = k->s;
    int L = k->leg, n, nout = 0;
    rc_leg_io_t *peer = &s->io[1 - L];
    struct sockaddr_in *to = rc_relay_to(s, L, 1);
    n = recv_batch(t, k->fd);
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
        mark_hot(t, k, BATCH);
    mark_hot(t, k, n);
    if (n > 0)
        t->ls.datagrams += (uint64_t)n;
    for (int i = 0; i < n; i++)
        if (rc_rtcp_check(s, L, t->bufs[i], t->msgs[i].msg_len, t->msgs[i].msg_hdr.msg_flags & MSG_TRUNC,
                          &t->addrs[i]) && to)
            add_out(t, nout++, i, to);
    if (nout)
        send_batch(t, peer->rtcp.fd, nout, &peer->rtcp_relayed, &peer->send_errors);
}

static void rc_thread_finish(rc_thread_t *t);

static void tick_all(rc_thread_t *t, int64_t now)
{
    /* spreading the sessions over the phases keeps each pass short, so relayed packets never wait
     * behind the writer of every session at once */
    size_t phase = (size_t)(t->ls.ticks % TICK_PHASES);
    for (size_t i = phase; i < t->nsess; i += TICK_PHASES) {
        rc_session_t *s = t->sessions[i];
        /* two sessions ahead: their state; one ahead: the ring samples it will emit (with thousands
         * of sessions both have left the cache since their last packet) */
        if (i + 2 * TICK_PHASES < t->nsess)
            __builtin_prefetch(&t->sessions[i + 2 * TICK_PHASES]->rec, 0, 3);
        if (i + TICK_PHASES < t->nsess && t->sessions[i + TICK_PHASES]->recording)
            rc_rec_prefetch_tick(&t->sessions[i + TICK_PHASES]->rec, TICK_PHASES * TICK_NS / RC_NS_PER_SAMPLE);
        if (s->recording)
            rc_rec_tick(&s->rec, now);
        if (!s->timed_out && s->timeout_ns > 0 && now - s->last_rx >= s->timeout_ns) {
            rc_event_t ev;
            memset(&ev, 0, sizeof ev);
            ev.kind = RC_EV_TIMEOUT;
            ev.session = s->id;
            ev.leg = -1;
            s->timed_out = 1;
            push_event(t->eng, &ev);
        }
    }
}

static void thread_init_done(rc_thread_t *t, int err)
{
    pthread_mutex_lock(&t->mu);
    t->init_err = err;
    t->init_done = 1;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static void *thread_main(void *arg)
{
    rc_thread_t *t = arg;
    struct epoll_event evs[256];
    int64_t next_tick = rc_mono_ns() + TICK_NS;
    if (t->eng->io_mode != RC_IO_EPOLL) {
        if (rc_uring_init(t) == 0) {
            if ((t->eng->io_mode == RC_IO_PACKET || t->eng->io_mode == RC_IO_AUTO) &&
                rc_pkt_init(t, t->port_lo, t->port_hi) < 0) {
                if (t->eng->io_mode == RC_IO_PACKET) {
                    rc_uring_free(t);
                    thread_init_done(t, 1);
                    rc_thread_finish(t);
                    return NULL;
                }
                t->init_msg[0] = 0;    /* auto: the io_uring loop with the legs' sockets */
            }
            thread_init_done(t, 0);
            rc_uring_loop(t);
            rc_thread_finish(t);
            return NULL;
        }
        if (t->eng->io_mode == RC_IO_URING || t->eng->io_mode == RC_IO_PACKET) {
            thread_init_done(t, 1);
            rc_thread_finish(t);
            return NULL;
        }
    }
    thread_init_done(t, 0);
    init_batches(t);
    while (!t->stop) {
        int64_t now = rc_mono_ns(), t1;
        int timeout = next_tick > now && !t->nhot ? (int)((next_tick - now + 999999) / 1000000) : 0;
        int n = epoll_wait(t->epfd, evs, 256, timeout), cmds = 0, nhot = t->nhot;
        t1 = rc_mono_ns();
        if (nhot) {
            rc_sock_t *hot[HOT_MAX];
            memcpy(hot, t->hot, sizeof hot[0] * (size_t)nhot);
            t->nhot = 0;
            for (int i = 0; i < nhot; i++) {
                if (hot[i]->rtcp)
                    handle_rtcp(t, hot[i]);
                else
                    handle_rtp(t, hot[i]);
            }
        }
        for (int i = 0; i < n; i++) {
            rc_sock_t *k = evs[i].data.ptr;
            if (!k)
                cmds = 1;
            else if (k->rtcp)
                handle_rtcp(t, k);
            else
                handle_rtp(t, k);
        }
        /* after the socket events: a command may close sessions those events point to */
        if (cmds)
            rc_process_commands(t);
        now = rc_mono_ns();
        t->ls.iterations++;
        t->ls.events += (uint64_t)(n > 0 ? n : 0);
        if (now - t1 > t->ls.max_io_ns)
            t->ls.max_io_ns = now - t1;
        rc_tick(t, now, &next_tick);
    }
    rc_thread_finish(t);
    return NULL;
}

/* the writer's 1 ms tick, when due */
void rc_tick(rc_thread_t *t, int64_t now, int64_t *next_tick)
{
    struct timespec c0, c1;
    int64_t cpu, t2;
    /* the thread's CPU clock is a real system call (no vDSO): sampled on 1 tick in 64 */
    int sample = (t->ls.ticks & 63) == 0;
    if (now < *next_tick)
        return;
    if (sample)
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
    tick_all(t, now);
    if (sample) {
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
        cpu = (c1.tv_sec - c0.tv_sec) * 1000000000LL + (c1.tv_nsec - c0.tv_nsec);
        if (cpu > t->ls.max_tick_cpu_ns)
            t->ls.max_tick_cpu_ns = cpu;
    }
    t2 = rc_mono_ns();
    t->ls.ticks++;
    t->ls.tick_ns += (uint64_t)(t2 - now);
    if (t2 - now > t->ls.max_tick_ns)
        t->ls.max_tick_ns = t2 - now;
    if (now - *next_tick > t->ls.max_tick_late_ns)
        t->ls.max_tick_late_ns = now - *next_tick;
    *next_tick += TICK_NS;
    if (*next_tick <= now)
        *next_tick = now + TICK_NS;
}

static void rc_thread_finish(rc_thread_t *t)
{
    /* answer whatever was queued after STOP: those callers must not wait forever */
    pthread_mutex_lock(&t->mu);
    t->dead = 1;
    for (rc_cmd_t *c = t->head, *next; c; c = next) {
        next = c->next;
        snprintf(c->msg, sizeof c->msg, "the engine is closed");
        c->err = RC_EVALUE;
        c->done = 1;
    }
    t->head = t->tail = NULL;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

/* ---- engine -------------------------------------------------------------------------------- */

int rc_engine_call(rc_engine_t *e, rc_cmd_t *c)
{
    rc_thread_t *t = &e->threads[(uint64_t)c->session % (uint64_t)e->nthreads];
    uint64_t one = 1;
    ssize_t w;
    c->done = 0;
    c->err = 0;
    c->msg[0] = 0;
    c->next = NULL;
    pthread_mutex_lock(&t->mu);
    if (t->dead || !t->started) {
        pthread_mutex_unlock(&t->mu);
        snprintf(c->msg, sizeof c->msg, "the engine is closed");
        return c->err = RC_EVALUE;
    }
    if (t->tail)
        t->tail->next = c;
    else
        t->head = c;
    t->tail = c;
    pthread_mutex_unlock(&t->mu);
    w = write(t->cmdfd, &one, sizeof one);
    (void)w;
    pthread_mutex_lock(&t->mu);
    while (!c->done)
        pthread_cond_wait(&t->cv, &t->mu);
    pthread_mutex_unlock(&t->mu);
    return c->err;
}

rc_engine_t *rc_engine_new(const char *bind_ip, int port_min, int port_max, int threads, int io_mode,
                           char *err, size_t errlen, int *err_no)
{
    rc_engine_t *e = calloc(1, sizeof *e);
    *err_no = 0;
    if (!e) {
        *err_no = ENOMEM;
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    e->evfd = -1;
    if (inet_pton(AF_INET, bind_ip, &e->bind_ip) != 1) {
        snprintf(err, errlen, "bind_ip must be an IPv4 address, not %.60s", bind_ip);
        free(e);
        return NULL;
    }
    e->io_mode = io_mode;
    e->port_min = port_min + (port_min & 1);
    e->port_max = port_max;
    if ((e->port_max - e->port_min + 1) / 2 < threads) {
        snprintf(err, errlen, "port range %d-%d holds fewer port pairs than the %d threads", port_min, port_max,
                 threads);
        free(e);
        return NULL;
    }
    pthread_mutex_init(&e->ev_mu, NULL);
    e->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->nthreads = threads;
    e->threads = calloc((size_t)threads, sizeof *e->threads);
    if (e->evfd < 0 || !e->threads) {
        *err_no = e->evfd < 0 ? errno : ENOMEM;
        snprintf(err, errlen, "engine setup: %s", strerror(*err_no));
        rc_engine_free(e);
        return NULL;
    }
    for (int i = 0; i < threads; i++) {
        rc_thread_t *t = &e->threads[i];
        struct epoll_event ev;
        /* each thread allocates from its own share of the range (even-sized), so that the packet
         * ring of a thread can take exactly its legs' ports */
        int share = ((e->port_max - e->port_min + 1) / threads) & ~1;
        t->eng = e;
        t->port_lo = t->port_next = e->port_min + i * share;
        t->port_hi = i == threads - 1 ? e->port_max : t->port_lo + share - 1;
        pthread_mutex_init(&t->mu, NULL);
        pthread_cond_init(&t->cv, NULL);
        t->epfd = epoll_create1(EPOLL_CLOEXEC);
        t->cmdfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN;
        ev.data.ptr = NULL;
        if (t->epfd < 0 || t->cmdfd < 0 || epoll_ctl(t->epfd, EPOLL_CTL_ADD, t->cmdfd, &ev) < 0 ||
            pthread_create(&t->tid, NULL, thread_main, t) != 0) {
            *err_no = errno ? errno : EAGAIN;
            snprintf(err, errlen, "engine thread setup: %s", strerror(*err_no));
            rc_engine_stop(e);
            rc_engine_free(e);
            return NULL;
        }
        t->started = 1;
        pthread_mutex_lock(&t->mu);
        while (!t->init_done)
            pthread_cond_wait(&t->cv, &t->mu);
        pthread_mutex_unlock(&t->mu);
        if (t->init_err) {
            *err_no = ENOSYS;
            snprintf(err, errlen, "io '%s' is not usable here: %s",
                     e->io_mode == RC_IO_PACKET ? "packet" : "io_uring", t->init_msg);
            rc_engine_stop(e);
            rc_engine_free(e);
            return NULL;
        }
    }
    return e;
}

const char *rc_engine_io_name(const rc_engine_t *e)
{
    if (e->nthreads && e->threads[0].pk)
        return "packet";
    return e->nthreads && e->threads[0].ur ? "io_uring" : "epoll";
}

void rc_engine_stop(rc_engine_t *e)
{
    if (e->stopped)
        return;
    e->stopped = 1;
    for (int i = 0; i < e->nthreads; i++) {
        rc_thread_t *t = &e->threads[i];
        rc_cmd_t c;
        if (!t->started)
            continue;
        memset(&c, 0, sizeof c);
        c.op = RC_CMD_STOP;
        c.session = i;
        rc_engine_call(e, &c);
        pthread_join(t->tid, NULL);
    }
}

void rc_engine_free(rc_engine_t *e)
{
    if (!e)
        return;
    rc_engine_stop(e);
    for (int i = 0; e->threads && i < e->nthreads; i++) {
        rc_thread_t *t = &e->threads[i];
        if (t->epfd > 0)
            close(t->epfd);
        if (t->cmdfd > 0)
            close(t->cmdfd);
        free(t->sessions);
        if (t->pk)
            rc_pkt_free(t);
        if (t->ur)
            rc_uring_free(t);
        pthread_mutex_destroy(&t->mu);
        pthread_cond_destroy(&t->cv);
    }
    free(e->threads);
    if (e->evfd >= 0)
        close(e->evfd);
    free(e->evq);
    free(e);
}
