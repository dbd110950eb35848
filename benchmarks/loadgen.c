/* TLS load generator for the tlsproxy benchmarks: C, OpenSSL, epoll, one
 * event loop per worker process (-P), results in shared memory, one JSON line
 * on stdout.
 *
 *   loadgen MODE -p PORT [options]
 *
 * MODE
 *   hs     closed loop of new connections: connect, full TLS 1.3 handshake
 *          (no session reuse, tickets off), write "Ex", read "x", close_notify,
 *          close. One op = one such connection.
 *   smtp   closed loop of SMTP STARTTLS sessions: greeting, EHLO, STARTTLS,
 *          handshake, EHLO, [MAIL FROM, RCPT TO with --mail], QUIT. One op = one
 *          session.
 *   bulk   -c long-lived TLS connections streaming one way (--dir up: client
 *          writes to the backend's sink; --dir down: the backend's source
 *          writes to the client). Reports MB/s of application data.
 *   idle   open -n connections (handshake + one echo each), print "READY n",
 *          hold them until a line arrives on stdin, then close them all.
 *   plain  like hs without TLS (against the backend itself: the cost of the
 *          TCP connections alone).
 *   lat    -c established connections; open-loop requests of -s bytes at a
 *          fixed total rate -r (req/s), echoed back; latency is measured from
 *          each request's scheduled send time (no coordinated omission).
 *
 * Options: -h HOST (127.0.0.1) -p PORT -c CONCURRENCY -P PROCESSES
 *          -d SECONDS (measured) -w SECONDS (warm-up, not measured)
 *          -n COUNT (idle) -r RATE (lat) -s SIZE (lat message bytes)
 *          --dir up|down (bulk) --mail (smtp) --tls12 (allow TLS 1.2)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { M_HS, M_SMTP, M_BULK, M_IDLE, M_LAT, M_PLAIN };

enum {
    S_CONNECTING,
    S_PLAIN_REPLY,  /* reading a plaintext SMTP reply */
    S_HANDSHAKE,
    S_TLS_WRITE,    /* writing c->wbuf over TLS, then c->after_write */
    S_TLS_REPLY,    /* reading a TLS SMTP reply */
    S_ECHO,         /* reading c->want echo bytes */
    S_BULK_UP,
    S_BULK_DOWN,
    S_IDLE,
    S_LAT,
    S_PLAIN_ECHO,   /* plain mode: reading the echoed byte without TLS */
};

/* ------------------------------------------------------------ options */

static int mode = -1;
static const char *host = "127.0.0.1";
static int port = 0;
static int conc = 16;
static int procs = 1;
static double duration = 5, warmup = 1;
static long count = 100;
static double rate = 1000;
static int msg_size = 64;
static int dir_up = 1;
static int smtp_mail = 0;
static int allow_tls12 = 0;

/* ------------------------------------------------------------ shared results */

struct result {
    uint64_t ops, bytes, errors, established, nsamples, dropped;
    volatile int ready;
    char first_error[160];
    char tls[96];           /* version/cipher/group of the first handshake */
};

struct control {
    volatile int release;
    double t_start, t_window0, t_window1;  /* CLOCK_MONOTONIC seconds */
};

static struct control *ctl;
static struct result *results;  /* procs of them */
static float *samples_all;      /* procs * max_samples (µs) */
static long max_samples;

/* ------------------------------------------------------------ per process */

struct conn {
    int fd;
    SSL *ssl;
    int state;
    int after_write;        /* state after S_TLS_WRITE */
    const char *wbuf;
    int wlen;
    char rbuf[2048];
    int rlen;
    int expect;             /* expected SMTP reply code */
    int step;               /* SMTP step */
    int want;               /* S_ECHO: bytes still expected */
    unsigned events;
    /* lat */
    double *ring;
    int ring_head, ring_len, to_send;
    long rx_acc;
};

static int ep;
static SSL_CTX *ctx;
static struct sockaddr_in addr;
static struct result *res;
static float *samples;
static double now_s;
static int stopping;
static long in_flight;
static long to_start;       /* connections to open on the next loop turn */
static long started_total;
static long target_total;  /* idle: connections this process opens */
static struct conn **lat_conns;
static int lat_nconns;
static char bulk_buf[16384];
static char lat_msg[65536];
static char scratch[65536];

#define RING 4096

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int in_window(void) { return now_s >= ctl->t_window0 && now_s < ctl->t_window1; }

