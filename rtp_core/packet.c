/* The packet-ring receive path of an engine thread (io "packet").
 *
 * With one UDP socket per leg, every datagram costs the engine a receive of its own: a system call
 * (epoll loop) or an io_uring completion and a provided-buffer recycle (io_uring loop), and the copy
 * out of the socket's queue.  Here one AF_PACKET socket per engine thread, with a TPACKET_V3
 * receive ring mapped into the process, takes every IPv4 UDP datagram addressed to the thread's own
 * port range: the kernel's receive path copies each packet into the ring's current block (in the
 * softirq that delivers it), closes the block when it is full or 1 ms old, and the engine walks
 * whole blocks of packets with no system call at all.  A classic BPF filter in the kernel keeps
 * everything else out: only packets for this host (not forwarded or outgoing ones), unfragmented
 * IPv4 UDP, to the engine's address, to a port of this thread's range.
 *
 * The legs keep their UDP sockets: they hold the ports (no other program may take them and the
 * kernel answers no ICMP port unreachable) and they send the relayed packets (io_uring SENDMSG,
 * as in the io_uring loop).  Each carries a drop-everything socket filter, so the datagrams the
 * ring took are not queued to it a second time (the kernel counts them as UDP InErrors).
 *
 * The ring sees packets before the IP and UDP layers have checked them, so this file checks what
 * they would: the IPv4 header (version, length, header checksum) and the UDP length and checksum
 * (unless the kernel marked it verified, or not yet computed for a packet that never left the
 * host).  Needs CAP_NET_RAW, io_uring (for the sends) and an IPv4 engine address; Engine(io="auto")
 * uses it when all three hold and a probe datagram comes through, else the io_uring loop.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

#include "engine_int.h"

#define PK_BLOCK (256 * 1024)          /* a block holds ~1,000 G.711 packets */
#define PK_BLOCKS 64                   /* 16 MiB: ~130 ms of 500k packets/s */
#define PK_FRAME 2048                  /* TPACKET_V3 only checks that blocks divide into frames */
#define PK_RETIRE_MS 1                 /* a block is handed over when full or this old */

struct rc_pkt {
    int fd;
    uint8_t *ring;
    size_t ring_sz;
    unsigned cur;
    int port_lo, port_hi;              /* this thread's ports */
    rc_sock_t **ports;                 /* [port - port_lo]: the leg socket bound there, or NULL */
    uint32_t bind_ip;                  /* network order; 0 = any */
    int raw;                           /* IPPROTO_RAW socket the relays go out of, or -1 */
    uint16_t ip_id;
    uint64_t drops;
};

static inline struct tpacket_block_desc *block(struct rc_pkt *p, unsigned i)
{
    return (struct tpacket_block_desc *)(p->ring + (size_t)i * PK_BLOCK);
}

/* ---- checksums ----------------------------------------------------------------------------- */

static inline uint32_t sum16(const uint8_t *b, size_t n, uint32_t acc)
{
    uint64_t s = acc;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, b, 8);
        s += (w & 0xffffffffu) + (w >> 32);
        b += 8;
        n -= 8;
    }
    while (n >= 2) {
        uint16_t w;
        memcpy(&w, b, 2);
        s += w;
        b += 2;
        n -= 2;
    }
    if (n) {
        uint16_t w = 0;
        memcpy(&w, b, 1);              /* the odd byte, padded with zero, in memory order */
        s += w;
    }
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    return (uint32_t)s;
}

int rc_pkt_ip_csum_ok(const uint8_t *ip, size_t ihl)
{
    return sum16(ip, ihl, 0) == 0xffff;
}

int rc_pkt_udp_csum_ok(const uint8_t *ip, const uint8_t *udp, size_t ulen)
{
    uint8_t ph[12];
    uint16_t check;
    memcpy(&check, udp + 6, 2);
    if (check == 0)
        return 1;                      /* RFC 768: no checksum sent */
    memcpy(ph, ip + 12, 8);            /* source, destination */
    ph[8] = 0;
    ph[9] = IPPROTO_UDP;
    ph[10] = (uint8_t)(ulen >> 8);
    ph[11] = (uint8_t)ulen;
    return sum16(udp, ulen, sum16(ph, sizeof ph, 0)) == 0xffff;
}

