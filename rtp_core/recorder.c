/* The recorder of one session: two legs placed on one wall-clock timeline.
 *
 * Each leg keeps RFC 3550 A.1 style extended sequence numbers (duplicates, late and reordered packets,
 * loss), RFC 3550 A.8 interarrival jitter, RFC 4733 telephone-events, and a ring of decoded samples
 * indexed by the session timeline (8 kHz samples since the session's first RTP packet).  A packet's
 * audio goes to  anchor_pos + (timestamp - anchor_ts),  where the anchor is the arrival time and
 * timestamp of the leg's first audio packet; the anchor moves to the current packet when the newest
 * packets keep arriving more than 60 ms off their place (earlier or later) for 200 ms of wall-clock
 * time (clock drift, a timestamp jump, a delayed first packet), or at once when a packet would land
 * more than 300 ms ahead of its arrival (timestamps jumped forward).  A burst after a network stall
 * (arrival times bunched, timestamps spread) moves nothing: what is too old is late, the rest fits.  The ring is the reorder buffer: a sample is emitted once it is older
 * than now - reorder window, so packets may arrive in any order within the window; anything not
 * written by then is silence.  Both legs share the emit position, so the channels stay aligned.
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "rtp_core.h"

static const char *const kind_names[] = {NULL, "PCMU", "PCMA", "CN", "telephone-event", NULL};

const char *rc_codec_name(int kind)
{
    return (kind > 0 && kind < (int)(sizeof kind_names / sizeof kind_names[0])) ? kind_names[kind] : NULL;
}

int rc_codec_kind(const char *name)
{
    for (int k = RC_PT_PCMU; k <= RC_PT_TE; k++)
        if (strcasecmp(name, kind_names[k]) == 0)
            return k;
    return RC_PT_OTHER;
}

static int64_t floor_div(int64_t a, int64_t b)
{
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0)))
        q--;
    return q;
}

static int64_t pos_of(const rc_rec_t *r, int64_t now_ns)
{
    return floor_div(now_ns - r->t0_ns, RC_NS_PER_SAMPLE);
}

void rc_rec_default_pts(rc_rec_t *r, int leg)
{
    rc_leg_t *L = &r->leg[leg];
    memset(L->ptmap, RC_PT_UNKNOWN, sizeof L->ptmap);
    L->ptmap[0] = RC_PT_PCMU;
    L->ptmap[8] = RC_PT_PCMA;
    L->ptmap[13] = RC_PT_CN;
    L->ptmap[101] = RC_PT_TE;
}

void rc_rec_set_pt(rc_rec_t *r, int leg, int pt, int kind)
{
    if (leg >= 0 && leg < 2 && pt >= 0 && pt < 128)
        r->leg[leg].ptmap[pt] = (uint8_t)kind;
}

int rc_rec_init(rc_rec_t *r, int channels, int reorder_ms, int audio)
{
    memset(r, 0, sizeof *r);
    r->channels = channels;
    r->audio = audio;
    r->reorder = (int64_t)reorder_ms * RC_RATE / 1000;
    r->ring_size = 64;
    /* room for the reorder window plus 512 ms of packets placed ahead of the emit position */
    while (r->ring_size < r->reorder + 4096)
        r->ring_size <<= 1;
    for (int i = 0; i < 2; i++) {
        rc_leg_t *L = &r->leg[i];
        L->bad_seq = -1;
        L->gap_start = -1;
        rc_rec_default_pts(r, i);
        if (audio) {
            L->ring = malloc((size_t)r->ring_size * sizeof(int16_t));
            if (!L->ring) {
                rc_rec_free(r);
                return -1;
            }
            for (int64_t j = 0; j < r->ring_size; j++)
                L->ring[j] = RC_ABSENT;
        }
    }
    if (audio) {
        r->scratch = malloc(sizeof(int16_t) * 2 * RC_CHUNK);
        if (!r->scratch) {
            rc_rec_free(r);
            return -1;
        }
    }
    return 0;
}