static void note_error(const char *what) {
    res->errors++;
    if (!res->first_error[0]) {
        unsigned long e = ERR_peek_error();
        char buf[120] = "";
        if (e) ERR_error_string_n(e, buf, sizeof buf);
        snprintf(res->first_error, sizeof res->first_error, "%s %s%s", what, buf,
                 errno ? strerror(errno) : "");
    }
    ERR_clear_error();
}

static void set_events(struct conn *c, unsigned ev) {
    if (c->events == ev) return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
    c->events = ev;
}

static void start_conn(void);

static void conn_free(struct conn *c, int polite) {
    if (c->ssl) {
        if (polite) SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
    }
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->ring);
    free(c);
    in_flight--;
}

/* A connection is finished (ok) or failed: replace it in closed-loop modes. */
static void conn_end(struct conn *c, int ok) {
    if (!ok) {
        note_error(c->state == S_CONNECTING ? "connect" : c->state == S_HANDSHAKE ? "handshake" : "io");
    } else if (in_window()) {
        res->ops++;
    }
    if (mode == M_LAT) {
        for (int i = 0; i < lat_nconns; i++)
            if (lat_conns[i] == c) { lat_conns[i] = lat_conns[--lat_nconns]; break; }
    }
    conn_free(c, ok);
    /* closed loop: replace it (from the main loop, never recursively) */
    if (mode == M_HS || mode == M_SMTP || mode == M_PLAIN) to_start++;
    /* idle: retry a failed connection, but not forever (a proxy at its limit) */
    if (mode == M_IDLE && !ok && res->errors <= (uint64_t)(target_total / 10 + 100)) {
        started_total--;
        to_start++;
    }
    if (mode == M_IDLE && !ok && !to_start && in_flight <= 0) res->ready = 1;  /* gave up */
}

static void start_conn(void) {
    if (mode == M_IDLE) {
        if (started_total >= target_total) return;
        started_total++;
    }
    struct conn *c = calloc(1, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) { note_error("socket"); free(c); return; }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    in_flight++;
    c->state = S_CONNECTING;
    c->events = EPOLLOUT;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        conn_end(c, 0);
    }
}

/* Read one complete SMTP reply into c->rbuf: 1 done, 0 need input, -1 error. */
static int smtp_reply(struct conn *c, int tls) {
    for (;;) {
        /* look for a final line "ddd " in the buffer */
        char *p = c->rbuf, *end = c->rbuf + c->rlen;
        while (p < end) {
            char *nl = memchr(p, '\n', end - p);
            if (!nl) break;
            if (nl - p >= 3 && (p[3] == ' ' || p + 3 == nl - 1 || p + 3 == nl)) {
                int code = atoi(p);
                int rest = (int)(end - (nl + 1));
                memmove(c->rbuf, nl + 1, rest);
                c->rlen = rest;
                return code == c->expect ? 1 : -1;
            }
            p = nl + 1;
        }
        if (c->rlen >= (int)sizeof c->rbuf - 1) return -1;
        int r;
        if (tls) {
            r = SSL_read(c->ssl, c->rbuf + c->rlen, sizeof c->rbuf - 1 - c->rlen);
            if (r <= 0) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ) { set_events(c, EPOLLIN); return 0; }
                if (err == SSL_ERROR_WANT_WRITE) { set_events(c, EPOLLOUT); return 0; }
                return -1;
            }
        } else {
            r = (int)recv(c->fd, c->rbuf + c->rlen, sizeof c->rbuf - 1 - c->rlen, 0);
            if (r < 0 && errno == EAGAIN) { set_events(c, EPOLLIN); return 0; }
            if (r <= 0) return -1;
        }
        c->rlen += r;
    }
}

