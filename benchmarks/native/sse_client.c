/*
 * sse_client: keeps N SSE streams open against one URL for a given time and
 * reports time to first event and events per second, as JSON on stdout.
 *
 * Why not wrk: wrk times whole responses; a token stream's figure of merit
 * is when its first event arrives and how many events per second get
 * through. Why C: so that the load generator costs little next to the proxy
 * it drives (its own CPU time is in the report, and the benchmark drives the
 * backend directly too, to show the ceiling).
 *
 *   sse_client --port P --path /v1/chat/completions --body JSON
 *              [--host 127.0.0.1] [--streams 32] [--duration 3] [--drain 15] [--header "K: V"]...
 *
 * Each stream is one POST on a fresh connection, read to its end (chunked,
 * Content-Length or close-delimited), then a new one starts in its place
 * until the duration is over. Events per second count the events received
 * within the duration (all N streams running); the streams running then are
 * read to their end for at most --drain seconds more (default 15), so that a
 * slow proxy's first events still count towards time to first event, and
 * the rest are cut. An event is a line starting with "data:" (so
 * "data: [DONE]" counts too).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

enum framing { UNKNOWN, CHUNKED, LENGTH, UNTIL_CLOSE };
enum chunk_state { SIZE, DATA, DATA_END, TRAILER, FINISHED };

struct stream {
    int fd;
    int sent;
    double started;
    int got_first;
    char head[8192];
    size_t head_len;
    int headers_done;
    enum framing framing;
    long remaining;          /* LENGTH: body bytes left */
    enum chunk_state cstate; /* CHUNKED decoder */
    long chunk_left;
    int size_done;           /* SIZE: past the hex digits */
    int trailer_nl;          /* TRAILER: consecutive line ends seen */
    int match;               /* progress through "data:" at a line start, -1: none */
};

static struct sockaddr_in addr;
static char request[65536];
static size_t request_len;
static int epfd;
static long events_total, streams_done, errors;
static double *ttfc;
static size_t ttfc_len, ttfc_cap;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void count_events(struct stream *s, const char *p, size_t n) {
    static const char tag[] = "data:";
    if (n && !s->got_first) {
        s->got_first = 1;
        if (ttfc_len == ttfc_cap) {
            ttfc_cap = ttfc_cap ? ttfc_cap * 2 : 1024;
            ttfc = realloc(ttfc, ttfc_cap * sizeof *ttfc);
            if (!ttfc) exit(1);
        }
        ttfc[ttfc_len++] = now() - s->started;
    }
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (s->match >= 0) {
            if (c == tag[s->match]) {
                if (++s->match == 5) {
                    events_total++;
                    s->match = -1;
                }
            } else {
                s->match = -1;
            }
        }
        if (c == '\n') s->match = 0;
    }
}

/* Feed body bytes through the framing; 1 when the response is complete. */
static int feed_body(struct stream *s, const char *p, size_t n) {
    if (s->framing == UNTIL_CLOSE) {
        count_events(s, p, n);
        return 0;
    }
    if (s->framing == LENGTH) {
        size_t take = (size_t)s->remaining < n ? (size_t)s->remaining : n;
        count_events(s, p, take);
        s->remaining -= (long)take;
        return s->remaining == 0;
    }
    size_t i = 0;
    while (i < n) {
        char c = p[i];
        switch (s->cstate) {
        case SIZE: /* hex digits, then maybe ";ext" and CR, up to LF */
            i++;
            if (c == '\n') {
                s->cstate = s->chunk_left ? DATA : TRAILER;
                s->trailer_nl = 1;
            } else if (!s->size_done && c >= '0' && c <= '9') {
                s->chunk_left = s->chunk_left * 16 + (c - '0');
            } else if (!s->size_done && (c | 32) >= 'a' && (c | 32) <= 'f') {
                s->chunk_left = s->chunk_left * 16 + ((c | 32) - 'a' + 10);
            } else {
                s->size_done = 1;
            }
            break;
        case DATA: {
            size_t take = (size_t)s->chunk_left < n - i ? (size_t)s->chunk_left : n - i;
            count_events(s, p + i, take);
            s->chunk_left -= (long)take;
            i += take;
            if (s->chunk_left == 0) s->cstate = DATA_END;
            break;
        }
        case DATA_END: /* the CRLF after a chunk's data */
            i++;
            if (c == '\n') {
                s->cstate = SIZE;
                s->chunk_left = 0;
                s->size_done = 0;
            }
            break;
        case TRAILER: /* after the last chunk: trailers, then an empty line */
            i++;
            if (c == '\n') {
                if (s->trailer_nl) {
                    s->cstate = FINISHED;
                    return 1;
                }
                s->trailer_nl = 1;
            } else if (c != '\r') {
                s->trailer_nl = 0;
            }
            break;
        case FINISHED:
            return 1;
        }
    }
    return s->cstate == FINISHED;
}

/* Parse the status line and framing headers: where the body starts, -1 when
   the head is incomplete, -2 when the status is not 200. */
static long parse_head(struct stream *s) {
    char *eoh = memmem(s->head, s->head_len, "\r\n\r\n", 4);
    if (!eoh) return -1;
    *eoh = 0;
    s->headers_done = 1;
    if (strncmp(s->head, "HTTP/1.1 200", 12) != 0 && strncmp(s->head, "HTTP/1.0 200", 12) != 0) {
        static int shown;
        if (shown++ < 3) fprintf(stderr, "sse_client: stream answered %.60s\n", s->head);
        return -2;
    }
    s->framing = UNTIL_CLOSE;
    for (char *line = strchr(s->head, '\n'); line; line = strchr(line + 1, '\n')) {
        if (strncasecmp(line + 1, "transfer-encoding:", 18) == 0 && strcasestr(line, "chunked")) {
            s->framing = CHUNKED;
        } else if (strncasecmp(line + 1, "content-length:", 15) == 0 && s->framing != CHUNKED) {
            s->framing = LENGTH;
            s->remaining = strtol(line + 16, NULL, 10);
        }
    }
    return (eoh + 4) - s->head;
}