void rc_rec_free(rc_rec_t *r)
{
    for (int i = 0; i < 2; i++) {
        free(r->leg[i].ring);
        r->leg[i].ring = NULL;
    }
    free(r->scratch);
    r->scratch = NULL;
}

static void emit_event(rc_rec_t *r, rc_event_t *ev)
{
    ev->session = r->session;
    if (r->on_event)
        r->on_event(r->ctx, ev);
}

/* ---- sequence numbers ---------------------------------------------------------------------- */

static uint64_t seg_lost(const rc_leg_t *L)
{
    int64_t expected;
    if (!L->stream || L->seg_received == 0)
        return 0;
    expected = L->ext_max - L->base_ext + 1;
    return expected > (int64_t)L->seg_received ? (uint64_t)expected - L->seg_received : 0;
}

uint64_t rc_leg_lost(const rc_leg_t *L)
{
    return L->lost_acc + seg_lost(L);
}

static void start_segment(rc_leg_t *L, uint16_t seq)
{
    L->lost_acc += seg_lost(L);
    L->ext_max = L->base_ext = seq;
    L->max_seq = seq;
    L->seg_received = 0;
    L->bad_seq = -1;
    memset(L->seen, 0, sizeof L->seen);
}

static int seen_bit(const rc_leg_t *L, int64_t ext)
{
    uint64_t i = (uint64_t)ext & (RC_SEQWIN - 1);
    return (int)((L->seen[i >> 6] >> (i & 63)) & 1);
}

static void set_seen(rc_leg_t *L, int64_t ext, int on)
{
    uint64_t i = (uint64_t)ext & (RC_SEQWIN - 1);
    if (on)
        L->seen[i >> 6] |= 1ULL << (i & 63);
    else
        L->seen[i >> 6] &= ~(1ULL << (i & 63));
}

/* ---- RFC 4733 telephone-events ------------------------------------------------------------- */

static const char dtmf_chars[] = "0123456789*#ABCD!";

static void dtmf_report(rc_rec_t *r, int li)
{
    rc_leg_t *L = &r->leg[li];
    rc_event_t ev;
    L->ev_done = 1;
    if (L->ev_code < 0 || L->ev_code > 16)
        return;                      /* not a DTMF digit (RFC 4733 section 3.2 tones) */
    if (L->dtmf_len < RC_DTMF_MAX)
        L->dtmf[L->dtmf_len++] = dtmf_chars[L->ev_code];
    memset(&ev, 0, sizeof ev);
    ev.kind = RC_EV_DTMF;
    ev.leg = li;
    ev.ssrc = L->ssrc;
    ev.digit = dtmf_chars[L->ev_code];
    ev.duration_ms = L->ev_dur / 8;
    emit_event(r, &ev);
}

static void dtmf_packet(rc_rec_t *r, int li, const rc_rtp_t *p)
{
    rc_leg_t *L = &r->leg[li];
    int code, end, dur;
    if (p->payload_len < 4) {
        L->undecoded++;
        return;
    }
    code = p->payload[0];
    end = p->payload[1] >> 7;
    dur = (p->payload[2] << 8) | p->payload[3];
    if (L->ev_active && p->ts == L->ev_ts) {
        if (!L->ev_done) {
            if (dur > L->ev_dur)
                L->ev_dur = dur;
            if (end)
                dtmf_report(r, li);
        }
        return;
    }
    if (L->ev_active && (int32_t)(p->ts - L->ev_ts) < 0)
        return;                      /* a straggler of an earlier event */
    if (L->ev_active && !L->ev_done)
        dtmf_report(r, li);          /* its end packets were lost */
    L->ev_active = 1;
    L->ev_done = 0;
    L->ev_ts = p->ts;
    L->ev_code = code;
    L->ev_dur = dur;
    if (end)
        dtmf_report(r, li);
}

/* ---- packets ------------------------------------------------------------------------------- */

