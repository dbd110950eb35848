/* Plaintext benchmark backend: one epoll thread, two listeners.
 *
 *   backend TCP_PORT SMTP_PORT
 *
 * TCP_PORT: the first byte a client sends picks the mode of the connection
 *   'E'  echo every following byte back
 *   'S'  sink: read and discard everything
 *   'D'  source: send an endless stream of bytes, ignore input
 * SMTP_PORT: a minimal SMTP responder: 220 greeting; EHLO (multi-line 250,
 *   no STARTTLS), HELO, MAIL, RCPT, RSET, NOOP -> 250; QUIT -> 221 and close;
 *   anything else -> 502. Lines may be pipelined.
 *
 * Prints "READY" on stdout once both ports listen; runs until killed. It is a
 * stand-in for a legacy plaintext mail server that costs as little CPU as
 * possible, so that the contenders in front of it are what is measured.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536
#define PENDING_MAX (256 * 1024)

enum { K_LISTEN_TCP, K_LISTEN_SMTP, K_TCP, K_SMTP };
enum { M_NONE, M_ECHO, M_SINK, M_SOURCE };

struct conn {
    int fd;
    int kind;
    int mode;
    int closing;          /* SMTP: close once pending output is written */
    char *out;            /* pending output (echo backlog, SMTP replies) */
    size_t out_len, out_off, out_cap;
    char line[1024];      /* SMTP: partial command line */
    size_t line_len;
    unsigned events;
};

static int ep;
static char iobuf[BUF];
static char source_buf[BUF];

static const char EHLO_REPLY[] =
    "250-backend.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n";

static void die(const char *what) { perror(what); exit(1); }

static void set_events(struct conn *c, unsigned ev) {
    if (c->events == ev) return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) < 0) die("epoll_ctl mod");
    c->events = ev;
}

static void conn_close(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out);
    free(c);
}

static void queue_out(struct conn *c, const char *data, size_t n) {
    if (c->out_len + n > c->out_cap) {
        size_t cap = c->out_cap ? c->out_cap : 4096;
        while (cap < c->out_len + n) cap *= 2;
        c->out = realloc(c->out, cap);
        if (!c->out) die("realloc");
        c->out_cap = cap;
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
}

/* Write pending output; returns -1 if the connection died, 1 if all written. */
static int flush_out(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) return 0;
            return -1;
        }
        c->out_off += (size_t)w;
    }
    c->out_off = c->out_len = 0;
    return 1;
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(fd, 65535) < 0) die("listen");
    return fd;
}

static void smtp_line(struct conn *c, const char *l, size_t n) {
    char verb[8] = {0};
    size_t i;
    for (i = 0; i < n && i < 7 && l[i] != ' '; i++)
        verb[i] = (l[i] >= 'a' && l[i] <= 'z') ? l[i] - 32 : l[i];
#define R(s) queue_out(c, s, sizeof(s) - 1)
    if (!strcmp(verb, "EHLO")) R(EHLO_REPLY);
    else if (!strcmp(verb, "HELO")) R("250 backend.bench\r\n");
    else if (!strcmp(verb, "MAIL") || !strcmp(verb, "RCPT") || !strcmp(verb, "RSET") ||
             !strcmp(verb, "NOOP")) R("250 2.0.0 Ok\r\n");
    else if (!strcmp(verb, "QUIT")) { R("221 2.0.0 Bye\r\n"); c->closing = 1; }
    else R("502 5.5.2 Error: command not recognized\r\n");
#undef R
}

static void on_smtp(struct conn *c, unsigned ev) {
    if (ev & EPOLLIN && !c->closing) {
        for (;;) {
            ssize_t r = recv(c->fd, iobuf, BUF, 0);
            if (r == 0) { conn_close(c); return; }
            if (r < 0) {
                if (errno == EAGAIN) break;
                conn_close(c); return;
            }
            for (ssize_t i = 0; i < r && !c->closing; i++) {
                if (c->line_len < sizeof c->line) c->line[c->line_len++] = iobuf[i];
                if (iobuf[i] == '\n') {
                    size_t n = c->line_len;
                    while (n && (c->line[n - 1] == '\n' || c->line[n - 1] == '\r')) n--;
                    smtp_line(c, c->line, n);
                    c->line_len = 0;
                }
            }
            if (c->closing) break;
        }
    }
    int f = flush_out(c);
    if (f < 0 || (f == 1 && c->closing)) { conn_close(c); return; }
    set_events(c, f == 1 ? EPOLLIN : EPOLLOUT);
}