static void start_stream(struct stream *s) {
    memset(s, 0, sizeof *s);
    s->match = 0;
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        perror("socket");
        exit(1);
    }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    s->started = now();
    if (connect(s->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        perror("connect");
        exit(1);
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = s};
    epoll_ctl(epfd, EPOLL_CTL_ADD, s->fd, &ev);
}

static void finish_stream(struct stream *s, int ok) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, s->fd, NULL);
    close(s->fd);
    s->fd = -1;
    if (ok) streams_done++;
    else errors++;
}

/* Handle readiness; 1 when the stream ended. */
static int on_event(struct stream *s, uint32_t what) {
    if (!s->sent && (what & EPOLLOUT)) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || write(s->fd, request, request_len) != (ssize_t)request_len) {
            finish_stream(s, 0);
            return 1;
        }
        s->sent = 1;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
        epoll_ctl(epfd, EPOLL_CTL_MOD, s->fd, &ev);
        return 0;
    }
    char buf[65536];
    for (;;) {
        ssize_t n = read(s->fd, buf, sizeof buf);
        if (n == 0) {
            finish_stream(s, s->headers_done && s->framing == UNTIL_CLOSE);
            return 1;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            if (errno == EINTR) continue;
            finish_stream(s, 0);
            return 1;
        }
        const char *body = buf;
        size_t body_len = (size_t)n;
        if (!s->headers_done) {
            size_t room = sizeof s->head - 1 - s->head_len;
            size_t take = (size_t)n < room ? (size_t)n : room;
            memcpy(s->head + s->head_len, buf, take);
            s->head_len += take;
            long at = parse_head(s);
            if (at == -2) {
                finish_stream(s, 0);
                return 1;
            }
            if (at < 0) {
                if (s->head_len >= sizeof s->head - 1) {
                    finish_stream(s, 0);
                    return 1;
                }
                continue;
            }
            size_t consumed_before = s->head_len - take;
            body = buf + ((size_t)at - consumed_before);
            body_len = (size_t)n - ((size_t)at - consumed_before);
        }
        if (body_len && feed_body(s, body, body_len)) {
            finish_stream(s, 1);
            return 1;
        }
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p) {
    if (!ttfc_len) return -1;
    size_t i = (size_t)(p / 100 * (double)(ttfc_len - 1) + 0.5);
    return ttfc[i];
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *path = "/v1/chat/completions", *body = NULL;
    int port = 0, n_streams = 32;
    double duration = 3, drain = 15;
    char extra[4096] = "";
    size_t extra_len = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--path")) path = argv[i + 1];
        else if (!strcmp(argv[i], "--body")) body = argv[i + 1];
        else if (!strcmp(argv[i], "--streams")) n_streams = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--duration")) duration = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--drain")) drain = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--header"))
            extra_len += (size_t)snprintf(extra + extra_len, sizeof extra - extra_len, "%s\r\n", argv[i + 1]);
        else {
            fprintf(stderr, "sse_client: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!port || !body || n_streams < 1) {
        fprintf(stderr, "usage: sse_client --port P --body JSON [--host H] [--path P] [--streams N] "
                        "[--duration S] [--drain S] [--header 'K: V']...\n");
        return 2;
    }
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "sse_client: --host %s is not an IPv4 address\n", host);
        return 2;
    }
    request_len = (size_t)snprintf(request, sizeof request,
                                   "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                                   "Accept: text/event-stream\r\n%sContent-Length: %zu\r\n\r\n%s",
                                   path, host, port, extra, strlen(body), body);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct stream *streams = calloc((size_t)n_streams, sizeof *streams);
    double t0 = now(), deadline = t0 + duration, hard_stop = deadline + drain;
    for (int i = 0; i < n_streams; i++) start_stream(&streams[i]);
    int running = n_streams;
    long events_in_window = -1;
    struct epoll_event evs[256];
    for (;;) {
        double t = now();
        if (events_in_window < 0 && t >= deadline) events_in_window = events_total;
        if (running == 0 || t >= hard_stop) break;
        double until = events_in_window < 0 ? deadline : hard_stop;
        int n = epoll_wait(epfd, evs, 256, (int)((until - t) * 1000) + 1);
        for (int i = 0; i < n; i++) {
            struct stream *s = evs[i].data.ptr;
            if (s->fd < 0 || !on_event(s, evs[i].events)) continue;
            if (now() < deadline) start_stream(s);
            else running--;
        }
    }
    if (events_in_window < 0) events_in_window = events_total;
    qsort(ttfc, ttfc_len, sizeof *ttfc, cmp_double);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
                 (double)ru.ru_stime.tv_usec / 1e6;
    printf("{\"streams\": %ld, \"events\": %ld, \"events_in_window\": %ld, \"window_s\": %.6f, "
           "\"errors\": %ld, \"cut\": %d, \"ttfc_p50_ms\": %.3f, \"ttfc_p99_ms\": %.3f, \"cpu_s\": %.6f}\n",
           streams_done, events_total, events_in_window, duration, errors, running, pct(50) * 1000,
           pct(99) * 1000, cpu);
    return errors ? 1 : 0;
}