static void new_stream(rc_rec_t *r, int li, const rc_rtp_t *p)
{
    rc_leg_t *L = &r->leg[li];
    if (L->stream) {
        if (L->ev_active && !L->ev_done)
            dtmf_report(r, li);
        L->lost_acc += seg_lost(L);
    }
    L->stream = 1;
    L->ssrc = p->ssrc;
    L->seg_received = 0;
    L->ext_max = L->base_ext = p->seq;
    L->max_seq = p->seq;
    L->bad_seq = -1;
    memset(L->seen, 0, sizeof L->seen);
    L->ts_last = p->ts;
    L->ts_ext_last = p->ts;
    L->anchored = 0;
    L->drift = 0;
    L->jit_init = 0;
    L->ev_active = 0;
}

static void place(rc_rec_t *r, rc_leg_t *L, int kind, int64_t pos, const rc_rtp_t *p)
{
    const int16_t *table = kind == RC_PT_PCMU ? rc_ulaw_table : rc_alaw_table;
    const uint8_t *src = p->payload;
    int64_t start = pos, end = pos + (int64_t)p->payload_len, rmask = r->ring_size - 1;
    if (start < r->emitted) {
        src += r->emitted - start;
        start = r->emitted;
    }
    if (end > r->emitted + r->ring_size)
        end = r->emitted + r->ring_size;
    if (end <= start) {
        L->late++;
        return;
    }
    /* at most two contiguous pieces of the ring */
    while (start < end) {
        int64_t i = start & rmask, cnt = end - start;
        int16_t *dst = L->ring + i;
        if (cnt > r->ring_size - i)
            cnt = r->ring_size - i;
        for (int64_t j = 0; j < cnt; j++)
            dst[j] = table[src[j]];   /* G.711 never decodes to RC_ABSENT */
        src += cnt;
        start += cnt;
    }
    if (end > L->max_end)
        L->max_end = end;
}