/* 1 with *udp / *ulen set if the IPv4 datagram at ip (cap bytes captured) is a whole, valid UDP
 * datagram; the transport checksum is checked unless the kernel says it need not be */
int rc_pkt_parse_ipv4(const uint8_t *ip, size_t cap, int csum_known, const uint8_t **udp, size_t *ulen)
{
    size_t ihl, tot, ul;
    if (cap < 28 || (ip[0] >> 4) != 4)
        return 0;
    ihl = (size_t)(ip[0] & 0x0f) * 4;
    tot = (size_t)ip[2] << 8 | ip[3];
    if (ihl < 20 || tot < ihl + 8 || tot > cap || ip[9] != IPPROTO_UDP || (((ip[6] << 8) | ip[7]) & 0x3fff))
        return 0;
    if (!rc_pkt_ip_csum_ok(ip, ihl))
        return 0;
    ul = (size_t)ip[ihl + 4] << 8 | ip[ihl + 5];
    if (ul < 8 || ul > tot - ihl)
        return 0;
    if (!csum_known && !rc_pkt_udp_csum_ok(ip, ip + ihl, ul))
        return -1;
    *udp = ip + ihl;
    *ulen = ul;
    return 1;
}

/* ---- sending ----------------------------------------------------------------------------- */

int rc_pkt_raw_fd(const rc_thread_t *t) { return t->pk ? t->pk->raw : -1; }

/* an IPv4 UDP datagram from the engine's address and port sport to *to, carrying payload, written
 * to out (which has room for len + 28); returns its length.  The kernel completes the IP header
 * checksum (IP_HDRINCL); the UDP checksum is ours. */
size_t rc_pkt_build(rc_thread_t *t, uint8_t *out, const uint8_t *payload, size_t len, int sport,
                    const struct sockaddr_in *to)
{
    struct rc_pkt *p = t->pk;
    size_t ulen = len + 8, tot = ulen + 20;
    uint8_t *ip = out, *udp = out + 20;
    uint32_t sum;
    uint16_t c, id = p->ip_id++;
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2] = (uint8_t)(tot >> 8);
    ip[3] = (uint8_t)tot;
    ip[4] = (uint8_t)(id >> 8);        /* don't fragment: any identification will do (RFC 6864) */
    ip[5] = (uint8_t)id;
    ip[6] = 0x40;
    ip[7] = 0;
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[10] = ip[11] = 0;
    memcpy(ip + 12, &p->bind_ip, 4);
    memcpy(ip + 16, &to->sin_addr, 4);
    udp[0] = (uint8_t)(sport >> 8);
    udp[1] = (uint8_t)sport;
    memcpy(udp + 2, &to->sin_port, 2);
    udp[4] = (uint8_t)(ulen >> 8);
    udp[5] = (uint8_t)ulen;
    udp[6] = udp[7] = 0;
    memcpy(udp + 8, payload, len);
    {
        uint8_t ph[12];
        memcpy(ph, ip + 12, 8);
        ph[8] = 0;
        ph[9] = IPPROTO_UDP;
        ph[10] = udp[4];
        ph[11] = udp[5];
        sum = sum16(udp, ulen, sum16(ph, sizeof ph, 0));
    }
    c = (uint16_t)~sum;
    if (c == 0)
        c = 0xffff;                    /* 0 would mean "no checksum" */
    memcpy(udp + 6, &c, 2);            /* the sum was taken in memory order: store it likewise */
    return tot;
}

/* ---- the filter ---------------------------------------------------------------------------- */

/* accepts packets for this host, unfragmented IPv4 UDP to ip (host order; 0 = any) and a port in
 * lo-hi; offsets count from the IP header (SOCK_DGRAM packet socket).  Jump offsets count the
 * instructions skipped: every "drop" lands on the second-last instruction. */
