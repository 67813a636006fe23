/*
 * fixed_backend: a fixed-answer HTTP/1.1 server standing in for vLLM in the
 * proxy benchmark (benchmarks/proxy_overhead.py).
 *
 * Why C: the benchmark measures proxies, so the backend must cost a small
 * fraction of what a proxy costs per request; the `direct` row of the
 * benchmark shows that it does. One thread, epoll, keep-alive, no allocation
 * per request beyond the connection's buffers.
 *
 * It answers what llmux and the peers ask of a vLLM server:
 *   POST <any path>          a fixed chat completion (JSON, Content-Length);
 *                            with "stream": true in the body, an SSE stream of
 *                            --chunks events then "data: [DONE]", chunked
 *                            transfer encoding, one event per write and at most
 *                            one event per stream per turn of the loop (as a
 *                            server that flushes each token would)
 *   GET /health              200, empty
 *   GET /is_sleeping         {"is_sleeping": false}
 *   GET /v1/models           one model
 *
 * Command line: vLLM-style, so that llmux can launch it as a model command:
 *   fixed_backend [MODEL] [--host H] [--port P] [--served-model-name N] [--chunks N] [...]
 * unknown options are ignored.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_REQUEST (1 << 20)

struct conn {
    int fd;
    char *in;
    size_t in_len, in_cap;
    char *out;
    size_t out_len, out_off, out_cap;
    int chunks_left; /* events still to send on the current stream; -1: not streaming */
    int want_out;    /* EPOLLOUT is registered */
};

static int epfd;
static int chunks_per_stream = 200;
static char model[128] = "bench";
static char reply[1024];
static size_t reply_len;
static char event[512];
static size_t event_len;

static struct conn **conns; /* indexed by fd */
static int conns_cap;
static int *streams; /* fds of connections with a stream in progress */
static int n_streams, streams_cap;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void *xrealloc(void *p, size_t n) {
    p = realloc(p, n);
    if (!p) die("realloc");
    return p;
}

static void append(struct conn *c, const char *data, size_t n) {
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
}

static void close_conn(struct conn *c) {
    for (int i = 0; i < n_streams; i++)
        if (streams[i] == c->fd) {
            streams[i] = streams[--n_streams];
            break;
        }
    conns[c->fd] = NULL;
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
}

static void set_out_interest(struct conn *c, int want) {
    if (c->want_out == want) return;
    struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = want;
}

/* Write what is buffered; 0 when the connection is gone. */
static int flush(struct conn *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_out_interest(c, 1);
                return 1;
            }
            if (errno == EINTR) continue;
            close_conn(c);
            return 0;
        }
        c->out_off += (size_t)n;
    }
    c->out_off = c->out_len = 0;
    set_out_interest(c, 0);
    return 1;
}

static void respond(struct conn *c, const char *status, const char *type, const char *body, size_t n) {
    char head[256];
    int h = snprintf(head, sizeof head, "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n\r\n",
                     status, type, n);
    append(c, head, (size_t)h);
    append(c, body, n);
}

static int wants_stream(const char *body, size_t n) {
    const char *p = memmem(body, n, "\"stream\"", 8);
    if (!p) return 0;
    const char *end = body + n;
    p += 8;
    while (p < end && (*p == ' ' || *p == ':' || *p == '\t')) p++;
    return end - p >= 4 && memcmp(p, "true", 4) == 0;
}

static void start_stream(struct conn *c) {
    static const char head[] =
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        "Transfer-Encoding: chunked\r\n\r\n";
    append(c, head, sizeof head - 1);
    c->chunks_left = chunks_per_stream;
    if (n_streams == streams_cap) {
        streams_cap = streams_cap ? streams_cap * 2 : 64;
        streams = xrealloc(streams, sizeof(int) * (size_t)streams_cap);
    }
    streams[n_streams++] = c->fd;
}

/* Answer every complete request in the input buffer (stops while a stream runs). */
static void serve_requests(struct conn *c) {
    size_t used = 0;
    while (c->chunks_left < 0) {
        char *start = c->in + used;
        size_t avail = c->in_len - used;
        char *eoh = memmem(start, avail, "\r\n\r\n", 4);
        if (!eoh) break;
        size_t head_len = (size_t)(eoh - start) + 4;
        long body_len = 0;
        for (char *line = memchr(start, '\n', head_len); line && line < eoh; line = memchr(line + 1, '\n', (size_t)(eoh - line))) {
            if (strncasecmp(line + 1, "content-length:", 15) == 0) body_len = strtol(line + 16, NULL, 10);
            else if (strncasecmp(line + 1, "transfer-encoding:", 18) == 0) body_len = -1;
        }
        if (body_len < 0) { /* chunked request bodies are not needed by any client here */
            static const char msg[] = "{\"error\":\"chunked request bodies are not supported\"}";
            respond(c, "411 Length Required", "application/json", msg, sizeof msg - 1);
            if (flush(c)) close_conn(c);
            return;
        }
        if (avail < head_len + (size_t)body_len) break;
        char *body = start + head_len;
        used += head_len + (size_t)body_len;
        if (strncmp(start, "POST ", 5) == 0) {
            if (wants_stream(body, (size_t)body_len)) start_stream(c);
            else append(c, reply, reply_len);
        } else if (strncmp(start, "GET /health ", 12) == 0) {
            respond(c, "200 OK", "application/json", "", 0);
        } else if (strncmp(start, "GET /is_sleeping ", 17) == 0) {
            static const char msg[] = "{\"is_sleeping\": false}";
            respond(c, "200 OK", "application/json", msg, sizeof msg - 1);
        } else if (strncmp(start, "GET /v1/models ", 15) == 0) {
            char msg[256];
            int n = snprintf(msg, sizeof msg, "{\"object\":\"list\",\"data\":[{\"id\":\"%s\",\"object\":\"model\",\"owned_by\":\"bench\"}]}", model);
            respond(c, "200 OK", "application/json", msg, (size_t)n);
        } else {
            static const char msg[] = "{\"error\":\"not found\"}";
            respond(c, "404 Not Found", "application/json", msg, sizeof msg - 1);
        }
    }
    if (used) {
        memmove(c->in, c->in + used, c->in_len - used);
        c->in_len -= used;
    }
    flush(c);
}