void rc_rec_packet(rc_rec_t *r, int li, int64_t now_ns, const rc_rtp_t *p, const char *ip, int port)
{
    rc_leg_t *L = &r->leg[li];
    int kind = L->ptmap[p->pt], newest = 0, restart = 0;
    int64_t arr, ext, ts_ext;

    L->packets++;
    L->bytes += p->payload_len;
    if (!r->started) {
        r->started = 1;
        r->t0_ns = now_ns;
    }
    arr = pos_of(r, now_ns);
    if (!L->started) {
        rc_event_t ev;
        memset(&ev, 0, sizeof ev);
        L->started = 1;
        ev.kind = RC_EV_STARTED;
        ev.leg = li;
        ev.ssrc = p->ssrc;
        if (ip) {
            strncpy(ev.ip, ip, sizeof ev.ip - 1);
            ev.port = port;
        }
        emit_event(r, &ev);
    }
    if (!L->stream) {
        new_stream(r, li, p);
    } else if (p->ssrc != L->ssrc) {
        rc_event_t ev;
        new_stream(r, li, p);
        memset(&ev, 0, sizeof ev);
        ev.kind = RC_EV_SSRC_CHANGE;
        ev.leg = li;
        ev.ssrc = p->ssrc;
        emit_event(r, &ev);
    }

    /* extended sequence number (RFC 3550 A.1) */
    if (L->seg_received == 0) {
        ext = L->ext_max;
        newest = 1;
    } else {
        int delta = (int16_t)(uint16_t)(p->seq - L->max_seq);
        int idle = arr - L->last_arr > RC_RESTART_IDLE;
        if (delta > 0 && delta < RC_MAX_DROPOUT) {
            ext = L->ext_max + delta;
            if (delta >= RC_SEQWIN)
                memset(L->seen, 0, sizeof L->seen);
            else
                for (int64_t e = L->ext_max + 1; e < ext; e++)
                    set_seen(L, e, 0);
            newest = 1;
        } else if (idle) {
            /* after a silence (hold, a muted or paused sender) a backward or far jump is a sender
               that restarted its sequence (and timestamps) with the same SSRC: a new segment,
               placed where it arrives */
            start_segment(L, p->seq);
            ext = L->ext_max;
            newest = 1;
            restart = 1;
        } else if (delta <= 0 && delta > -RC_SEQWIN) {
            ext = L->ext_max + delta;
            if (seen_bit(L, ext)) {
                L->duplicates++;
                return;
            }
        } else if ((int)p->seq == L->bad_seq) {
            /* two sequential packets after a big jump: the sender restarted its sequence */
            start_segment(L, p->seq);
            ext = L->ext_max;
            newest = 1;
        } else {
            L->bad_seq = (p->seq + 1) & 0xffff;
            L->late++;
            return;
        }
    }
    ts_ext = L->ts_ext_last + (int32_t)(p->ts - L->ts_last);
    set_seen(L, ext, 1);
    if (arr > L->last_arr)
        L->last_arr = arr;
    L->seg_received++;
    if (ext < L->base_ext)
        L->base_ext = ext;
    if (newest) {
        L->ext_max = ext;
        L->max_seq = p->seq;
        L->bad_seq = -1;
        L->ts_last = p->ts;
        L->ts_ext_last = ts_ext;
    }

    if (kind == RC_PT_TE) {
        dtmf_packet(r, li, p);
        if (!newest)
            L->reordered++;
        return;
    }
    if (kind == RC_PT_PCMU || kind == RC_PT_PCMA || kind == RC_PT_CN) {
        /* RFC 3550 A.8 interarrival jitter, in timestamp units */
        int64_t transit = arr - ts_ext;
        if (L->jit_init) {
            int64_t d = transit - L->last_transit;
            if (d < 0)
                d = -d;
            L->jitter += ((double)d - L->jitter) / 16.0;
        }
        L->last_transit = transit;
        L->jit_init = 1;
        /* timeline anchor */
        if (!L->anchored || restart) {
            L->anchored = 1;
            L->anchor_pos = arr;
            L->anchor_ts = ts_ext;
            L->drift = 0;
        } else if (newest) {
            int64_t d = arr - (L->anchor_pos + (ts_ext - L->anchor_ts));
            int dir = d < -RC_JUMP ? -1 : d > RC_JUMP ? 1 : 0, re = 0;
            if (d < -RC_FAR) {
                re = 1;                      /* far ahead of the clock: timestamps jumped forward */
            } else if (dir == 0) {
                L->drift = 0;
            } else if (L->drift != dir) {
                L->drift = dir;
                L->drift_since = arr;
            } else if (arr - L->drift_since >= RC_HOLD) {
                re = 1;                      /* a persistent offset: clock drift or a timestamp jump */
            }
            if (re) {
                L->anchor_pos = arr;
                L->anchor_ts = ts_ext;
                L->drift = 0;
                L->reanchors++;
            }
        }
    }
    if (kind == RC_PT_PCMU || kind == RC_PT_PCMA) {
        L->codec = kind;
        if (r->audio) {
            int64_t pos = L->anchor_pos + (ts_ext - L->anchor_ts);
            uint64_t late0 = L->late;
            place(r, L, kind, pos, p);
            if (L->late != late0)
                return;
        }
    } else if (kind != RC_PT_CN) {
        L->undecoded++;
    }
    if (!newest)
        L->reordered++;
}

/* ---- emitting ------------------------------------------------------------------------------ */

static void gap_present(rc_leg_t *L, int64_t pos)
{
    if (L->gap_start >= 0) {
        uint64_t g = (uint64_t)(pos - L->gap_start);
        L->gap_total += g;
        if (g > L->gap_longest)
            L->gap_longest = g;
        L->gap_start = -1;
    }
    L->audio_seen = 1;
}

/* gap accounting over timeline [pos, pos + n), whose samples are ring[0 .. n), absent of them
 * missing (counted by the caller) */
static void scan_gaps(rc_leg_t *L, const int16_t *ring, int64_t n, int64_t pos, int64_t absent)
{
    if (absent == 0) {
        gap_present(L, pos);
    } else if (absent == n) {
        if (L->audio_seen && L->gap_start < 0)
            L->gap_start = pos;
    } else {
        for (int64_t i = 0; i < n; i++) {
            if (ring[i] != RC_ABSENT)
                gap_present(L, pos + i);
            else if (L->audio_seen && L->gap_start < 0)
                L->gap_start = pos + i;
        }
    }
}

