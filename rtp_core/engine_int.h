/* Internals shared by engine.c (threads, commands, sessions, the epoll loop) and uring.c (the
 * io_uring loop).  Not part of the extension's interface. */
#ifndef RTP_CORE_ENGINE_INT_H
#define RTP_CORE_ENGINE_INT_H

#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>

#include "engine.h"

#define BATCH 64
#define PKT_MAX 2048
#define TICK_NS 1000000LL              /* the writer wakes every 1 ms ... */
#define TICK_PHASES 50                 /* ... and serves 1/50 of the sessions: each one every 50 ms */
#define WBUF 16384                     /* per-session WAV write buffer */
#define EVQ_MAX 65536
#define RELATCH_NS 1000000000LL        /* strict source: a latched source silent this long may be replaced */
#define HOT_MAX 1024                   /* sockets whose last read filled a batch: read again soon */

typedef struct rc_session rc_session_t;

typedef struct {
    rc_session_t *s;
    int leg, rtcp, fd;
    uint32_t slot;                     /* io_uring: index in the thread's socket table ... */
    int fixed;                         /* ... and in the ring's registered files (sends skip fget) */
} rc_sock_t;

typedef struct {
    int added, port;
    rc_sock_t rtp, rtcp;
    struct sockaddr_in remote, rtcp_remote;
    int has_remote, has_rtcp_remote, latched, rtcp_latched;
    int64_t src_last;                  /* arrival of the last RTP packet accepted from the latched source */
    uint64_t relayed, rtcp_packets, rtcp_relayed, send_errors, foreign, relatches;
} rc_leg_io_t;

struct rc_session {
    int64_t id;
    int mode, channels, recording;
    int strict;                        /* strict source: after latching, other sources are dropped */
    rc_engine_t *eng;
    rc_rec_t rec;
    int fd, write_errno;
    uint8_t *wbuf;
    size_t wlen, wlimit;
    uint64_t data_bytes;
    rc_leg_io_t io[2];
    int64_t last_rx, timeout_ns;
    int timed_out;
};

typedef struct {
    rc_engine_t *eng;
    pthread_t tid;
    int started, stop, dead;
    int epfd, cmdfd;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    rc_cmd_t *head, *tail;
    rc_session_t **sessions;
    size_t nsess, cap;
    struct mmsghdr msgs[BATCH], out[BATCH];
    struct iovec iov[BATCH], oiov[BATCH];
    struct sockaddr_in addrs[BATCH];
    rc_rtp_t parsed[BATCH];
    int valid[BATCH];
    uint8_t bufs[BATCH][PKT_MAX];
    rc_loop_stats_t ls;
    rc_sock_t *hot[HOT_MAX];
    int nhot;
    struct rc_uring *ur;               /* NULL: the epoll loop */
    struct rc_pkt *pk;                 /* not NULL: the packet ring receives (io "packet") */
    int port_lo, port_hi, port_next;   /* this thread's share of the engine's ports */
    int init_done, init_err;
    char init_msg[160];
} rc_thread_t;

struct rc_engine {
    int nthreads;
    rc_thread_t *threads;
    struct in_addr bind_ip;
    int port_min, port_max;
    pthread_mutex_t ev_mu;
    rc_event_t *evq;
    size_t evn, evcap;
    uint64_t ev_dropped;
    int evfd;
    int stopped;
    int io_mode;                       /* RC_IO_* */
};

/* engine.c, for both loops */
void rc_process_commands(rc_thread_t *t);
void rc_tick(rc_thread_t *t, int64_t now, int64_t *next_tick);
/* an RTP datagram on leg L arriving at now: 1 if valid (counted, latched), with *p parsed; 0 if
 * counted invalid, or foreign (strict source: not from the latched source, which is still live) */
int rc_rtp_check(rc_session_t *s, int L, const uint8_t *buf, size_t len, int trunc,
                 const struct sockaddr_in *src, rc_rtp_t *p, int64_t now);
void rc_rtp_record(rc_session_t *s, int L, const rc_rtp_t *p, const struct sockaddr_in *src, int64_t now);
/* an RTCP datagram on leg L: 1 if valid (counted, latched); 0 if invalid or foreign */
int rc_rtcp_check(rc_session_t *s, int L, const uint8_t *buf, size_t len, int trunc,
                  const struct sockaddr_in *src);
/* where a datagram received on leg L goes, or NULL (record mode, no peer, no remote yet) */
struct sockaddr_in *rc_relay_to(rc_session_t *s, int L, int rtcp);

/* uring.c */
int rc_uring_init(rc_thread_t *t);     /* 0, or -1 with t->init_msg set */
void rc_uring_loop(rc_thread_t *t);
void rc_uring_free(rc_thread_t *t);
int rc_uring_add_sock(rc_thread_t *t, rc_sock_t *k);
void rc_uring_del_sock(rc_thread_t *t, rc_sock_t *k);
/* a datagram for socket k from the packet ring: checked, relayed (from a copy), recorded */
void rc_uring_datagram(rc_thread_t *t, rc_sock_t *k, uint8_t *payload, size_t len, int trunc,
                       const struct sockaddr_in *src, int64_t now);

/* packet.c */
int rc_pkt_init(rc_thread_t *t, int port_lo, int port_hi); /* 0, or -1 with t->init_msg set */
void rc_pkt_free(rc_thread_t *t);
int rc_pkt_fd(const rc_thread_t *t);
unsigned rc_pkt_drain(rc_thread_t *t, int64_t now);         /* the packets of every closed block */
void rc_pkt_stats(rc_thread_t *t);                          /* kernel drop counters into t->ls */
void rc_pkt_set_port(rc_thread_t *t, int port, rc_sock_t *k);
int rc_pkt_drop_all(int fd);                                /* a leg socket: the ring takes its datagrams */
int rc_pkt_raw_fd(const rc_thread_t *t);                    /* the raw socket relays go out of, or -1 */
size_t rc_pkt_build(rc_thread_t *t, uint8_t *out, const uint8_t *payload, size_t len, int sport,
                    const struct sockaddr_in *to);

#endif