static int set_filter(int fd, uint32_t ip, int lo, int hi)
{
    struct sock_filter any[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PROTOCOL)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IP, 0, 13),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PKTTYPE)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_HOST, 0, 11),
        BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, 0),                 /* X = header length */
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x45, 0, 8),        /* version 4 ... */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x50, 7, 0),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 9),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_UDP, 0, 5),
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 6),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x3fff, 3, 0),     /* a fragment */
        BPF_STMT(BPF_LD | BPF_H | BPF_IND, 2),                  /* destination port */
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, (uint32_t)lo, 0, 1),
        BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, (uint32_t)hi, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0),
        BPF_STMT(BPF_RET | BPF_K, 0x40000),
    };
    /* with an address: the same, with "destination == ip" before the port test */
    struct sock_filter one[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PROTOCOL)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETH_P_IP, 0, 15),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PKTTYPE)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_HOST, 0, 13),
        BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, 0),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 0),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x45, 0, 10),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x50, 9, 0),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 9),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_UDP, 0, 7),
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 6),
        BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, 0x3fff, 5, 0),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 16),                 /* destination address */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ip, 0, 3),
        BPF_STMT(BPF_LD | BPF_H | BPF_IND, 2),
        BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, (uint32_t)lo, 0, 1),
        BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, (uint32_t)hi, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0),
        BPF_STMT(BPF_RET | BPF_K, 0x40000),
    };
    struct sock_fprog prog;
    if (ip) {
        prog.len = sizeof one / sizeof one[0];
        prog.filter = one;
    } else {
        prog.len = sizeof any / sizeof any[0];
        prog.filter = any;
    }
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog);
}

int rc_pkt_drop_all(int fd)
{
    struct sock_filter drop[] = {BPF_STMT(BPF_RET | BPF_K, 0)};
    struct sock_fprog prog = {.len = 1, .filter = drop};
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog);
}

/* ---- the ring ------------------------------------------------------------------------------ */

typedef void (*pkt_fn)(rc_thread_t *t, const uint8_t *ip, size_t cap, uint32_t status, int64_t now, void *arg);

/* the next block the kernel has handed over, with *first its first packet and *n their count; NULL
 * if none is ready */
