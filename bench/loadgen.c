/* loadgen: drives N concurrent G.711 calls (RTP, 160-byte PCMU payloads, 50 packets/s per stream)
 * into rtp_core engine ports and measures what comes back.  Built and run by bench/rtp_core_bench.py.
 *
 *   loadgen PORTS_FILE SECONDS WARMUP_SECONDS RELAY(0|1) SOCKETS_PER_SIDE
 *
 * PORTS_FILE has one line per call: "<leg 0 port> <leg 1 port>" on 127.0.0.1.  Call i sends from one
 * of SOCKETS_PER_SIDE shared sockets per side (the engine latches each leg to it), in 1 ms slot i % 20
 * of every 20 ms period, with sendmmsg batches.  With RELAY=1 it receives the relayed packets on the
 * same sockets and reports loss and relay latency (arrival - actual send time of that packet,
 * found by its SSRC and RTP timestamp) for packets after the warm-up.  Prints one JSON object.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PAYLOAD 160
#define PKT (12 + PAYLOAD)
#define RBATCH 256
#define HBINS 20000 /* 10 us bins up to 200 ms */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint8_t ulaw_tone[PAYLOAD * 50];

static uint8_t ulaw_encode(int s)
{
    int sign = s < 0 ? 0x80 : 0, exp = 7, mask = 0x4000;
    if (s < 0)
        s = -s;
    if (s > 32635)
        s = 32635;
    s += 0x84;
    while (exp > 0 && !(s & mask)) {
        exp--;
        mask >>= 1;
    }
    return (uint8_t)~(sign | (exp << 4) | ((s >> (exp + 3)) & 0x0f));
}