static int plain_send(struct conn *c, const char *s) {
    size_t n = strlen(s);
    return send(c->fd, s, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static void tls_write(struct conn *c, const char *buf, int len, int next) {
    c->wbuf = buf;
    c->wlen = len;
    c->after_write = next;
    c->state = S_TLS_WRITE;
}

static const char *smtp_tls_steps[4][2];
static int smtp_tls_codes[4];
static int smtp_nsteps;

/* Advance a connection as far as it goes without blocking. */
static void advance(struct conn *c) {
    for (;;) {
        switch (c->state) {
        case S_CONNECTING: {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) { errno = err; return conn_end(c, 0); }
            if (mode == M_PLAIN) {
                if (plain_send(c, "Ex")) return conn_end(c, 0);
                c->state = S_PLAIN_ECHO;
                set_events(c, EPOLLIN);
                continue;
            }
            if (mode == M_SMTP) {
                c->state = S_PLAIN_REPLY;
                c->step = 0;
                c->expect = 220;
                set_events(c, EPOLLIN);
                continue;
            }
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_connect_state(c->ssl);
            c->state = S_HANDSHAKE;
            continue;
        }
        case S_PLAIN_ECHO: {
            ssize_t r = recv(c->fd, scratch, 1, 0);
            if (r < 0 && errno == EAGAIN) return;
            return conn_end(c, r == 1);
        }
        case S_PLAIN_REPLY: {
            int r = smtp_reply(c, 0);
            if (r == 0) return;
            if (r < 0) return conn_end(c, 0);
            if (c->step == 0) {           /* greeting */
                if (plain_send(c, "EHLO loadgen.bench\r\n")) return conn_end(c, 0);
                c->expect = 250;
            } else if (c->step == 1) {    /* EHLO */
                if (plain_send(c, "STARTTLS\r\n")) return conn_end(c, 0);
                c->expect = 220;
            } else {                      /* 220 ready to start TLS */
                if (c->rlen) return conn_end(c, 0);  /* nothing may follow */
                c->ssl = SSL_new(ctx);
                SSL_set_fd(c->ssl, c->fd);
                SSL_set_connect_state(c->ssl);
                c->state = S_HANDSHAKE;
                c->step = 0;
                continue;
            }
            c->step++;
            continue;
        }
        case S_HANDSHAKE: {
            int r = SSL_do_handshake(c->ssl);
            if (r != 1) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ) return set_events(c, EPOLLIN);
                if (err == SSL_ERROR_WANT_WRITE) return set_events(c, EPOLLOUT);
                return conn_end(c, 0);
            }
            if (!res->tls[0]) {
                int nid = SSL_get_negotiated_group(c->ssl);
                const char *g = OBJ_nid2sn(nid & ~TLSEXT_nid_unknown);
                snprintf(res->tls, sizeof res->tls, "%s %s %s", SSL_get_version(c->ssl),
                         SSL_get_cipher_name(c->ssl), g ? g : "?");
            }
            switch (mode) {
            case M_SMTP:
                c->expect = smtp_tls_codes[0];
                tls_write(c, smtp_tls_steps[0][0], (int)strlen(smtp_tls_steps[0][0]), S_TLS_REPLY);
                break;
            case M_HS:
            case M_IDLE:
                c->want = 1;
                tls_write(c, "Ex", 2, S_ECHO);
                break;
            case M_BULK:
                res->established++;
                tls_write(c, dir_up ? "S" : "D", 1, dir_up ? S_BULK_UP : S_BULK_DOWN);
                break;
            case M_LAT:
                res->established++;
                c->ring = calloc(RING, sizeof(double));
                lat_conns[lat_nconns++] = c;
                tls_write(c, "E", 1, S_LAT);
                break;
            }
            continue;
        }
        case S_TLS_WRITE: {
            int r = SSL_write(c->ssl, c->wbuf, c->wlen);
            if (r <= 0) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ) return set_events(c, EPOLLIN);
                if (err == SSL_ERROR_WANT_WRITE) return set_events(c, EPOLLOUT);
                return conn_end(c, 0);
            }
            c->state = c->after_write;
            set_events(c, EPOLLIN);
            continue;
        }
        case S_TLS_REPLY: {
            int r = smtp_reply(c, 1);
            if (r == 0) return;
            if (r < 0) return conn_end(c, 0);
            if (++c->step >= smtp_nsteps) return conn_end(c, 1);
            c->expect = smtp_tls_codes[c->step];
            tls_write(c, smtp_tls_steps[c->step][0], (int)strlen(smtp_tls_steps[c->step][0]), S_TLS_REPLY);
            continue;
        }
        case S_ECHO: {
            int r = SSL_read(c->ssl, scratch, c->want);
            if (r <= 0) {
                int err = SSL_get_error(c->ssl, r);
                if (err == SSL_ERROR_WANT_READ) return set_events(c, EPOLLIN);
                if (err == SSL_ERROR_WANT_WRITE) return set_events(c, EPOLLOUT);
                return conn_end(c, 0);
            }
            c->want -= r;
            if (c->want > 0) continue;
            if (mode == M_HS) return conn_end(c, 1);
            /* idle: established and held */
            c->state = S_IDLE;
            res->established++;
            in_flight--;  /* no longer establishing */
            if (res->established >= (uint64_t)target_total) res->ready = 1;
            else to_start++;
            set_events(c, EPOLLIN);
            return;
        }
        case S_IDLE: {
            int r = SSL_read(c->ssl, scratch, sizeof scratch);
            if (r > 0) continue;
            int err = SSL_get_error(c->ssl, r);
            if (err == SSL_ERROR_WANT_READ) return;
            in_flight++;
            res->established--;
            res->ready = 0;
            note_error("idle connection closed by peer");
            conn_free(c, 0);
            return;
        }
        case S_BULK_UP: {
            for (;;) {
                int r = SSL_write(c->ssl, bulk_buf, sizeof bulk_buf);
                if (r <= 0) {
                    int err = SSL_get_error(c->ssl, r);
                    if (err == SSL_ERROR_WANT_WRITE) return set_events(c, EPOLLOUT);
                    if (err == SSL_ERROR_WANT_READ) return set_events(c, EPOLLIN);
                    return conn_end(c, 0);
                }
                now_s = mono();
                if (in_window()) res->bytes += r;
                if (now_s >= ctl->t_window1) return;
            }
        }
        case S_BULK_DOWN: {
            for (;;) {
                int r = SSL_read(c->ssl, scratch, sizeof scratch);
                if (r <= 0) {
                    int err = SSL_get_error(c->ssl, r);
                    if (err == SSL_ERROR_WANT_READ) return set_events(c, EPOLLIN);
                    if (err == SSL_ERROR_WANT_WRITE) return set_events(c, EPOLLOUT);
                    return conn_end(c, 0);
                }
                now_s = mono();
                if (in_window()) res->bytes += r;
                if (now_s >= ctl->t_window1) return;
            }
        }
        case S_LAT: {
            /* write what is due */
            while (c->to_send > 0) {
                int r = SSL_write(c->ssl, lat_msg, msg_size);
                if (r <= 0) {
                    int err = SSL_get_error(c->ssl, r);
                    if (err == SSL_ERROR_WANT_WRITE) { set_events(c, EPOLLIN | EPOLLOUT); break; }
                    if (err == SSL_ERROR_WANT_READ) break;
                    return conn_end(c, 0);
                }
                c->to_send--;
            }
            if (c->to_send == 0) set_events(c, EPOLLIN);
            /* read what came back */
            for (;;) {
                int r = SSL_read(c->ssl, scratch, sizeof scratch);
                if (r <= 0) {
                    int err = SSL_get_error(c->ssl, r);
                    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
                    return conn_end(c, 0);
                }
                c->rx_acc += r;
                double t = mono();
                while (c->rx_acc >= msg_size && c->ring_len > 0) {
                    c->rx_acc -= msg_size;
                    double sched = c->ring[c->ring_head];
                    c->ring_head = (c->ring_head + 1) % RING;
                    c->ring_len--;
                    if (sched >= ctl->t_window0 && sched < ctl->t_window1) {
                        res->ops++;
                        if (res->nsamples < (uint64_t)max_samples)
                            samples[res->nsamples++] = (float)((t - sched) * 1e6);
                    }
                }
            }
        }
        }
    }
}