static void on_readable(struct conn *c) {
    for (;;) {
        if (c->in_cap - c->in_len < 16384) {
            if (c->in_cap >= MAX_REQUEST) {
                close_conn(c);
                return;
            }
            c->in_cap = c->in_cap ? c->in_cap * 2 : 32768;
            c->in = xrealloc(c->in, c->in_cap);
        }
        ssize_t n = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
        if (n > 0) {
            c->in_len += (size_t)n;
            continue;
        }
        if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            close_conn(c);
            return;
        }
        if (errno == EINTR) continue;
        break;
    }
    serve_requests(c);
}

/* One event on every stream whose previous event has left the buffer. */
static void advance_streams(void) {
    static const char done[] = "e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n";
    for (int i = n_streams - 1; i >= 0; i--) {
        struct conn *c = conns[streams[i]];
        if (c->out_len) continue; /* backpressure: the client has not taken the last one */
        if (c->chunks_left > 0) {
            append(c, event, event_len);
            c->chunks_left--;
        } else {
            append(c, done, sizeof done - 1);
            c->chunks_left = -1;
            streams[i] = streams[--n_streams];
        }
        if (flush(c) && c->chunks_left < 0 && c->in_len) serve_requests(c);
    }
}

static void accept_all(int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (fd >= conns_cap) {
            int cap = fd * 2 + 64;
            conns = xrealloc(conns, sizeof(*conns) * (size_t)cap);
            memset(conns + conns_cap, 0, sizeof(*conns) * (size_t)(cap - conns_cap));
            conns_cap = cap;
        }
        struct conn *c = calloc(1, sizeof *c);
        if (!c) die("calloc");
        c->fd = fd;
        c->chunks_left = -1;
        conns[fd] = c;
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
    }
}

static void build_answers(void) {
    char body[768];
    int n = snprintf(body, sizeof body,
                     "{\"id\":\"chatcmpl-0\",\"object\":\"chat.completion\",\"created\":0,\"model\":\"%s\","
                     "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":"
                     "\"hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi hi \"},\"finish_reason\":\"length\"}],"
                     "\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":16,\"total_tokens\":17}}",
                     model);
    reply_len = (size_t)snprintf(reply, sizeof reply,
                                 "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
                                 n, body);
    char data[400];
    int d = snprintf(data, sizeof data,
                     "data: {\"id\":\"chatcmpl-0\",\"object\":\"chat.completion.chunk\",\"created\":0,\"model\":\"%s\","
                     "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"tok\"},\"finish_reason\":null}]}\n\n",
                     model);
    event_len = (size_t)snprintf(event, sizeof event, "%x\r\n%s\r\n", d, data);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 8000;
    for (int i = 1; i < argc; i++) {
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!next) break;
        if (!strcmp(argv[i], "--host")) host = argv[++i];
        else if (!strcmp(argv[i], "--port")) port = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--chunks")) chunks_per_stream = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--served-model-name")) snprintf(model, sizeof model, "%s", argv[++i]);
    }
    build_answers();
    signal(SIGPIPE, SIG_IGN);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) die("socket");
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "fixed_backend: --host %s is not an IPv4 address\n", host);
        return 2;
    }
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0) die("bind");
    if (listen(lfd, 4096) < 0) die("listen");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event lev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(epfd, EPOLL_CTL_ADD, lfd, &lev);
    printf("fixed_backend listening on %s:%d\n", host, port);
    fflush(stdout);

    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, n_streams ? 0 : -1);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                accept_all(lfd);
                continue;
            }
            struct conn *c = fd < conns_cap ? conns[fd] : NULL;
            if (!c) continue;
            if (events[i].events & (EPOLLERR | EPOLLHUP)) {
                close_conn(c);
                continue;
            }
            if ((events[i].events & EPOLLOUT) && !flush(c)) continue;
            if (events[i].events & EPOLLIN) on_readable(c);
        }
        if (n_streams) advance_streams();
    }
}