int main(int argc, char **argv)
{
    FILE *f;
    int ncalls = 0, cap = 1024, *ports, relay, nsock, warm_pkts;
    double seconds, warmup;
    int64_t start, end, drain_until, lag_max = 0;
    uint64_t sent = 0, sent_measured = 0, recvd = 0, recvd_measured = 0, send_err = 0, hist[HBINS + 1];
    int *sock[2];
    struct mmsghdr *msgs;
    struct iovec *iov;
    uint8_t *pkts;
    struct sockaddr_in *dst;
    uint64_t *kcount;   /* packets sent so far per call-direction */
    int64_t *sent_at;   /* actual send time of the last 64 packets per call-direction */
    if (argc < 6) {
        fprintf(stderr, "usage: loadgen PORTS_FILE SECONDS WARMUP RELAY SOCKETS_PER_SIDE\n");
        return 2;
    }
    seconds = atof(argv[2]);
    warmup = atof(argv[3]);
    relay = atoi(argv[4]);
    nsock = atoi(argv[5]);
    warm_pkts = (int)(warmup * 50);
    memset(hist, 0, sizeof hist);
    for (int i = 0; i < PAYLOAD * 50; i++)
        ulaw_tone[i] = ulaw_encode((int)(6000 * sin(2 * M_PI * 440 * i / 8000.0)));
    f = fopen(argv[1], "r");
    if (!f) {
        perror("ports file");
        return 1;
    }
    ports = malloc(sizeof(int) * 2 * (size_t)cap);
    while (fscanf(f, "%d %d", &ports[2 * ncalls], &ports[2 * ncalls + 1]) == 2) {
        if (++ncalls == cap) {
            cap *= 2;
            ports = realloc(ports, sizeof(int) * 2 * (size_t)cap);
        }
    }
    fclose(f);
    for (int side = 0; side < 2; side++) {
        sock[side] = malloc(sizeof(int) * (size_t)nsock);
        for (int k = 0; k < nsock; k++) {
            struct sockaddr_in a;
            int sz = 16 << 20;
            int fd = socket(AF_INET, SOCK_DGRAM, 0);
            memset(&a, 0, sizeof a);
            a.sin_family = AF_INET;
            a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
            if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0) {
                perror("socket");
                return 1;
            }
            if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &sz, sizeof sz) < 0)
                setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &sz, sizeof sz);
            if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) < 0)
                setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
            sock[side][k] = fd;
        }
    }
    /* one prepared packet and destination per call-direction; payload rotates through the tone */
    pkts = calloc((size_t)ncalls * 2, PKT);
    dst = calloc((size_t)ncalls * 2, sizeof *dst);
    kcount = calloc((size_t)ncalls * 2, sizeof *kcount);
    sent_at = calloc((size_t)ncalls * 2 * 64, sizeof *sent_at);
    msgs = calloc((size_t)ncalls * 2 + RBATCH, sizeof *msgs);
    iov = calloc((size_t)ncalls * 2 + RBATCH, sizeof *iov);
    for (int c = 0; c < ncalls * 2; c++) {
        uint8_t *p = pkts + (size_t)c * PKT;
        uint32_t ssrc = (uint32_t)c + 1;
        p[0] = 0x80;
        p[1] = 0;
        p[8] = (uint8_t)(ssrc >> 24);
        p[9] = (uint8_t)(ssrc >> 16);
        p[10] = (uint8_t)(ssrc >> 8);
        p[11] = (uint8_t)ssrc;
        dst[c].sin_family = AF_INET;
        dst[c].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        dst[c].sin_port = htons((uint16_t)ports[c]);
    }
    start = now_ns() + 5000000;
    end = start + (int64_t)(seconds * 1e9);
    drain_until = end + 300000000;
    {
        uint8_t rbuf[RBATCH][256];
        struct sockaddr_in raddr[RBATCH];
        struct iovec riov[RBATCH];
        struct mmsghdr rmsg[RBATCH];
        int64_t next_slot = start;
        int slot = 0;
        memset(rmsg, 0, sizeof rmsg);
        for (int i = 0; i < RBATCH; i++) {
            riov[i].iov_base = rbuf[i];
            riov[i].iov_len = sizeof rbuf[i];
            rmsg[i].msg_hdr.msg_iov = &riov[i];
            rmsg[i].msg_hdr.msg_iovlen = 1;
            rmsg[i].msg_hdr.msg_name = &raddr[i];
        }
        for (;;) {
            int64_t t = now_ns();
            if (t >= next_slot && next_slot < end) {
                if (t - next_slot > lag_max)
                    lag_max = t - next_slot;
                /* calls in this 1 ms slot: one packet per direction, batched per socket */
                for (int side = 0; side < 2; side++)
                    for (int k = 0; k < nsock; k++) {
                        int n = 0;
                        for (int call = slot; call < ncalls; call += 20) {
                            int c = 2 * call + side;
                            uint8_t *p = pkts + (size_t)c * PKT;
                            uint64_t kk = kcount[c];
                            uint32_t ts = (uint32_t)(kk * 160);
                            if (call % nsock != k)
                                continue;
                            p[2] = (uint8_t)(kk >> 8);
                            p[3] = (uint8_t)kk;
                            p[4] = (uint8_t)(ts >> 24);
                            p[5] = (uint8_t)(ts >> 16);
                            p[6] = (uint8_t)(ts >> 8);
                            p[7] = (uint8_t)ts;
                            memcpy(p + 12, ulaw_tone + (kk % 50) * PAYLOAD, PAYLOAD);
                            iov[n].iov_base = p;
                            iov[n].iov_len = PKT;
                            memset(&msgs[n].msg_hdr, 0, sizeof msgs[n].msg_hdr);
                            msgs[n].msg_hdr.msg_iov = &iov[n];
                            msgs[n].msg_hdr.msg_iovlen = 1;
                            msgs[n].msg_hdr.msg_name = &dst[c];
                            msgs[n].msg_hdr.msg_namelen = sizeof dst[c];
                            sent_at[(size_t)c * 64 + (kk & 63)] = t;
                            kcount[c]++;
                            if ((int)kk >= warm_pkts)
                                sent_measured++;
                            n++;
                        }
                        for (int off = 0; off < n;) {
                            int r = sendmmsg(sock[side][k], msgs + off, (unsigned)(n - off), 0);
                            if (r < 0) {
                                send_err++;
                                off++;
                                continue;
                            }
                            off += r;
                            sent += (uint64_t)r;
                        }
                    }
                slot = (slot + 1) % 20;
                next_slot += 1000000;
                continue;
            }
            if (t >= drain_until || (!relay && t >= end))
                break;
            if (relay) {
                int got = 0;
                for (int side = 0; side < 2; side++)
                    for (int k = 0; k < nsock; k++) {
                        int r;
                        for (int i = 0; i < RBATCH; i++)
                            rmsg[i].msg_hdr.msg_namelen = sizeof raddr[i];
                        r = recvmmsg(sock[side][k], rmsg, RBATCH, MSG_DONTWAIT, NULL);
                        if (r <= 0)
                            continue;
                        got += r;
                        t = now_ns();
                        for (int i = 0; i < r; i++) {
                            uint8_t *p = rbuf[i];
                            uint32_t ssrc, ts;
                            int call;
                            uint64_t kk;
                            int64_t sched, lat;
                            if (rmsg[i].msg_len < 12)
                                continue;
                            ssrc = ((uint32_t)p[8] << 24) | ((uint32_t)p[9] << 16) | ((uint32_t)p[10] << 8) | p[11];
                            ts = ((uint32_t)p[4] << 24) | ((uint32_t)p[5] << 16) | ((uint32_t)p[6] << 8) | p[7];
                            if (ssrc < 1 || ssrc > (uint32_t)ncalls * 2)
                                continue;
                            call = (int)((ssrc - 1) / 2);
                            kk = ts / 160;
                            (void)call;
                            recvd++;
                            if ((int)kk < warm_pkts)
                                continue;
                            recvd_measured++;
                            /* relay latency: from the generator's actual send (its own lag excluded) */
                            sched = sent_at[(size_t)(ssrc - 1) * 64 + (kk & 63)];
                            lat = (t - sched) / 10000;
                            if (lat < 0)
                                lat = 0;
                            hist[lat > HBINS ? HBINS : lat]++;
                        }
                    }
                if (got)
                    continue;
            }
            {
                int64_t wait = next_slot < end ? next_slot - now_ns() : 200000;
                if (wait > 200000)
                    wait = 200000;   /* poll the receive sockets at least every 0.2 ms */
                if (wait > 0) {
                    struct timespec ts = {0, (long)wait};
                    nanosleep(&ts, NULL);
                }
            }
        }
    }
    {
        struct rusage ru;
        double p50 = -1, p99 = -1, p999 = -1, mx = -1;
        uint64_t acc = 0, over20 = 0;
        for (int i = 0; i <= HBINS; i++) {
            acc += hist[i];
            if (hist[i])
                mx = i / 100.0;
            if (i >= 2000)
                over20 += hist[i];
            if (p50 < 0 && acc * 2 >= recvd_measured && recvd_measured)
                p50 = i / 100.0;
            if (p99 < 0 && acc * 100 >= recvd_measured * 99 && recvd_measured)
                p99 = i / 100.0;
            if (p999 < 0 && acc * 1000 >= recvd_measured * 999 && recvd_measured)
                p999 = i / 100.0;
        }
        getrusage(RUSAGE_SELF, &ru);
        printf("{\"calls\": %d, \"seconds\": %.1f, \"warmup\": %.1f, \"sent\": %llu, \"sent_measured\": %llu, "
               "\"received\": %llu, \"received_measured\": %llu, \"loss_pct\": %.5f, \"latency_p50_ms\": %.2f, "
               "\"latency_p99_ms\": %.2f, \"latency_p999_ms\": %.2f, \"latency_max_ms\": %.2f, "
               "\"over_20ms\": %llu, \"send_errors\": %llu, \"generator_lag_max_ms\": %.2f, \"generator_cpu_s\": %.3f}\n",
               ncalls, seconds, warmup, (unsigned long long)sent, (unsigned long long)sent_measured,
               (unsigned long long)recvd, (unsigned long long)recvd_measured,
               relay && sent_measured ? 100.0 * (1.0 - (double)recvd_measured / (double)sent_measured) : 0.0,
               p50, p99, p999, mx, (unsigned long long)over20, (unsigned long long)send_err, lag_max / 1e6,
               ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6);
    }
    return 0;
}
