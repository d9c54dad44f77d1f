/* RTP header parsing (RFC 3550 section 5.1) and G.711 decode tables (ITU-T G.711). */
#include "rtp_core.h"

int16_t rc_ulaw_table[256];
int16_t rc_alaw_table[256];

static int16_t ulaw_decode(uint8_t u)
{
    int t;
    u = (uint8_t)~u;
    t = ((u & 0x0f) << 3) + 0x84;
    t <<= (u & 0x70) >> 4;
    return (int16_t)((u & 0x80) ? (0x84 - t) : (t - 0x84));
}

static int16_t alaw_decode(uint8_t a)
{
    int t, seg;
    a ^= 0x55;
    t = (a & 0x0f) << 4;
    seg = (a & 0x70) >> 4;
    if (seg == 0)
        t += 8;
    else if (seg == 1)
        t += 0x108;
    else {
        t += 0x108;
        t <<= seg - 1;
    }
    return (int16_t)((a & 0x80) ? t : -t);
}

void rc_g711_init(void)
{
    for (int i = 0; i < 256; i++) {
        rc_ulaw_table[i] = ulaw_decode((uint8_t)i);
        rc_alaw_table[i] = alaw_decode((uint8_t)i);
    }
}

int rc_parse_rtp(const uint8_t *buf, size_t len, rc_rtp_t *out)
{
    size_t hdr, pad = 0;
    if (len < 12 || (buf[0] >> 6) != 2)
        return -1;
    out->padding = (buf[0] >> 5) & 1;
    out->extension = (buf[0] >> 4) & 1;
    out->csrc_count = buf[0] & 0x0f;
    out->marker = buf[1] >> 7;
    out->pt = buf[1] & 0x7f;
    /* RFC 5761 section 4: RTCP packet types 200-204 appear as payload types 72-76 */
    if (out->pt >= 72 && out->pt <= 76)
        return -1;
    out->seq = (uint16_t)((buf[2] << 8) | buf[3]);
    out->ts = ((uint32_t)buf[4] << 24) | ((uint32_t)buf[5] << 16) | ((uint32_t)buf[6] << 8) | buf[7];
    out->ssrc = ((uint32_t)buf[8] << 24) | ((uint32_t)buf[9] << 16) | ((uint32_t)buf[10] << 8) | buf[11];
    hdr = 12 + 4 * (size_t)out->csrc_count;
    if (hdr > len)
        return -1;
    if (out->extension) {
        size_t words;
        if (hdr + 4 > len)
            return -1;
        words = ((size_t)buf[hdr + 2] << 8) | buf[hdr + 3];
        hdr += 4 + 4 * words;
        if (hdr > len)
            return -1;
    }
    if (out->padding) {
        /* RFC 3550 5.1: the last octet counts the padding octets, itself included */
        pad = buf[len - 1];
        if (pad == 0 || hdr + pad > len)
            return -1;
    }
    out->payload = buf + hdr;
    out->payload_len = len - hdr - pad;
    return 0;
}