static void lat_tick(int tfd, double *next_sched, double interval, long *rr) {
    uint64_t k;
    if (read(tfd, &k, sizeof k) != sizeof k) return;
    now_s = mono();
    while (*next_sched <= now_s) {
        double sched = *next_sched;
        *next_sched += interval;
        if (lat_nconns == 0) continue;
        struct conn *c = lat_conns[(*rr)++ % lat_nconns];
        if (c->ring_len >= RING) { res->dropped++; continue; }
        c->ring[(c->ring_head + c->ring_len) % RING] = sched;
        c->ring_len++;
        c->to_send++;
        advance(c);
    }
}

static void worker(int idx) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);  /* never outlive the parent */
    res = &results[idx];
    samples = samples_all + (size_t)idx * max_samples;
    ep = epoll_create1(0);
    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, allow_tls12 ? TLS1_2_VERSION : TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    if (mode == M_IDLE) SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);

    int my_conc = conc / procs + (idx < conc % procs);
    if (mode == M_IDLE) {
        target_total = count / procs + (idx < count % procs);
        if (my_conc > target_total) my_conc = (int)target_total;
    }
    if (my_conc < 1 && mode != M_IDLE) my_conc = 1;
    lat_conns = calloc(my_conc + 1, sizeof *lat_conns);

    if (mode == M_IDLE && target_total == 0) res->ready = 1;
    /* wait for the common start */
    while (mono() < ctl->t_start) usleep(1000);
    for (int i = 0; i < my_conc; i++) start_conn();

    int tfd = -1;
    double next_sched = 0, interval = 0;
    long rr = 0;
    if (mode == M_LAT) {
        double my_rate = rate / procs;
        interval = 1.0 / my_rate;
        /* first request once the connections had time to connect (warm-up) */
        next_sched = ctl->t_start + 0.25;
        tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
        long ns = (long)(interval * 1e9);
        if (ns < 20000) ns = 20000;
        struct itimerspec its = {.it_interval = {ns / 1000000000, ns % 1000000000},
                                 .it_value = {0, 1000000}};
        timerfd_settime(tfd, 0, &its, NULL);
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
        epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &e);
    }

    struct epoll_event evs[512];
    double drain_deadline = 0;
    for (;;) {
        now_s = mono();
        if (mode == M_IDLE) {
            if (ctl->release) break;
            if (now_s > ctl->t_window1 && !res->ready) break;  /* gave up establishing */
        } else if (now_s >= ctl->t_window1) {
            if (mode == M_BULK || mode == M_LAT) break;
            if (!stopping) { stopping = 1; drain_deadline = now_s + 2.0; }
            if (in_flight <= 0 || now_s > drain_deadline) break;
        }
        /* at most one concurrency's worth of new connections per turn */
        for (long k = to_start < my_conc ? to_start : my_conc; k > 0 && !stopping; k--) {
            to_start--;
            start_conn();
        }
        int timeout = to_start > 0 && !stopping ? 1 : 50;
        int n = epoll_wait(ep, evs, 512, timeout);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.ptr == NULL) { lat_tick(tfd, &next_sched, interval, &rr); continue; }
            now_s = mono();
            advance(evs[i].data.ptr);
        }
    }
    _exit(0);
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static double pct(float *v, long n, double p) {
    if (n == 0) return 0;
    long i = (long)ceil(p / 100.0 * n) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return v[i];
}

