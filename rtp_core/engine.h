/* The engine: native threads that own the legs' sockets, relay, record, and talk to Python through
 * a command queue (synchronous calls, the caller waits without the GIL) and an event queue whose
 * eventfd is readable while events are pending. */
#ifndef RTP_CORE_ENGINE_H
#define RTP_CORE_ENGINE_H

#include "rtp_core.h"

#define RC_EVALUE (-1)   /* cmd->err: bad argument (ValueError); > 0 is an errno (OSError) */

enum { RC_MODE_BRIDGE = 0, RC_MODE_RECORD = 1 };
enum { RC_IO_AUTO = 0, RC_IO_EPOLL, RC_IO_URING, RC_IO_PACKET };
enum {
    RC_CMD_OPEN = 1, RC_CMD_ADD_LEG, RC_CMD_SET_REMOTE, RC_CMD_SET_PTS, RC_CMD_SET_RECORDING,
    RC_CMD_STATS, RC_CMD_CLOSE, RC_CMD_STOP
};

typedef struct {
    int added, port;
    int has_remote;
    char remote_ip[48];
    int remote_port;
    uint64_t relayed, rtcp_packets, rtcp_relayed, send_errors, foreign, relatches;
    rc_leg_t rec;              /* a copy of the recorder's leg (its ring pointers cleared) */
} rc_leg_stats_t;

typedef struct {
    int64_t samples;
    int channels, recording, mode;
    double start;              /* UNIX time of sample 0, or -1 before the first packet */
    uint64_t wav_bytes;
    int write_errno;
    rc_leg_stats_t legs[2];
} rc_stats_t;

typedef struct rc_cmd {
    int op;
    int64_t session;
    int leg;
    const char *path;          /* OPEN: NULL = relay only */
    int channels, mode, reorder_ms;
    int strict;                /* OPEN: strict source */
    double timeout_s;
    uint32_t ip;               /* SET_REMOTE: network order; 0 with port 0 = no remote */
    int port;
    uint8_t ptmap[128];        /* SET_PTS */
    int enabled;               /* SET_RECORDING */
    /* results */
    int done, err;
    char msg[200];
    int result_port;
    rc_stats_t *stats;         /* STATS / CLOSE: filled if not NULL */
    struct rc_cmd *next;
} rc_cmd_t;

typedef struct rc_engine rc_engine_t;

typedef struct {
    uint64_t iterations, events, ticks, tick_ns, events_dropped;
    uint64_t datagrams;                /* received for the legs (RTP and RTCP, any content) */
    uint64_t ring_drops;               /* io "packet": packets the kernel dropped, the ring being full */
    uint64_t ring_rejected;            /* io "packet": bad IPv4 header or UDP length / checksum */
    int64_t max_io_ns, max_tick_ns, max_tick_late_ns, max_tick_cpu_ns;
} rc_loop_stats_t;

void rc_engine_loop_stats(const rc_engine_t *e, int thread, rc_loop_stats_t *out);

/* io_mode RC_IO_AUTO: the packet ring when it is allowed (CAP_NET_RAW) and works, else io_uring when
 * the kernel allows it (checked), else epoll */
rc_engine_t *rc_engine_new(const char *bind_ip, int port_min, int port_max, int threads, int io_mode,
                           char *err, size_t errlen, int *err_no);
const char *rc_engine_io_name(const rc_engine_t *e);
/* the packet ring's check of an IPv4 datagram (cap bytes captured): 1 with *udp / *ulen set if it is
 * a whole, valid UDP datagram (header checksum, lengths, and the UDP checksum unless csum_known),
 * -1 if only the UDP checksum is wrong, 0 otherwise */
int rc_pkt_parse_ipv4(const uint8_t *ip, size_t cap, int csum_known, const uint8_t **udp, size_t *ulen);
int rc_engine_nthreads(const rc_engine_t *e);
int rc_engine_call(rc_engine_t *e, rc_cmd_t *cmd);
int rc_engine_event_fd(const rc_engine_t *e);
/* moves the pending events to *out (malloc'd, caller frees); returns their count */
size_t rc_engine_take_events(rc_engine_t *e, rc_event_t **out);
/* closes every session (finalising files) and joins the threads; idempotent */
void rc_engine_stop(rc_engine_t *e);
void rc_engine_free(rc_engine_t *e);
int64_t rc_mono_ns(void);

#endif