static void emit(rc_rec_t *r, int64_t upto)
{
    int64_t rmask = r->ring_size - 1;
    while (r->emitted < upto) {
        int64_t idx = r->emitted & rmask, n = upto - r->emitted;
        int16_t *a = r->leg[0].ring + idx, *b = r->leg[1].ring + idx, *out = r->scratch;
        int64_t pend = r->paused ? INT64_MAX : r->pause_to, lo, hi;
        if (n > RC_CHUNK)
            n = RC_CHUNK;
        if (n > r->ring_size - idx)
            n = r->ring_size - idx;
        int absent_a = 0, absent_b = 0;
        /* one pass that the compiler vectorises: count the holes, interleave (or mix) with holes as
         * silence, and clear the ring behind it */
        if (r->channels == 2) {
            for (int64_t i = 0; i < n; i++) {
                int16_t x = a[i], y = b[i];
                int hx = x == RC_ABSENT, hy = y == RC_ABSENT;
                absent_a += hx;
                absent_b += hy;
                out[2 * i] = hx ? 0 : x;
                out[2 * i + 1] = hy ? 0 : y;
            }
        } else {
            for (int64_t i = 0; i < n; i++) {
                int16_t x = a[i], y = b[i];
                int hx = x == RC_ABSENT, hy = y == RC_ABSENT;
                int s = (hx ? 0 : x) + (hy ? 0 : y);
                absent_a += hx;
                absent_b += hy;
                out[i] = (int16_t)(s > 32767 ? 32767 : s < -32768 ? -32768 : s);
            }
        }
        /* the per-sample gap scan (partly filled chunks only) still needs the holes marked */
        scan_gaps(&r->leg[0], a, n, r->emitted, absent_a);
        scan_gaps(&r->leg[1], b, n, r->emitted, absent_b);
        lo = r->pause_from > r->emitted ? r->pause_from : r->emitted;
        hi = pend < r->emitted + n ? pend : r->emitted + n;
        if (lo < hi)
            memset(out + (lo - r->emitted) * r->channels, 0, sizeof(int16_t) * (size_t)((hi - lo) * r->channels));
        for (int64_t i = 0; i < n; i++)
            a[i] = b[i] = RC_ABSENT;
        if (r->sink)
            r->sink(r->ctx, out, (size_t)n, r->channels);
        r->emitted += n;
    }
}

void rc_rec_prefetch_tick(const rc_rec_t *r, int64_t samples)
{
    int64_t rmask = r->ring_size - 1;
    if (!r->started || !r->audio)
        return;
    for (int l = 0; l < 2; l++)
        for (int64_t q = 0; q < samples + 32; q += 32)   /* the period and a bit, one line at a time */
            __builtin_prefetch(&r->leg[l].ring[(r->emitted + q) & rmask], 1, 3);
}

void rc_rec_tick(rc_rec_t *r, int64_t now_ns)
{
    if (!r->started || !r->audio)
        return;
    emit(r, pos_of(r, now_ns) - r->reorder);
}

void rc_rec_flush(rc_rec_t *r, int64_t now_ns)
{
    int64_t upto;
    for (int i = 0; i < 2; i++)
        if (r->leg[i].ev_active && !r->leg[i].ev_done)
            dtmf_report(r, i);
    if (!r->started || !r->audio)
        return;
    upto = pos_of(r, now_ns);
    for (int i = 0; i < 2; i++)
        if (r->leg[i].max_end > upto)
            upto = r->leg[i].max_end;
    emit(r, upto);
}

void rc_rec_set_recording(rc_rec_t *r, int enabled, int64_t now_ns)
{
    int64_t p = r->started ? pos_of(r, now_ns) : 0;
    if (p < 0)
        p = 0;
    if (!enabled && !r->paused) {
        r->paused = 1;
        /* a pause still pending emission is extended rather than forgotten */
        if (!(r->pause_to > r->emitted && r->pause_to > r->pause_from))
            r->pause_from = p;
    } else if (enabled && r->paused) {
        r->paused = 0;
        r->pause_to = p;
    }
}