static struct tpacket_block_desc *ready_block(struct rc_pkt *p, struct tpacket3_hdr **first, uint32_t *n)
{
    struct tpacket_block_desc *bd = block(p, p->cur);
    if (!(__atomic_load_n(&bd->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
        return NULL;
    *n = bd->hdr.bh1.num_pkts;
    *first = (struct tpacket3_hdr *)((uint8_t *)bd + bd->hdr.bh1.offset_to_first_pkt);
    return bd;
}

/* gives a block back to the kernel and moves to the next */
static void release_block(struct rc_pkt *p, struct tpacket_block_desc *bd)
{
    __atomic_store_n(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
    p->cur = (p->cur + 1) % PK_BLOCKS;
}

static inline struct tpacket3_hdr *next_packet(struct tpacket3_hdr *h)
{
    return (struct tpacket3_hdr *)((uint8_t *)h + h->tp_next_offset);
}

/* hands every packet of every block the kernel has handed over to fn (the startup probe) */
static void walk(rc_thread_t *t, struct rc_pkt *p, pkt_fn fn, void *arg)
{
    struct tpacket_block_desc *bd;
    struct tpacket3_hdr *h;
    uint32_t n;
    for (unsigned guard = 0; guard < PK_BLOCKS && (bd = ready_block(p, &h, &n)); guard++) {
        for (uint32_t i = 0; i < n; i++, h = next_packet(h))
            fn(t, (uint8_t *)h + h->tp_net, h->tp_snaplen, h->tp_status, 0, arg);
        release_block(p, bd);
    }
}

/* a packet of the ring, resolved to the leg socket it is for */
typedef struct {
    rc_sock_t *k;
    uint8_t *payload;
    size_t len;
    int trunc;
    struct sockaddr_in src;
} pk_item_t;

#define PK_AHEAD 4                     /* packets resolved (and their session prefetched) ahead */

static int resolve(rc_thread_t *t, const uint8_t *ip, size_t cap, uint32_t status, pk_item_t *it)
{
    struct rc_pkt *p = t->pk;
    const uint8_t *udp;
    size_t ulen;
    int port, ok;
    rc_sock_t *k;
    ok = rc_pkt_parse_ipv4(ip, cap, (status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID)) != 0, &udp, &ulen);
    if (ok <= 0) {
        t->ls.ring_rejected++;
        return 0;
    }
    port = udp[2] << 8 | udp[3];
    if (port < p->port_lo || port > p->port_hi || !(k = p->ports[port - p->port_lo]))
        return 0;                      /* a port with no leg (any more): no socket would take it either */
    t->ls.datagrams++;
    it->k = k;
    it->payload = (uint8_t *)udp + 8;
    it->len = ulen - 8;
    /* larger than the socket loops' buffers: invalid there (truncated), so invalid here too */
    it->trunc = it->len > PKT_MAX;
    it->src.sin_family = AF_INET;
    memcpy(&it->src.sin_port, udp, 2);
    memcpy(&it->src.sin_addr, ip + 12, 4);
    memset(it->src.sin_zero, 0, sizeof it->src.sin_zero);
    /* with thousands of sessions their state has left the cache since their last packet: fetch
     * it now, to be warm when this packet's turn comes */
    {
        rc_session_t *s = k->s;
        const char *leg = (const char *)&s->rec.leg[k->leg];
        __builtin_prefetch(s, 1);
        __builtin_prefetch(&s->io[k->leg], 1);
        __builtin_prefetch((const char *)&s->io[k->leg] + 64, 1);
        __builtin_prefetch(&s->io[1 - k->leg], 0);
        __builtin_prefetch((const char *)&s->io[1 - k->leg] + 64, 0);
        __builtin_prefetch(&s->rec, 1);
        for (size_t off = 0; off < offsetof(rc_leg_t, dtmf_len); off += 64)
            __builtin_prefetch(leg + off, 1);
    }
    return 1;
}

unsigned rc_pkt_drain(rc_thread_t *t, int64_t now)
{
    struct rc_pkt *p = t->pk;
    struct tpacket_block_desc *bd;
    struct tpacket3_hdr *h;
    pk_item_t q[PK_AHEAD];
    unsigned seen = 0, head = 0, n = 0;
    uint32_t num;
    for (unsigned guard = 0; guard < PK_BLOCKS && (bd = ready_block(p, &h, &num)); guard++) {
        for (uint32_t i = 0; i < num; i++) {
            struct tpacket3_hdr *next = next_packet(h);
            if (i + 1 < num)
                __builtin_prefetch((uint8_t *)next + next->tp_net);
            if (n == PK_AHEAD) {
                pk_item_t *it = &q[head];
                rc_uring_datagram(t, it->k, it->payload, it->len, it->trunc, &it->src, now);
                head = (head + 1) % PK_AHEAD;
                n--;
            }
            if (resolve(t, (uint8_t *)h + h->tp_net, h->tp_snaplen, h->tp_status, &q[(head + n) % PK_AHEAD]))
                n++;
            h = next;
        }
        /* the block goes back to the kernel only when none of its packets waits */
        for (; n; n--, head = (head + 1) % PK_AHEAD)
            rc_uring_datagram(t, q[head].k, q[head].payload, q[head].len, q[head].trunc, &q[head].src, now);
        seen += num;
        release_block(p, bd);
    }
    return seen;
}

void rc_pkt_stats(rc_thread_t *t)
{
    struct rc_pkt *p = t->pk;
    struct tpacket_stats_v3 st;
    socklen_t len = sizeof st;
    if (getsockopt(p->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) == 0)
        p->drops += st.tp_drops;       /* reading resets the kernel's counters */
    t->ls.ring_drops = p->drops;
}

int rc_pkt_fd(const rc_thread_t *t) { return t->pk->fd; }

void rc_pkt_set_port(rc_thread_t *t, int port, rc_sock_t *k)
{
    struct rc_pkt *p = t->pk;
    if (port >= p->port_lo && port <= p->port_hi)
        p->ports[port - p->port_lo] = k;
}

void rc_pkt_free(rc_thread_t *t)
{
    struct rc_pkt *p = t->pk;
    if (!p)
        return;
    if (p->ring && p->ring != MAP_FAILED)
        munmap(p->ring, p->ring_sz);
    if (p->fd >= 0)
        close(p->fd);
    if (p->raw >= 0)
        close(p->raw);
    free(p->ports);
    free(p);
    t->pk = NULL;
}

/* ---- setup --------------------------------------------------------------------------------- */

struct probe {
    uint16_t port;
    int got;
};

static void on_probe(rc_thread_t *t, const uint8_t *ip, size_t cap, uint32_t status, int64_t now, void *arg)
{
    struct probe *pr = arg;
    const uint8_t *udp;
    size_t ulen;
    int csum_known = (status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID)) != 0;
    if (rc_pkt_parse_ipv4(ip, cap, csum_known, &udp, &ulen) > 0 && (udp[2] << 8 | udp[3]) == pr->port &&
        ulen == 8 + 5 && memcmp(udp + 8, "probe", 5) == 0)
        pr->got = 1;
}

/* a datagram to a socket of our own, seen through the ring with a filter for its port alone */
static int self_test(rc_thread_t *t, struct rc_pkt *p)
{
    struct sockaddr_in a;
    socklen_t alen = sizeof a;
    struct probe pr = {0, 0};
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    uint32_t ip = p->bind_ip ? p->bind_ip : htonl(INADDR_LOOPBACK);
    if (fd < 0)
        return -1;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = ip;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || getsockname(fd, (struct sockaddr *)&a, &alen) < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "probe socket: %s", strerror(errno));
        close(fd);
        return -1;
    }
    pr.port = ntohs(a.sin_port);
    if (set_filter(p->fd, ntohl(ip), pr.port, pr.port) < 0 ||
        sendto(fd, "probe", 5, 0, (struct sockaddr *)&a, sizeof a) != 5) {
        snprintf(t->init_msg, sizeof t->init_msg, "probe: %s", strerror(errno));
        close(fd);
        return -1;
    }
    for (int i = 0; i < 100 && !pr.got; i++) {
        struct pollfd pf = {p->fd, POLLIN, 0};
        poll(&pf, 1, 5);
        walk(t, p, on_probe, &pr);
    }
    if (!pr.got) {
        close(fd);
        snprintf(t->init_msg, sizeof t->init_msg, "a loopback datagram did not come through the packet ring");
        return -1;
    }
    if (p->raw >= 0) {
        /* a datagram built here must reach a UDP socket intact (header, checksum), else the relays
         * go out of the legs' sockets */
        uint8_t pkt[64], got[16];
        struct sockaddr_in to = a;
        size_t n = rc_pkt_build(t, pkt, (const uint8_t *)"raw-probe", 9, pr.port, &to);
        ssize_t r = -1;
        if (sendto(p->raw, pkt, n, 0, (struct sockaddr *)&to, sizeof to) == (ssize_t)n) {
            for (int i = 0; i < 100 && r < 0; i++) {
                struct pollfd pf = {fd, POLLIN, 0};
                poll(&pf, 1, 5);
                r = recv(fd, got, sizeof got, MSG_DONTWAIT);
                if (r >= 0 && (r != 9 || memcmp(got, "raw-probe", 9) != 0))
                    r = -1;        /* the ring's own probe, still queued: read on */
            }
        }
        if (r != 9) {
            close(p->raw);
            p->raw = -1;
        }
    }
    close(fd);
    return 0;
}