static void on_tcp(struct conn *c, unsigned ev) {
    if (c->mode == M_SOURCE) {
        for (;;) {
            ssize_t w = send(c->fd, source_buf, BUF, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN) break;
                conn_close(c); return;
            }
        }
        /* drain (and notice EOF on) anything the client sends */
        for (;;) {
            ssize_t r = recv(c->fd, iobuf, BUF, 0);
            if (r > 0) continue;
            if (r == 0 || errno != EAGAIN) { conn_close(c); return; }
            break;
        }
        (void)ev;
        return;
    }
    if (c->mode == M_ECHO && c->out_len) {
        int f = flush_out(c);
        if (f < 0) { conn_close(c); return; }
        if (f == 0) { set_events(c, EPOLLOUT); return; }
    }
    for (;;) {
        ssize_t r = recv(c->fd, iobuf, BUF, 0);
        if (r == 0) { conn_close(c); return; }
        if (r < 0) {
            if (errno == EAGAIN) break;
            conn_close(c); return;
        }
        char *p = iobuf;
        if (c->mode == M_NONE) {
            c->mode = p[0] == 'E' ? M_ECHO : p[0] == 'S' ? M_SINK : p[0] == 'D' ? M_SOURCE : -1;
            if (c->mode < 0) { conn_close(c); return; }
            p++; r--;
            if (c->mode == M_SOURCE) {
                set_events(c, EPOLLIN | EPOLLOUT | EPOLLET);
                on_tcp(c, 0);
                return;
            }
        }
        if (c->mode == M_ECHO && r > 0) {
            queue_out(c, p, (size_t)r);
            int f = flush_out(c);
            if (f < 0) { conn_close(c); return; }
            if (f == 0) {
                if (c->out_len - c->out_off > PENDING_MAX) { set_events(c, EPOLLOUT); return; }
            }
        }
    }
    set_events(c, c->out_len ? (EPOLLIN | EPOLLOUT) : EPOLLIN);
}

static void on_accept(int lfd, int kind) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);
        if (fd < 0) {
            if (errno == EAGAIN) return;
            if (errno == EMFILE || errno == ENFILE) { perror("accept"); return; }
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->kind = kind;
        c->events = EPOLLIN;
        struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) die("epoll_ctl add");
        if (kind == K_SMTP) {
            static const char greet[] = "220 backend.bench ESMTP legacy plaintext\r\n";
            queue_out(c, greet, sizeof greet - 1);
            on_smtp(c, 0);
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: backend TCP_PORT SMTP_PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    memset(source_buf, 'x', sizeof source_buf);
    ep = epoll_create1(0);
    static struct conn ltcp = {.kind = K_LISTEN_TCP}, lsmtp = {.kind = K_LISTEN_SMTP};
    ltcp.fd = listen_on(atoi(argv[1]));
    lsmtp.fd = listen_on(atoi(argv[2]));
    struct epoll_event e1 = {.events = EPOLLIN, .data.ptr = &ltcp};
    struct epoll_event e2 = {.events = EPOLLIN, .data.ptr = &lsmtp};
    epoll_ctl(ep, EPOLL_CTL_ADD, ltcp.fd, &e1);
    epoll_ctl(ep, EPOLL_CTL_ADD, lsmtp.fd, &e2);
    printf("READY\n");
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            unsigned ev = evs[i].events;
            switch (c->kind) {
            case K_LISTEN_TCP: on_accept(c->fd, K_TCP); break;
            case K_LISTEN_SMTP: on_accept(c->fd, K_SMTP); break;
            case K_TCP: on_tcp(c, ev); break;
            case K_SMTP: on_smtp(c, ev); break;
            }
        }
    }
}
