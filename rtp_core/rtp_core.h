/* rtp_core: shared declarations of the C media engine.
 *
 * codec.c     RTP header parsing (RFC 3550 section 5.1) and G.711 decode tables.
 * recorder.c  per-session recorder: sequence tracking, timeline placement, gap fill, mix, stats.
 *             Pure: it is fed packets with arrival times and emits PCM to a sink; no I/O, no clock.
 * engine.c    native threads: epoll + recvmmsg/sendmmsg over the legs' sockets, relay, WAV files,
 *             the command queue (Python -> engine) and the event queue (engine -> Python).
 * _core.c     the CPython bindings.
 */
#ifndef RTP_CORE_H
#define RTP_CORE_H

#include <stddef.h>
#include <stdint.h>

#define RC_RATE 8000                 /* samples per second of the recording timeline */
#define RC_NS_PER_SAMPLE 125000LL    /* 1e9 / RC_RATE */
#define RC_SEQWIN 512                /* sequence numbers remembered for duplicate detection */
#define RC_MAX_DROPOUT 3000          /* RFC 3550 A.1: a larger forward jump needs confirmation */
#define RC_JUMP 480                  /* 60 ms: timestamp vs. wall-clock drift that re-anchors a leg */
#define RC_HOLD 1600                 /* 200 ms: how long a drift must persist before re-anchoring */
#define RC_FAR 2400                  /* 300 ms: a packet this far ahead of its arrival re-anchors at once */
#define RC_RESTART_IDLE 8000         /* 1 s: after this long without packets a backward or far sequence
                                        jump is a sender that restarted its numbering, not duplicates */
#define RC_MAX_REORDER_MS 2000
#define RC_DTMF_MAX 255
#define RC_ABSENT INT16_MIN          /* ring value of a sample no packet wrote (G.711 never decodes to it) */

/* ---- codec.c ------------------------------------------------------------------------------ */
typedef struct {
    int marker, pt;
    uint16_t seq;
    uint32_t ts, ssrc;
    const uint8_t *payload;
    size_t payload_len;
    int csrc_count, extension, padding;
} rc_rtp_t;

/* Returns 0 and fills *out for a well-formed RTP version 2 packet, -1 otherwise. */
int rc_parse_rtp(const uint8_t *buf, size_t len, rc_rtp_t *out);
void rc_g711_init(void);
extern int16_t rc_ulaw_table[256];
extern int16_t rc_alaw_table[256];

/* ---- recorder.c --------------------------------------------------------------------------- */
enum { RC_PT_UNKNOWN = 0, RC_PT_PCMU, RC_PT_PCMA, RC_PT_CN, RC_PT_TE, RC_PT_OTHER };
enum { RC_EV_STARTED = 1, RC_EV_SSRC_CHANGE, RC_EV_DTMF, RC_EV_TIMEOUT };

typedef struct {
    int kind;
    int64_t session;
    int leg;
    uint32_t ssrc;
    char digit;
    int duration_ms;
    char ip[48];
    int port;
} rc_event_t;

typedef void (*rc_event_fn)(void *ctx, const rc_event_t *ev);
/* frames interleaved samples (channels per frame); returns 0 (errors are the sink's business) */
typedef void (*rc_sink_fn)(void *ctx, const int16_t *pcm, size_t frames, int channels);

typedef struct {
    /* stream identity */
    int started;            /* any valid RTP seen on this leg */
    int stream;             /* a stream (SSRC) is current */
    uint32_t ssrc;
    /* sequence numbers, extended (RFC 3550 A.1) */
    int64_t ext_max, base_ext;
    uint16_t max_seq;
    int bad_seq;            /* -1, or the seq that confirms a big jump */
    uint64_t seg_received;  /* unique packets in the current sequence segment */
    uint64_t seen[RC_SEQWIN / 64];
    uint32_t ts_last;       /* timestamp of the highest sequence number */
    int64_t last_arr;       /* timeline position of the newest accepted packet's arrival */
    int64_t ts_ext_last;
    /* timeline placement */
    int anchored;
    int64_t anchor_pos, anchor_ts;
    int drift;              /* -1 / +1 while the newest packets are > RC_JUMP early / late, else 0 */
    int64_t drift_since;
    /* RFC 3550 A.8 jitter, in timestamp units */
    int jit_init;
    int64_t last_transit;
    double jitter;
    /* RFC 4733 telephone-event in progress */
    int ev_active, ev_done, ev_code, ev_dur;
    uint32_t ev_ts;
    /* audio ring on the session timeline (NULL when not recording audio) */
    int16_t *ring;          /* RC_ABSENT where no packet wrote */
    int64_t max_end;
    int audio_seen;
    int64_t gap_start;
    /* counters */
    uint64_t packets, bytes, lost_acc, late, duplicates, reordered, invalid, undecoded, reanchors;
    uint64_t gap_total, gap_longest;
    int codec;              /* RC_PT_PCMU / RC_PT_PCMA of the last decoded packet, 0 if none */
    uint8_t ptmap[128];
    /* cold: only touched by DTMF */
    int dtmf_len;
    char dtmf[RC_DTMF_MAX + 1];
} rc_leg_t;


typedef struct {
    int channels;
    int audio;              /* 1: decode and emit PCM; 0: statistics only */
    int64_t reorder;        /* samples */
    int64_t ring_size;      /* power of two, samples */
    int started;
    int64_t t0_ns;
    int64_t emitted;        /* timeline position of the next sample to emit */
    int paused;
    int64_t pause_from, pause_to;
    rc_leg_t leg[2];
    int64_t session;
    rc_event_fn on_event;
    rc_sink_fn sink;
    void *ctx;
    int16_t *scratch;
} rc_rec_t;

#define RC_CHUNK 1024

int rc_rec_init(rc_rec_t *r, int channels, int reorder_ms, int audio);
void rc_rec_free(rc_rec_t *r);
void rc_rec_default_pts(rc_rec_t *r, int leg);
/* kind: RC_PT_* */
void rc_rec_set_pt(rc_rec_t *r, int leg, int pt, int kind);
/* a parsed, valid packet; ip may be NULL (only used for the "started" event) */
void rc_rec_packet(rc_rec_t *r, int leg, int64_t now_ns, const rc_rtp_t *p, const char *ip, int port);
void rc_rec_tick(rc_rec_t *r, int64_t now_ns);
/* a hint: the ring lines the next tick will read, `samples` of them (the writer's period) */
void rc_rec_prefetch_tick(const rc_rec_t *r, int64_t samples);
void rc_rec_flush(rc_rec_t *r, int64_t now_ns);
void rc_rec_set_recording(rc_rec_t *r, int enabled, int64_t now_ns);
uint64_t rc_leg_lost(const rc_leg_t *l);
const char *rc_codec_name(int kind);
int rc_codec_kind(const char *name);

#endif