static void usage(void) {
    fprintf(stderr, "usage: loadgen hs|smtp|bulk|idle|lat -p PORT [-h HOST] [-c N] [-P N] [-d S] [-w S]"
                    " [-n N] [-r RATE] [-s SIZE] [--dir up|down] [--mail] [--tls12]\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *m = argv[1];
    mode = !strcmp(m, "hs") ? M_HS : !strcmp(m, "smtp") ? M_SMTP : !strcmp(m, "bulk") ? M_BULK
         : !strcmp(m, "idle") ? M_IDLE : !strcmp(m, "lat") ? M_LAT : !strcmp(m, "plain") ? M_PLAIN : -1;
    if (mode < 0) usage();
    static struct option lo[] = {{"dir", 1, 0, 'D'}, {"mail", 0, 0, 'M'}, {"tls12", 0, 0, 'T'}, {0}};
    int o;
    optind = 2;
    while ((o = getopt_long(argc, argv, "h:p:c:P:d:w:n:r:s:", lo, NULL)) != -1) {
        switch (o) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'c': conc = atoi(optarg); break;
        case 'P': procs = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'n': count = atol(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 's': msg_size = atoi(optarg); break;
        case 'D': dir_up = strcmp(optarg, "down") != 0; break;
        case 'M': smtp_mail = 1; break;
        case 'T': allow_tls12 = 1; break;
        default: usage();
        }
    }
    if (!port || procs < 1 || msg_size < 1 || msg_size > (int)sizeof lat_msg) usage();
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl = {1048576, 1048576};
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0) {
        getrlimit(RLIMIT_NOFILE, &rl);
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) usage();
    memset(bulk_buf, 'b', sizeof bulk_buf);
    memset(lat_msg, 'l', sizeof lat_msg);

    smtp_tls_steps[0][0] = "EHLO loadgen.bench\r\n"; smtp_tls_codes[0] = 250;
    smtp_nsteps = 1;
    if (smtp_mail) {
        smtp_tls_steps[smtp_nsteps][0] = "MAIL FROM:<bench@loadgen.bench>\r\n";
        smtp_tls_codes[smtp_nsteps++] = 250;
        smtp_tls_steps[smtp_nsteps][0] = "RCPT TO:<postmaster@backend.bench>\r\n";
        smtp_tls_codes[smtp_nsteps++] = 250;
    }
    smtp_tls_steps[smtp_nsteps][0] = "QUIT\r\n"; smtp_tls_codes[smtp_nsteps++] = 221;

    max_samples = mode == M_LAT ? (long)(rate / procs * (duration + 1)) + 1024 : 1;
    size_t shm = sizeof(struct control) + procs * sizeof(struct result)
               + (size_t)procs * max_samples * sizeof(float);
    char *mem = mmap(NULL, shm, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    ctl = (struct control *)mem;
    results = (struct result *)(mem + sizeof(struct control));
    samples_all = (float *)(mem + sizeof(struct control) + procs * sizeof(struct result));

    double t0 = mono();
    ctl->t_start = t0 + 0.05;
    if (mode == M_IDLE) {
        ctl->t_window0 = ctl->t_start;
        ctl->t_window1 = ctl->t_start + duration;  /* deadline to establish */
    } else {
        ctl->t_window0 = ctl->t_start + warmup;
        ctl->t_window1 = ctl->t_window0 + duration;
    }
    pid_t *pids = calloc(procs, sizeof *pids);
    for (int i = 0; i < procs; i++) {
        pids[i] = fork();
        if (pids[i] == 0) worker(i);
    }

    double established_at = 0;
    if (mode == M_IDLE) {
        for (;;) {
            int ready = 1;
            long est = 0;
            for (int i = 0; i < procs; i++) {
                ready &= results[i].ready;
                est += (long)results[i].established;
            }
            if (ready) break;
            if (mono() > ctl->t_window1 + 1) break;
            usleep(10000);
        }
        established_at = mono() - ctl->t_start;
        long est = 0;
        for (int i = 0; i < procs; i++) est += (long)results[i].established;
        printf("READY %ld %.3f\n", est, established_at);
        fflush(stdout);
        char line[64];
        if (!fgets(line, sizeof line, stdin)) { /* EOF also releases */ }
        ctl->release = 1;
    }
    for (int i = 0; i < procs; i++) waitpid(pids[i], NULL, 0);
    double wall = mono() - t0;
    struct rusage ru;
    getrusage(RUSAGE_CHILDREN, &ru);
    double cpu_user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    double cpu_sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;

    uint64_t ops = 0, bytes = 0, errors = 0, est = 0, ns = 0, dropped = 0;
    const char *first_error = "";
    const char *tls = results[0].tls;
    for (int i = 0; i < procs; i++) {
        ops += results[i].ops;
        bytes += results[i].bytes;
        errors += results[i].errors;
        est += results[i].established;
        dropped += results[i].dropped;
        if (!*first_error && results[i].first_error[0]) first_error = results[i].first_error;
    }
    /* gather latency samples */
    float *all = NULL;
    if (mode == M_LAT) {
        all = malloc(sizeof(float) * (procs * max_samples + 1));
        for (int i = 0; i < procs; i++) {
            memcpy(all + ns, samples_all + (size_t)i * max_samples, results[i].nsamples * sizeof(float));
            ns += results[i].nsamples;
        }
        qsort(all, ns, sizeof(float), cmp_float);
    }
    char esc[200];
    size_t j = 0;
    for (const char *p = first_error; *p && j < sizeof esc - 2; p++)
        if (*p != '"' && *p != '\\' && (unsigned char)*p >= 32) esc[j++] = *p;
    esc[j] = 0;
    printf("{\"mode\": \"%s\", \"ops\": %lu, \"window_s\": %.3f, \"rate\": %.2f, \"bytes\": %lu, "
           "\"mb_per_s\": %.3f, \"errors\": %lu, \"established\": %lu, \"establish_s\": %.3f, "
           "\"samples\": %lu, \"dropped\": %lu, \"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, "
           "\"p999_us\": %.1f, \"max_us\": %.1f, \"cpu_user_s\": %.3f, \"cpu_sys_s\": %.3f, "
           "\"wall_s\": %.3f, \"procs\": %d, \"tls\": \"%s\", \"first_error\": \"%s\"}\n",
           m, ops, duration, ops / duration, bytes, bytes / duration / 1e6, errors, est, established_at,
           ns, dropped, all ? pct(all, ns, 50) : 0, all ? pct(all, ns, 90) : 0, all ? pct(all, ns, 99) : 0,
           all ? pct(all, ns, 99.9) : 0, all && ns ? all[ns - 1] : 0, cpu_user, cpu_sys, wall, procs, tls, esc);
    return 0;
}