int rc_pkt_init(rc_thread_t *t, int port_lo, int port_hi)
{
    struct tpacket_req3 req;
    struct sockaddr_ll ll;
    int v = TPACKET_V3, one = 1;
    struct rc_pkt *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(t->init_msg, sizeof t->init_msg, "out of memory");
        return -1;
    }
    t->pk = p;
    p->port_lo = port_lo;
    p->port_hi = port_hi;
    p->bind_ip = t->eng->bind_ip.s_addr;
    p->raw = -1;
    if (p->bind_ip) {
        /* relays from one raw socket: the headers are written here, so no leg socket (each one cold
         * in the cache at thousands of legs) is touched per packet; needs a source address, so not
         * with an engine bound to 0.0.0.0 */
        int sndbuf = 4 << 20;
        p->raw = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC | SOCK_NONBLOCK, IPPROTO_RAW);
        if (p->raw >= 0 && setsockopt(p->raw, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof sndbuf) < 0)
            setsockopt(p->raw, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    }
    p->ports = calloc((size_t)(port_hi - port_lo + 1), sizeof *p->ports);
    /* protocol 0: nothing arrives until the ring and the filter are in place and bind() names IPv4 */
    p->fd = socket(AF_PACKET, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (!p->ports || p->fd < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "packet socket: %s", p->ports ? strerror(errno) : "out of memory");
        goto fail;
    }
    memset(&req, 0, sizeof req);
    req.tp_block_size = PK_BLOCK;
    req.tp_block_nr = PK_BLOCKS;
    req.tp_frame_size = PK_FRAME;
    req.tp_frame_nr = PK_BLOCK / PK_FRAME * PK_BLOCKS;
    req.tp_retire_blk_tov = PK_RETIRE_MS;
    if (setsockopt(p->fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) < 0 ||
        setsockopt(p->fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof req) < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "packet ring: %s", strerror(errno));
        goto fail;
    }
    /* on a loopback a packet passes the taps twice, going out and coming in: the filter takes
     * only PACKET_HOST, and this spares the kernel the first copy's filter run */
    setsockopt(p->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one);
    p->ring_sz = (size_t)PK_BLOCK * PK_BLOCKS;
    p->ring = mmap(NULL, p->ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_LOCKED | MAP_POPULATE, p->fd, 0);
    if (p->ring == MAP_FAILED)
        p->ring = mmap(NULL, p->ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, p->fd, 0);
    if (p->ring == MAP_FAILED) {
        snprintf(t->init_msg, sizeof t->init_msg, "packet ring mmap: %s", strerror(errno));
        goto fail;
    }
    memset(&ll, 0, sizeof ll);
    ll.sll_family = AF_PACKET;
    /* every protocol, every interface; the filter picks IPv4 by protocol and address.  A tap of
     * every protocol runs before the protocols' handlers, so the IP layer gets the packet after the
     * ring has let go of it; one bound to IPv4 runs after IP and makes the IP layer clone every
     * packet it shares (measured: ~3 % of the engine's CPU at 1,000 bridged calls on loopback) */
    ll.sll_protocol = htons(ETH_P_ALL);
    ll.sll_ifindex = 0;
    if (set_filter(p->fd, 0, 0, 0) < 0 || bind(p->fd, (struct sockaddr *)&ll, sizeof ll) < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "packet socket bind: %s", strerror(errno));
        goto fail;
    }
    if (self_test(t, p) < 0)
        goto fail;
    if (set_filter(p->fd, ntohl(p->bind_ip), port_lo, port_hi) < 0) {
        snprintf(t->init_msg, sizeof t->init_msg, "packet filter: %s", strerror(errno));
        goto fail;
    }
    /* whatever the probe's filter let in after the probe */
    for (int i = 0; i < 3; i++) {
        struct probe none = {0, 0};
        walk(t, p, on_probe, &none);
        if (i < 2)
            poll(&(struct pollfd){p->fd, POLLIN, 0}, 1, PK_RETIRE_MS + 1);
    }
    rc_pkt_stats(t);
    p->drops = 0;
    t->ls.ring_drops = 0;
    return 0;
fail:
    rc_pkt_free(t);
    return -1;
}
