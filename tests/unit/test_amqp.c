/*
 * test_amqp.c - common/amqp.c against a real RabbitMQ.
 *
 * Needs LONGRUN_AMQP_URL (exit 77 = skipped without it; the URL checks run
 * first either way).  Everything it creates is unique to its pid:
 *   longrun.q.t<pid>      the task queue under test (topology via lr_amqp_sync_declare)
 *   longrun.q.c<pid>      pre-declared as a classic queue to provoke PRECONDITION_FAILED
 *   longrun.test.dlx.<pid> a classic queue bound to the fanout longrun.dlx: it gets a
 *                         copy of every dead letter, so the test sees its own without
 *                         consuming the shared longrun.dead
 * and deletes them at exit (the tap queue also expires on its own).
 *
 * Reconnects are forced through an in-process TCP proxy (always) and from the
 * broker side with `rabbitmqctl close_connection`, using LONGRUN_RABBITMQCTL
 * (a command prefix) or else "$LONGRUN_SERVICES rabbitmqctl" (scripts/dev
 * test exports LONGRUN_SERVICES); skipped when neither is set or the node it
 * reaches does not show our connections.
 *
 * Waits scale with LONGRUN_TEST_TIMEOUT_MULTIPLIER (valgrind).
 */
#include "amqp.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <arpa/inet.h>

#include "log.h"
#include "testutil.h"

#define T_CONTAINS(hay, needle)                                                                   \
    do {                                                                                          \
        const char *_h = (hay), *_n = (needle);                                                   \
        if (_h == NULL || strstr(_h, _n) == NULL) {                                               \
            T_FAIL("%s contains %s: \"%s\" lacks \"%s\"", #hay, #needle, _h ? _h : "(null)", _n); \
        }                                                                                         \
    } while (0)

static uv_loop_t loop;
static uv_timer_t tick;
static long mult = 1;
static const char *url;
static char qshort[32], qfull[64], cshort[32], cfull[64], tapq[64];

static uint64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void tick_cb(uv_timer_t *t) { (void)t; }

/* Runs the loop until cond(arg) or timeout_ms (scaled) pass. */
static bool run_until(bool (*cond)(void *), void *arg, long timeout_ms) {
    uint64_t deadline = mono_ms() + (uint64_t)(timeout_ms * mult);
    while (!cond(arg) && mono_ms() < deadline) {
        uv_run(&loop, UV_RUN_ONCE);
    }
    return cond(arg);
}

static void run_for(long ms) {
    uint64_t deadline = mono_ms() + (uint64_t)ms;
    while (mono_ms() < deadline) {
        uv_run(&loop, UV_RUN_ONCE);
    }
}

/* ---- per-instance observations ---- */

#define MAXD 64
typedef struct obs {
    lr_amqp_t *a;
    const char *name;
    int connected; /* last on_state */
    int n_up, n_down;
    char detail[512];      /* last on_state detail */
    char down_detail[512]; /* last on_state(0) detail */
    bool auto_ack;         /* ack (and count) every delivery at once */
    size_t acked;
    lr_amqp_delivery_t *held[MAXD]; /* deliveries kept for inspection */
    size_t nheld;
    size_t total; /* deliveries seen */
    bool stopped;
} obs_t;

static void on_state(int connected, const char *detail, void *arg) {
    obs_t *o = arg;
    T_ASSERT(detail != NULL);
    o->connected = connected;
    snprintf(o->detail, sizeof(o->detail), "%s", detail);
    if (connected) {
        o->n_up++;
    } else {
        o->n_down++;
        snprintf(o->down_detail, sizeof(o->down_detail), "%s", detail);
    }
    fprintf(stderr, "[%s] on_state(%d, \"%s\")\n", o->name, connected, detail);
}

static void on_delivery(lr_amqp_delivery_t *d, void *arg) {
    obs_t *o = arg;
    o->total++;
    if (o->auto_ack) {
        T_EQ_INT(lr_amqp_ack(o->a, d), 0);
        o->acked++;
        lr_amqp_delivery_free(d);
        return;
    }
    if (o->nheld == MAXD) {
        T_FAIL("too many held deliveries");
    }
    o->held[o->nheld++] = d;
}

/* Removes and returns the first held delivery from queue q (or any if NULL). */
static lr_amqp_delivery_t *take(obs_t *o, const char *q) {
    for (size_t i = 0; i < o->nheld; i++) {
        if (q == NULL || strcmp(o->held[i]->queue, q) == 0) {
            lr_amqp_delivery_t *d = o->held[i];
            memmove(&o->held[i], &o->held[i + 1], (o->nheld - i - 1) * sizeof(o->held[0]));
            o->nheld--;
            return d;
        }
    }
    return NULL;
}

typedef struct want {
    obs_t *o;
    const char *queue;
    size_t n;
} want_t;

static bool has_held(void *arg) {
    want_t *w = arg;
    size_t n = 0;
    for (size_t i = 0; i < w->o->nheld; i++) {
        if (w->queue == NULL || strcmp(w->o->held[i]->queue, w->queue) == 0) {
            n++;
        }
    }
    return n >= w->n;
}

static lr_amqp_delivery_t *wait_delivery(obs_t *o, const char *queue, long ms) {
    want_t w = {o, queue, 1};
    if (!run_until(has_held, &w, ms)) {
        T_FAIL("no delivery from %s within %ld ms", queue ? queue : "any queue", ms);
    }
    return take(o, queue);
}

static bool is_up(void *arg) { return ((obs_t *)arg)->connected == 1; }

static bool is_stopped(void *arg) { return ((obs_t *)arg)->stopped; }

static void stopped_cb(void *arg) { ((obs_t *)arg)->stopped = true; }

static void start(obs_t *o, const char *name, const char *u, const char *const *consume, const char *const *declare) {
    char err[512] = "";
    lr_amqp_opts_t opts = {
        .url = u,
        .consume = consume,
        .declare = declare,
        .prefetch = 50,
        .delivery_limit = 0,
        .on_delivery = on_delivery,
        .on_state = on_state,
        .arg = o,
    };
    o->name = name;
    int rc = lr_amqp_start(&o->a, &loop, &opts, err, sizeof(err));
    if (rc != 0) {
        T_FAIL("lr_amqp_start(%s): %s: %s", name, lr_err_name(rc), err);
    }
}

static void stop(obs_t *o) {
    lr_amqp_stop(o->a, 5000, stopped_cb, o);
    if (!run_until(is_stopped, o, 20000)) {
        T_FAIL("%s did not stop", o->name);
    }
    while (o->nheld > 0) {
        lr_amqp_delivery_free(o->held[--o->nheld]);
    }
    o->a = NULL;
}

/* ---- publish outcomes ---- */

typedef struct confirms {
    size_t ok, eamqp, econn, eshutdown, other, total;
} confirms_t;

static void confirm_cb(int err, void *arg) {
    confirms_t *c = arg;
    c->total++;
    switch (err) {
    case 0: c->ok++; break;
    case LR_EAMQP: c->eamqp++; break;
    case LR_ECONN: c->econn++; break;
    case LR_ESHUTDOWN: c->eshutdown++; break;
    default: c->other++; break;
    }
}

typedef struct count_want {
    size_t *counter;
    size_t n;
} count_want_t;

static bool count_reached(void *arg) {
    count_want_t *w = arg;
    return *w->counter >= w->n;
}

/* ---- raw rabbitmq-c, for what longrun itself must never do ---- */

typedef struct raw {
    amqp_connection_state_t st;
} raw_t;

static void raw_check(raw_t *r, const char *what) {
    amqp_rpc_reply_t rep = amqp_get_rpc_reply(r->st);
    if (rep.reply_type != AMQP_RESPONSE_NORMAL) {
        T_FAIL("raw %s failed (reply type %d, library error %s)", what, rep.reply_type,
               amqp_error_string2(rep.library_error));
    }
}

static void raw_open(raw_t *r) {
    struct amqp_connection_info ci;
    char *copy = strdup(url);
    T_ASSERT(copy != NULL);
    T_EQ_INT(amqp_parse_url(copy, &ci), AMQP_STATUS_OK);
    if (ci.vhost[0] == '\0') {
        ci.vhost = "/";
    }
    r->st = amqp_new_connection();
    amqp_socket_t *s = ci.ssl ? amqp_ssl_socket_new(r->st) : amqp_tcp_socket_new(r->st);
    T_ASSERT(s != NULL);
    if (ci.ssl && getenv("LONGRUN_AMQP_CACERT") != NULL) {
        T_EQ_INT(amqp_ssl_socket_set_cacert(s, getenv("LONGRUN_AMQP_CACERT")), AMQP_STATUS_OK);
    }
    T_EQ_INT(amqp_socket_open(s, ci.host, ci.port), AMQP_STATUS_OK);
    amqp_rpc_reply_t rep = amqp_login(r->st, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, ci.password);
    T_EQ_INT(rep.reply_type, AMQP_RESPONSE_NORMAL);
    amqp_channel_open(r->st, 1);
    raw_check(r, "channel.open");
    free(copy);
}

static void raw_close(raw_t *r) {
    amqp_channel_close(r->st, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(r->st, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(r->st);
}

static void raw_publish(raw_t *r, const char *rk, const amqp_basic_properties_t *props, const void *body, size_t len) {
    amqp_bytes_t b = {.len = len, .bytes = (void *)body};
    T_EQ_INT(amqp_basic_publish(r->st, 1, amqp_cstring_bytes(LR_AMQP_EXCHANGE), amqp_cstring_bytes(rk), 0, 0, props, b),
             AMQP_STATUS_OK);
}

static void cleanup_queues(void) {
    raw_t r;
    const char *qs[] = {qfull, cfull, tapq};
    if (url == NULL || qfull[0] == '\0') {
        return;
    }
    raw_open(&r);
    for (size_t i = 0; i < 3; i++) {
        amqp_queue_delete(r.st, 1, amqp_cstring_bytes(qs[i]), 0, 0);
        if (amqp_get_rpc_reply(r.st).reply_type != AMQP_RESPONSE_NORMAL) {
            /* 404 closes the channel: reopen for the next one. */
            amqp_channel_open(r.st, 1);
        }
    }
    raw_close(&r);
}

/* ---- a TCP proxy whose connections the test can cut ---- */

typedef struct proxy {
    bool frozen; /* proxy thread only: stop forwarding (a silent broker) */
    int lfd, port;
    struct sockaddr_in up;
    int ctl[2];
    pthread_t th;
    int fds[64][2];
    int n;
} proxy_t;

static void proxy_drop(proxy_t *p, int i) {
    close(p->fds[i][0]);
    close(p->fds[i][1]);
    p->fds[i][0] = p->fds[p->n - 1][0];
    p->fds[i][1] = p->fds[p->n - 1][1];
    p->n--;
}

static void *proxy_main(void *arg) {
    proxy_t *p = arg;
    for (;;) {
        struct pollfd pf[2 + 128];
        int k = 0;
        pf[k++] = (struct pollfd){.fd = p->lfd, .events = POLLIN};
        pf[k++] = (struct pollfd){.fd = p->ctl[0], .events = POLLIN};
        for (int i = 0; i < p->n && !p->frozen; i++) {
            pf[k++] = (struct pollfd){.fd = p->fds[i][0], .events = POLLIN};
            pf[k++] = (struct pollfd){.fd = p->fds[i][1], .events = POLLIN};
        }
        if (poll(pf, (nfds_t)k, -1) < 0) {
            continue;
        }
        if (pf[1].revents) {
            char c;
            if (read(p->ctl[0], &c, 1) != 1 || c == 'q') {
                while (p->n > 0) {
                    proxy_drop(p, 0);
                }
                return NULL;
            }
            if (c == 'f') { /* freeze: keep the sockets, forward nothing */
                p->frozen = true;
                continue;
            }
            p->frozen = false;
            while (p->n > 0) { /* 'k': cut every connection */
                proxy_drop(p, 0);
            }
            continue;
        }
        if (pf[0].revents) {
            int c = accept(p->lfd, NULL, NULL);
            int u = socket(AF_INET, SOCK_STREAM, 0);
            if (c >= 0 && u >= 0 && p->n < 64 && connect(u, (struct sockaddr *)&p->up, sizeof(p->up)) == 0) {
                p->fds[p->n][0] = c;
                p->fds[p->n][1] = u;
                p->n++;
            } else {
                if (c >= 0) {
                    close(c);
                }
                if (u >= 0) {
                    close(u);
                }
            }
            continue;
        }
        for (int i = 0; i < p->n && !p->frozen; i++) {
            for (int side = 0; side < 2; side++) {
                if (pf[2 + 2 * i + side].revents == 0) {
                    continue;
                }
                char buf[65536];
                ssize_t r = read(p->fds[i][side], buf, sizeof(buf));
                bool dead = r <= 0;
                for (ssize_t off = 0; !dead && off < r;) {
                    ssize_t w = write(p->fds[i][1 - side], buf + off, (size_t)(r - off));
                    if (w <= 0) {
                        dead = true;
                    } else {
                        off += w;
                    }
                }
                if (dead) {
                    proxy_drop(p, i);
                    goto next_round; /* indices shifted */
                }
            }
        }
    next_round:;
    }
}

static void proxy_start(proxy_t *p, const char *host, int port) {
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t al = sizeof(a);
    memset(p, 0, sizeof(*p));
    p->up.sin_family = AF_INET;
    p->up.sin_port = htons((uint16_t)port);
    T_EQ_INT(inet_pton(AF_INET, strcmp(host, "localhost") == 0 ? "127.0.0.1" : host, &p->up.sin_addr), 1);
    p->lfd = socket(AF_INET, SOCK_STREAM, 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    T_EQ_INT(bind(p->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
    T_EQ_INT(listen(p->lfd, 16), 0);
    T_EQ_INT(getsockname(p->lfd, (struct sockaddr *)&a, &al), 0);
    p->port = ntohs(a.sin_port);
    T_EQ_INT(pipe(p->ctl), 0);
    T_EQ_INT(pthread_create(&p->th, NULL, proxy_main, p), 0);
}

static void proxy_cmd(proxy_t *p, char c) { T_EQ_INT(write(p->ctl[1], &c, 1), 1); }

static void proxy_stop(proxy_t *p) {
    proxy_cmd(p, 'q');
    pthread_join(p->th, NULL);
    close(p->lfd);
    close(p->ctl[0]);
    close(p->ctl[1]);
}

static void pct(char *out, size_t len, const char *s) {
    size_t o = 0;
    for (; *s != '\0' && o + 4 < len; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '.' ||
            c == '_' || c == '~') {
            out[o++] = (char)c;
        } else {
            o += (size_t)snprintf(out + o, len - o, "%%%02X", c);
        }
    }
    out[o] = '\0';
}

/* ---- CPU of the owner threads ("lr-amqp") ---- */

static double owner_cpu_seconds(void) {
    DIR *d = opendir("/proc/self/task");
    struct dirent *e;
    double total = 0;
    long hz = sysconf(_SC_CLK_TCK);
    if (d == NULL) {
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        char path[300], buf[1024];
        FILE *f;
        if (e->d_name[0] == '.') {
            continue;
        }
        snprintf(path, sizeof(path), "/proc/self/task/%s/comm", e->d_name);
        f = fopen(path, "r");
        if (f == NULL) {
            continue;
        }
        bool ours = fgets(buf, sizeof(buf), f) != NULL && strncmp(buf, "lr-amqp", 7) == 0;
        fclose(f);
        if (!ours) {
            continue;
        }
        snprintf(path, sizeof(path), "/proc/self/task/%s/stat", e->d_name);
        f = fopen(path, "r");
        if (f == NULL) {
            continue;
        }
        if (fgets(buf, sizeof(buf), f) != NULL) {
            char *p = strrchr(buf, ')');
            unsigned long ut = 0, st = 0;
            /* fields after ")": state(3) ... utime(14) stime(15) */
            if (p != NULL && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) == 2) {
                total += (double)(ut + st) / (double)hz;
            }
        }
        fclose(f);
    }
    closedir(d);
    return total;
}

static double process_cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           (double)ru.ru_stime.tv_usec / 1e6;
}

/* ---- tests ---- */

static void test_url_check(void) {
    char err[512];
    T_EQ_INT(lr_amqp_url_check("amqp://u:p@localhost:5672/vh", err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_url_check("amqps://u:p@broker.example/", err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_url_check("amqp://localhost", err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_url_check("amqp://u:p@[::1]:5672/%2f", err, sizeof(err)), 0);

    T_EQ_INT(lr_amqp_url_check(NULL, err, sizeof(err)), LR_EINVAL);
    T_CONTAINS(err, "empty");
    T_EQ_INT(lr_amqp_url_check("", err, sizeof(err)), LR_EINVAL);
    T_EQ_INT(lr_amqp_url_check("http://u:secret@host/", err, sizeof(err)), LR_EINVAL);
    T_CONTAINS(err, "amqp://");
    T_CONTAINS(err, "http");
    T_ASSERT(strstr(err, "secret") == NULL);
    T_EQ_INT(lr_amqp_url_check("localhost:5672", err, sizeof(err)), LR_EINVAL);
    T_CONTAINS(err, "must start with");
    T_EQ_INT(lr_amqp_url_check("amqp://u:secret@host:notaport/", err, sizeof(err)), LR_EINVAL);
    T_CONTAINS(err, "malformed");
    T_ASSERT(strstr(err, "secret") == NULL);
    T_EQ_INT(lr_amqp_url_check("amqp://host:99999/", err, sizeof(err)), LR_EINVAL);
    T_EQ_INT(lr_amqp_url_check("amqp://host/vh?heartbeat=10", err, sizeof(err)), LR_EINVAL);
    T_CONTAINS(err, "query");
    T_EQ_INT(lr_amqp_url_check("amqp://host/a/b", err, sizeof(err)), LR_EINVAL);
    T_EQ_INT(lr_amqp_url_check("amqp://u:p@host:0/", err, sizeof(err)), LR_EINVAL);

    /* lr_amqp_start refuses bad URLs and options without starting anything. */
    const char *const bad_declare[] = {"ok", "", NULL};
    lr_amqp_opts_t bad_opts = {.url = "amqp://localhost/", .declare = bad_declare};
    lr_amqp_t *b = NULL;
    T_EQ_INT(lr_amqp_start(&b, &loop, &bad_opts, err, sizeof(err)), LR_EINVAL);
    T_ASSERT(b == NULL);
    lr_amqp_t *a = NULL;
    lr_amqp_opts_t opts = {.url = "nope://x"};
    T_EQ_INT(lr_amqp_start(&a, &loop, &opts, err, sizeof(err)), LR_EINVAL);
    T_ASSERT(a == NULL);
    const char *const consume[] = {"q", NULL};
    opts.url = "amqp://localhost/";
    opts.consume = consume;
    opts.prefetch = 0;
    T_EQ_INT(lr_amqp_start(&a, &loop, &opts, err, sizeof(err)), LR_EINVAL);
    T_CONTAINS(err, "prefetch");
    fprintf(stderr, "url checks ok\n");
}

/* Connecting to a closed port: on_state(0, "... refused"), publishes fail
 * with LR_ECONN, stop ends the backoff wait promptly. */
static void test_refused(void) {
    char err[512];
    lr_amqp_sync_t *s = NULL;
    T_EQ_INT(lr_amqp_sync_connect(&s, "amqp://guest:guest@127.0.0.1:1/", 2000, err, sizeof(err)), LR_ECONN);
    T_ASSERT(s == NULL);
    T_CONTAINS(err, "refused");

    obs_t o = {0};
    confirms_t c = {0};
    start(&o, "refused", "amqp://guest:guest@127.0.0.1:1/", NULL, NULL);
    for (uint64_t deadline = mono_ms() + 5000u * (uint64_t)mult; o.n_down == 0 && mono_ms() < deadline;) {
        uv_run(&loop, UV_RUN_ONCE);
    }
    T_ASSERT(o.n_down >= 1);
    T_CONTAINS(o.down_detail, "refused");
    T_EQ_INT(lr_amqp_connected(o.a), 0);
    lr_amqp_msg_t m = {.body = "{}", .body_len = 2};
    T_EQ_INT(lr_amqp_publish(o.a, LR_AMQP_EXCHANGE, "x", &m, confirm_cb, &c), 0);
    count_want_t w = {&c.total, 1};
    T_ASSERT(run_until(count_reached, &w, 5000));
    T_EQ_INT(c.econn, 1);
    uint64_t t0 = mono_ms();
    stop(&o);
    T_ASSERT(mono_ms() - t0 < 2000u * (uint64_t)mult);
    fprintf(stderr, "refused ok\n");
}

static void test_sync(lr_amqp_sync_t *s) {
    char err[1024];
    const char *const queues[] = {qshort, NULL};
    uint32_t msgs = 99, cons = 99;

    /* Declaring twice is a no-op the second time. */
    T_EQ_INT(lr_amqp_sync_declare(s, queues, 0, 0, err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_sync_declare(s, queues, 0, 0, err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_sync_queue_info(s, qfull, &msgs, &cons, err, sizeof(err)), 0);
    T_EQ_INT(msgs, 0);
    T_EQ_INT(cons, 0);
    T_EQ_INT(lr_amqp_sync_queue_info(s, LR_AMQP_DEAD_QUEUE, NULL, NULL, err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_sync_queue_info(s, "longrun.no-such-queue", &msgs, &cons, err, sizeof(err)), LR_ENOTFOUND);
    T_CONTAINS(err, "does not exist");

    /* A queue that exists with other arguments: LR_ECONFIG in plain words,
       and the connection stays usable. */
    raw_t r;
    raw_open(&r);
    amqp_queue_declare(r.st, 1, amqp_cstring_bytes(cfull), 0, 1, 0, 0, amqp_empty_table);
    raw_check(&r, "declare classic queue");
    raw_close(&r);
    const char *const conflict[] = {cshort, NULL};
    T_EQ_INT(lr_amqp_sync_declare(s, conflict, 0, 0, err, sizeof(err)), LR_ECONFIG);
    fprintf(stderr, "conflict message: %s\n", err);
    T_CONTAINS(err, cfull);
    T_CONTAINS(err, "already exists with different arguments");
    T_CONTAINS(err, "differs (server said: PRECONDITION_FAILED - inequivalent arg");
    T_CONTAINS(err, "Delete the queue");
    T_EQ_INT(lr_amqp_sync_queue_info(s, cfull, &msgs, NULL, err, sizeof(err)), 0);

    /* Bad input. */
    const char *const bad[] = {"", NULL};
    T_EQ_INT(lr_amqp_sync_declare(s, bad, 0, 0, err, sizeof(err)), LR_EINVAL);

    /* Unroutable mandatory -> LR_EAMQP; non-mandatory unroutable is dropped
       silently and confirmed; a missing exchange -> LR_EAMQP, channel reopened. */
    lr_amqp_msg_t m = {.body = "{\"x\":1}", .body_len = 7, .persistent = true, .mandatory = true};
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, "no-such-route", &m, 5000, err, sizeof(err)), LR_EAMQP);
    T_CONTAINS(err, "could not be routed");
    m.mandatory = false;
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, "no-such-route", &m, 5000, err, sizeof(err)), 0);
    T_EQ_INT(lr_amqp_sync_publish(s, "longrun.no-such-exchange", "x", &m, 5000, err, sizeof(err)), LR_EAMQP);
    T_CONTAINS(err, "404");
    T_EQ_INT(lr_amqp_sync_queue_info(s, qfull, &msgs, NULL, err, sizeof(err)), 0);
    T_EQ_INT(msgs, 0);

    /* Too big to publish. */
    char *big = malloc(LR_AMQP_MAX_BODY + 1);
    T_ASSERT(big != NULL);
    memset(big, 'a', LR_AMQP_MAX_BODY + 1);
    lr_amqp_msg_t mb = {.body = big, .body_len = LR_AMQP_MAX_BODY + 1};
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, qshort, &mb, 5000, err, sizeof(err)), LR_ETOOBIG);
    free(big);
    fprintf(stderr, "sync ok\n");
}

static const char rich_json[] = "{\"s\":\"hello \\\"w\\\"\\n\",\"i32\":-42,\"i64\":1234567890123,\"u8\":200,"
                                "\"bool\":true,\"f64\":1.5,\"f32\":0.25,\"dec\":123.45,\"dec2\":0.005,"
                                "\"ts\":1700000000,\"void\":null,\"bytes\":\"a\\ufffdb\",\"bad\":\"\\ufffdok\","
                                "\"nested\":{\"k\":\"v\",\"arr\":[1,\"x\",false]},\"x-test\":\"hello\"}";

static void publish_rich(void) {
    raw_t r;
    amqp_table_entry_t e[15], ne[2];
    amqp_field_value_t arr[3];
    int n = 0;
#define STR(k, v)                                                        \
    e[n].key = amqp_cstring_bytes(k);                                    \
    e[n].value.kind = AMQP_FIELD_KIND_UTF8;                              \
    e[n].value.value.bytes = (amqp_bytes_t){sizeof(v) - 1, (void *)(v)}; \
    n++
    STR("s", "hello \"w\"\n");
    e[n].key = amqp_cstring_bytes("i32");
    e[n].value.kind = AMQP_FIELD_KIND_I32;
    e[n++].value.value.i32 = -42;
    e[n].key = amqp_cstring_bytes("i64");
    e[n].value.kind = AMQP_FIELD_KIND_I64;
    e[n++].value.value.i64 = 1234567890123;
    e[n].key = amqp_cstring_bytes("u8");
    e[n].value.kind = AMQP_FIELD_KIND_U8;
    e[n++].value.value.u8 = 200;
    e[n].key = amqp_cstring_bytes("bool");
    e[n].value.kind = AMQP_FIELD_KIND_BOOLEAN;
    e[n++].value.value.boolean = 1;
    e[n].key = amqp_cstring_bytes("f64");
    e[n].value.kind = AMQP_FIELD_KIND_F64;
    e[n++].value.value.f64 = 1.5;
    e[n].key = amqp_cstring_bytes("f32");
    e[n].value.kind = AMQP_FIELD_KIND_F32;
    e[n++].value.value.f32 = 0.25f;
    e[n].key = amqp_cstring_bytes("dec");
    e[n].value.kind = AMQP_FIELD_KIND_DECIMAL;
    e[n].value.value.decimal.decimals = 2;
    e[n++].value.value.decimal.value = 12345;
    e[n].key = amqp_cstring_bytes("dec2");
    e[n].value.kind = AMQP_FIELD_KIND_DECIMAL;
    e[n].value.value.decimal.decimals = 3;
    e[n++].value.value.decimal.value = 5;
    e[n].key = amqp_cstring_bytes("ts");
    e[n].value.kind = AMQP_FIELD_KIND_TIMESTAMP;
    e[n++].value.value.u64 = 1700000000;
    e[n].key = amqp_cstring_bytes("void");
    e[n++].value.kind = AMQP_FIELD_KIND_VOID;
    e[n].key = amqp_cstring_bytes("bytes");
    e[n].value.kind = AMQP_FIELD_KIND_BYTES;
    e[n++].value.value.bytes = (amqp_bytes_t){3, (void *)"a\0b"};
    STR("bad", "\xffok");
    ne[0].key = amqp_cstring_bytes("k");
    ne[0].value.kind = AMQP_FIELD_KIND_UTF8;
    ne[0].value.value.bytes = amqp_cstring_bytes("v");
    arr[0].kind = AMQP_FIELD_KIND_I32;
    arr[0].value.i32 = 1;
    arr[1].kind = AMQP_FIELD_KIND_UTF8;
    arr[1].value.bytes = amqp_cstring_bytes("x");
    arr[2].kind = AMQP_FIELD_KIND_BOOLEAN;
    arr[2].value.boolean = 0;
    ne[1].key = amqp_cstring_bytes("arr");
    ne[1].value.kind = AMQP_FIELD_KIND_ARRAY;
    ne[1].value.value.array = (amqp_array_t){3, arr};
    e[n].key = amqp_cstring_bytes("nested");
    e[n].value.kind = AMQP_FIELD_KIND_TABLE;
    e[n++].value.value.table = (amqp_table_t){2, ne};
    STR("x-test", "hello");
#undef STR
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof(p));
    p._flags = AMQP_BASIC_HEADERS_FLAG | AMQP_BASIC_MESSAGE_ID_FLAG;
    p.headers = (amqp_table_t){n, e};
    p.message_id = amqp_cstring_bytes("rich");
    raw_open(&r);
    raw_publish(&r, qshort, &p, "rich", 4);
    raw_close(&r);
}

static void publish_big(void) {
    raw_t r;
    size_t len = LR_AMQP_MAX_BODY + 10;
    char *big = malloc(len);
    T_ASSERT(big != NULL);
    for (size_t i = 0; i < len; i++) {
        big[i] = (char)('a' + i % 26);
    }
    amqp_basic_properties_t p;
    memset(&p, 0, sizeof(p));
    p._flags = AMQP_BASIC_MESSAGE_ID_FLAG;
    p.message_id = amqp_cstring_bytes("big");
    raw_open(&r);
    raw_publish(&r, qshort, &p, big, len);
    raw_close(&r);
    free(big);
}

/* The threaded API: properties, headers, requeue, dead-lettering, 1000
 * confirmed publishes, acks, returns, cancel. */
static void test_threaded(lr_amqp_sync_t *s, obs_t *o) {
    char err[1024];
    const char *const consume[] = {qfull, tapq, NULL};
    const char *const declare[] = {qshort, NULL};

    /* A message with every property, sent through the blocking helper.  It
       ends up dead-lettered, so it also lands in the shared longrun.dead:
       its id says where it came from. */
    char m1id[64];
    snprintf(m1id, sizeof(m1id), "test_amqp-%ld-dead-letter-probe", (long)getpid());
    const char *const hdrs[] = {"x-test", "hello", "x-longrun-reason", "bad_json", NULL};
    lr_amqp_msg_t m = {.body = "{\"id\":1}",
                       .body_len = 8,
                       .message_id = m1id,
                       .correlation_id = "corr-1",
                       .reply_to = "replies",
                       .content_type = "application/json",
                       .persistent = true,
                       .headers = hdrs};
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, qshort, &m, 5000, err, sizeof(err)), 0);
    publish_rich();

    start(o, "A", url, consume, declare);
    T_ASSERT(run_until(is_up, o, 10000));
    T_EQ_INT(lr_amqp_connected(o->a), 1);
    T_CONTAINS(o->detail, "connected to amqp");

    lr_amqp_delivery_t *d = wait_delivery(o, qfull, 5000);
    T_EQ_STR(d->message_id, m1id);
    T_EQ_STR(d->correlation_id, "corr-1");
    T_EQ_STR(d->reply_to, "replies");
    T_EQ_STR(d->content_type, "application/json");
    T_EQ_STR(d->body, "{\"id\":1}");
    T_EQ_INT(d->body_len, 8);
    T_EQ_INT(d->body_truncated, 0);
    T_EQ_STR(d->exchange, LR_AMQP_EXCHANGE);
    T_EQ_STR(d->routing_key, qshort);
    T_EQ_INT(d->redelivered, 0);
    T_EQ_INT(d->delivery_count, -1);
    T_EQ_STR(d->headers_json, "{\"x-test\":\"hello\",\"x-longrun-reason\":\"bad_json\"}");
    T_EQ_INT(d->generation, 1);

    lr_amqp_delivery_t *rich = wait_delivery(o, qfull, 5000);
    T_EQ_STR(rich->message_id, "rich");
    T_EQ_STR(rich->headers_json, rich_json);
    T_ASSERT(rich->content_type == NULL);
    T_EQ_INT(lr_amqp_ack(o->a, rich), 0);
    lr_amqp_delivery_free(rich);

    /* Requeue: the broker counts the delivery. */
    T_EQ_INT(lr_amqp_reject(o->a, d, true), 0);
    lr_amqp_delivery_free(d);
    d = wait_delivery(o, qfull, 5000);
    T_EQ_STR(d->message_id, m1id);
    T_EQ_INT(d->redelivered, 1);
    T_EQ_INT(d->delivery_count, 1);
    T_CONTAINS(d->headers_json, "\"x-delivery-count\":1");

    /* Reject without requeue: dead-lettered through longrun.dlx. */
    T_EQ_INT(lr_amqp_reject(o->a, d, false), 0);
    lr_amqp_delivery_free(d);
    for (;;) {
        d = wait_delivery(o, tapq, 10000);
        if (d->message_id != NULL && strcmp(d->message_id, m1id) == 0) {
            break;
        }
        /* Someone else's dead letter (shared broker): not ours. */
        T_EQ_INT(lr_amqp_ack(o->a, d), 0);
        lr_amqp_delivery_free(d);
    }
    fprintf(stderr, "dead letter headers: %s\n", d->headers_json);
    T_CONTAINS(d->headers_json, "\"x-death\":[{");
    T_CONTAINS(d->headers_json, "\"reason\":\"rejected\"");
    T_CONTAINS(d->headers_json, qfull);
    T_CONTAINS(d->headers_json, "\"x-first-death-reason\":\"rejected\"");
    T_CONTAINS(d->headers_json, "\"x-test\":\"hello\"");
    T_EQ_STR(d->body, "{\"id\":1}");
    T_EQ_INT(lr_amqp_ack(o->a, d), 0);
    lr_amqp_delivery_free(d);

    /* A body over the limit arrives truncated, flagged. */
    publish_big();
    d = wait_delivery(o, qfull, 10000);
    T_EQ_STR(d->message_id, "big");
    T_EQ_INT(d->body_len, LR_AMQP_MAX_BODY);
    T_EQ_INT(d->body_truncated, 1);
    T_EQ_INT(strlen(d->body), LR_AMQP_MAX_BODY);
    T_ASSERT(d->body[LR_AMQP_MAX_BODY - 1] == (char)('a' + (LR_AMQP_MAX_BODY - 1) % 26));
    T_EQ_INT(lr_amqp_ack(o->a, d), 0);
    lr_amqp_delivery_free(d);

    /* Idle CPU of the owner thread. */
    run_for(300);
    double t0 = owner_cpu_seconds(), p0 = process_cpu_seconds();
    uint64_t w0 = mono_ms();
    run_for(3000);
    double wall = (double)(mono_ms() - w0) / 1000.0;
    double t1 = owner_cpu_seconds(), p1 = process_cpu_seconds();
    fprintf(stderr, "idle: owner thread CPU %.3f%%, whole process %.3f%% over %.1f s\n", 100.0 * (t1 - t0) / wall,
            100.0 * (p1 - p0) / wall, wall);
    T_ASSERT(t1 - t0 < 0.05 * wall);

    /* 1000 confirmed publishes, consumed and acked as they arrive. */
    confirms_t c = {0};
    o->auto_ack = true;
    o->acked = 0;
    uint64_t start_ms = mono_ms();
    for (int i = 0; i < 1000; i++) {
        char body[64], id[32];
        int n = snprintf(body, sizeof(body), "{\"n\":%d}", i);
        snprintf(id, sizeof(id), "bulk-%d", i);
        lr_amqp_msg_t bm = {.body = body, .body_len = (size_t)n, .message_id = id, .persistent = true};
        T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, qshort, &bm, confirm_cb, &c), 0);
    }
    count_want_t w = {&c.total, 1000};
    T_ASSERT(run_until(count_reached, &w, 30000));
    double secs = (double)(mono_ms() - start_ms) / 1000.0;
    fprintf(stderr, "1000 confirmed publishes in %.3f s (%.0f msgs/s)\n", secs, 1000.0 / (secs > 0 ? secs : 0.001));
    T_EQ_INT(c.ok, 1000);
    count_want_t wa = {&o->acked, 1000};
    T_ASSERT(run_until(count_reached, &wa, 30000));

    /* Acked: the queue is empty (acks are asynchronous: poll briefly). */
    uint32_t msgs = 1;
    for (int i = 0; i < 50 && msgs != 0; i++) {
        T_EQ_INT(lr_amqp_sync_queue_info(s, qfull, &msgs, NULL, err, sizeof(err)), 0);
        if (msgs != 0) {
            run_for(100);
        }
    }
    T_EQ_INT(msgs, 0);

    /* Mandatory + unroutable -> LR_EAMQP, matched to the right publish even
       with routable ones around it. */
    confirms_t c2 = {0}, c3 = {0};
    lr_amqp_msg_t mm = {.body = "{}", .body_len = 2, .mandatory = true, .persistent = true};
    T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, qshort, &mm, confirm_cb, &c2), 0);
    T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, "no-such-route", &mm, confirm_cb, &c3), 0);
    T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, qshort, &mm, confirm_cb, &c2), 0);
    count_want_t w2 = {&c2.total, 2}, w3 = {&c3.total, 1};
    T_ASSERT(run_until(count_reached, &w2, 10000));
    T_ASSERT(run_until(count_reached, &w3, 10000));
    T_EQ_INT(c2.ok, 2);
    T_EQ_INT(c3.eamqp, 1);
    count_want_t wa2 = {&o->acked, 1002};
    T_ASSERT(run_until(count_reached, &wa2, 10000));

    /* Bad publishes are refused synchronously; the callback never runs. */
    char longid[300];
    memset(longid, 'x', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    lr_amqp_msg_t bad = {.body = "{}", .body_len = 2, .message_id = longid};
    T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, qshort, &bad, confirm_cb, &c2), LR_EINVAL);
    T_EQ_INT(lr_amqp_publish(o->a, NULL, qshort, &mm, confirm_cb, &c2), LR_EINVAL);
    T_EQ_INT(c2.total, 2);

    /* Cancel: no more deliveries, the message stays queued. */
    lr_amqp_cancel_consume(o->a);
    run_for(300);
    size_t before = o->total;
    lr_amqp_msg_t cm = {.body = "{\"after\":\"cancel\"}",
                        .body_len = 18,
                        .message_id = "after-cancel",
                        .persistent = true};
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, qshort, &cm, 5000, err, sizeof(err)), 0);
    run_for(500);
    T_EQ_INT(o->total, before);
    uint32_t cons = 99;
    T_EQ_INT(lr_amqp_sync_queue_info(s, qfull, &msgs, &cons, err, sizeof(err)), 0);
    T_EQ_INT(msgs, 1);
    T_EQ_INT(cons, 0);
    /* Publishing still works after cancel. */
    confirms_t c4 = {0};
    T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, "no-such-route", &cm, confirm_cb, &c4), 0);
    count_want_t w4 = {&c4.total, 1};
    T_ASSERT(run_until(count_reached, &w4, 5000));
    T_EQ_INT(c4.ok, 1);
    T_EQ_INT(lr_amqp_connected(o->a), 1);
    o->auto_ack = false;
    fprintf(stderr, "threaded ok\n");
}

/* Reconnect through a proxy whose connections we cut: on_state 0 then 1, a
 * held delivery's ack becomes LR_ESTATE, the message comes back. */
static void test_proxy_reconnect(lr_amqp_sync_t *s) {
    char err[1024], user[128], pass[128], vhost[128], purl[512];
    struct amqp_connection_info ci;
    char *copy = strdup(url);
    T_ASSERT(copy != NULL);
    T_EQ_INT(amqp_parse_url(copy, &ci), AMQP_STATUS_OK);
    if (ci.ssl) {
        fprintf(stderr, "SKIP proxy reconnect test (amqps URL)\n");
        free(copy);
        return;
    }
    proxy_t px;
    proxy_start(&px, ci.host, ci.port);
    pct(user, sizeof(user), ci.user);
    pct(pass, sizeof(pass), ci.password);
    pct(vhost, sizeof(vhost), ci.vhost[0] != '\0' ? ci.vhost : "/");
    snprintf(purl, sizeof(purl), "amqp://%s:%s@127.0.0.1:%d/%s", user, pass, px.port, vhost);
    free(copy);

    obs_t o = {0};
    const char *const consume[] = {qfull, NULL};
    start(&o, "B", purl, consume, NULL);
    T_ASSERT(run_until(is_up, &o, 10000));
    /* The message left behind by the cancel test. */
    lr_amqp_delivery_t *d = wait_delivery(&o, qfull, 5000);
    T_EQ_STR(d->message_id, "after-cancel");
    T_EQ_INT(d->generation, 1);

    /* Cut the connection with d unacked and a publish in flight. */
    confirms_t c = {0};
    lr_amqp_msg_t m = {.body = "{}", .body_len = 2, .message_id = "in-flight", .persistent = true};
    T_EQ_INT(lr_amqp_publish(o.a, LR_AMQP_EXCHANGE, "no-such-route", &m, confirm_cb, &c), 0);
    proxy_cmd(&px, 'k');
    for (uint64_t dl = mono_ms() + 10000u * (uint64_t)mult; o.n_down == 0 && mono_ms() < dl;) {
        uv_run(&loop, UV_RUN_ONCE);
    }
    T_EQ_INT(o.n_down, 1);
    fprintf(stderr, "cut: %s\n", o.down_detail);
    T_ASSERT(run_until(is_up, &o, 15000));
    T_EQ_INT(o.n_up, 2);
    count_want_t w = {&c.total, 1};
    T_ASSERT(run_until(count_reached, &w, 5000));
    T_EQ_INT(c.total, 1); /* exactly once: confirmed, or LR_ECONN if cut first */
    T_ASSERT(c.ok + c.econn == 1);

    /* The old delivery's tag means nothing on the new channel. */
    T_EQ_INT(lr_amqp_ack(o.a, d), LR_ESTATE);
    lr_amqp_delivery_free(d);
    d = wait_delivery(&o, qfull, 10000);
    T_EQ_STR(d->message_id, "after-cancel");
    T_EQ_INT(d->generation, 2);
    T_EQ_INT(d->redelivered, 1);
    T_EQ_INT(lr_amqp_ack(o.a, d), 0);
    lr_amqp_delivery_free(d);

    /* Consumption resumed: a fresh message arrives. */
    lr_amqp_msg_t m2 = {.body = "{}", .body_len = 2, .message_id = "after-reconnect"};
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, qshort, &m2, 5000, err, sizeof(err)), 0);
    d = wait_delivery(&o, qfull, 5000);
    T_EQ_STR(d->message_id, "after-reconnect");
    T_EQ_INT(lr_amqp_ack(o.a, d), 0);
    lr_amqp_delivery_free(d);

    /* A silent broker (the proxy forwards nothing): stop stays bounded and
       every publish still gets exactly one outcome. */
    confirms_t cf = {0};
    proxy_cmd(&px, 'f');
    run_for(100);
    for (int i = 0; i < 3; i++) {
        T_EQ_INT(lr_amqp_publish(o.a, LR_AMQP_EXCHANGE, qshort, &m, confirm_cb, &cf), 0);
    }
    run_for(200);
    uint64_t t0 = mono_ms();
    lr_amqp_stop(o.a, 500, stopped_cb, &o);
    T_ASSERT(run_until(is_stopped, &o, 15000));
    uint64_t took = mono_ms() - t0;
    fprintf(stderr, "stop with a silent broker took %llu ms; outcomes: %zu shutdown, %zu conn\n",
            (unsigned long long)took, cf.eshutdown, cf.econn);
    T_EQ_INT(cf.total, 3);
    T_EQ_INT(cf.eshutdown, 3);
    T_ASSERT(took < 3000u * (uint64_t)mult);
    while (o.nheld > 0) {
        lr_amqp_delivery_free(o.held[--o.nheld]);
    }

    /* Worse: the owner thread blocked inside a socket write (the broker
       stopped reading and the socket buffers are full).  Stop's timer shuts
       the socket down under it; still one outcome per publish. */
    proxy_cmd(&px, 'k');
    obs_t o2 = {0};
    start(&o2, "D", purl, NULL, NULL);
    T_ASSERT(run_until(is_up, &o2, 10000));
    proxy_cmd(&px, 'f');
    run_for(100);
    char *big = malloc(LR_AMQP_MAX_BODY);
    T_ASSERT(big != NULL);
    memset(big, 'b', LR_AMQP_MAX_BODY);
    confirms_t cb = {0};
    lr_amqp_msg_t bm = {.body = big, .body_len = LR_AMQP_MAX_BODY};
    for (int i = 0; i < 40; i++) {
        T_EQ_INT(lr_amqp_publish(o2.a, LR_AMQP_EXCHANGE, qshort, &bm, confirm_cb, &cb), 0);
    }
    free(big);
    run_for(500);
    t0 = mono_ms();
    lr_amqp_stop(o2.a, 200, stopped_cb, &o2);
    T_ASSERT(run_until(is_stopped, &o2, 30000));
    took = mono_ms() - t0;
    fprintf(stderr,
            "stop while blocked in a write took %llu ms; outcomes: %zu shutdown, %zu conn, "
            "%zu ok\n",
            (unsigned long long)took, cb.eshutdown, cb.econn, cb.ok);
    T_EQ_INT(cb.total, 40);
    T_EQ_INT(cb.eshutdown + cb.econn, 40);
    T_ASSERT(took < 8000u * (uint64_t)mult);
    proxy_stop(&px);
    fprintf(stderr, "proxy reconnect ok\n");
}

/* Broker-side close (rabbitmqctl close_connection) of A's connection. */
/* The rabbitmqctl command prefix for the broker under test, or NULL:
 * LONGRUN_RABBITMQCTL, else "$LONGRUN_SERVICES rabbitmqctl" (scripts/dev
 * test exports LONGRUN_SERVICES and the matching LONGRUN_HOME). */
static const char *rabbitmqctl(void) {
    static char buf[1024];
    const char *ctl = getenv("LONGRUN_RABBITMQCTL");
    const char *services = getenv("LONGRUN_SERVICES");
    if (ctl != NULL && ctl[0] != '\0') {
        return ctl;
    }
    if (services != NULL && services[0] != '\0' && strchr(services, '\'') == NULL && access(services, X_OK) == 0) {
        snprintf(buf, sizeof(buf), "'%.900s' rabbitmqctl", services);
        return buf;
    }
    return NULL;
}

static void test_ctl_reconnect(lr_amqp_sync_t *s, obs_t *o, uint32_t want_consumers) {
    const char *ctl = rabbitmqctl();
    char cmd[1024], line[4096], mark[128], host[64] = "", err[512];
    char pids[8][128];
    int npids = 0;
    if (ctl == NULL || ctl[0] == '\0') {
        fprintf(stderr, "SKIP rabbitmqctl reconnect test (neither LONGRUN_RABBITMQCTL nor "
                        "LONGRUN_SERVICES is set)\n");
        return;
    }
    gethostname(host, sizeof(host) - 1);
    /* Our owner connections are named "<prog>@<host>:<pid>/<n>". */
    snprintf(mark, sizeof(mark), "@%s:%ld/", host, (long)getpid());
    snprintf(cmd, sizeof(cmd), "%.700s -q list_connections --no-table-headers pid client_properties", ctl);
    FILE *f = popen(cmd, "r");
    T_ASSERT(f != NULL);
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strstr(line, mark) != NULL && strstr(line, "/sync") == NULL && npids < 8) {
            char *tab = strchr(line, '\t');
            if (tab != NULL) {
                *tab = '\0';
                snprintf(pids[npids++], sizeof(pids[0]), "%.127s", line);
            }
        }
    }
    pclose(f);
    if (npids == 0) {
        fprintf(stderr,
                "SKIP rabbitmqctl reconnect test (no connection named *%s* on that "
                "node: another broker?)\n",
                mark);
        return;
    }
    int downs = o->n_down, ups = o->n_up;
    for (int i = 0; i < npids; i++) {
        snprintf(cmd, sizeof(cmd), "%.700s -q close_connection '%.127s' 'test_amqp forced close' >/dev/null", ctl,
                 pids[i]);
        T_EQ_INT(system(cmd), 0);
    }
    for (uint64_t dl = mono_ms() + 10000u * (uint64_t)mult; o->n_down == downs && mono_ms() < dl;) {
        uv_run(&loop, UV_RUN_ONCE);
    }
    T_EQ_INT(o->n_down, downs + 1);
    T_CONTAINS(o->down_detail, "CONNECTION_FORCED");
    T_CONTAINS(o->down_detail, "test_amqp forced close");
    T_ASSERT(run_until(is_up, o, 15000));
    T_EQ_INT(o->n_up, ups + 1);
    /* Publishing works on the new connection; a cancelled instance stays
       cancelled across the reconnect (want_consumers 0). */
    confirms_t c = {0};
    lr_amqp_msg_t m = {.body = "{}", .body_len = 2};
    T_EQ_INT(lr_amqp_publish(o->a, LR_AMQP_EXCHANGE, qshort, &m, confirm_cb, &c), 0);
    count_want_t w = {&c.total, 1};
    T_ASSERT(run_until(count_reached, &w, 5000));
    T_EQ_INT(c.ok, 1);
    uint32_t cons = 99;
    T_EQ_INT(lr_amqp_sync_queue_info(s, qfull, NULL, &cons, err, sizeof(err)), 0);
    T_EQ_INT(cons, want_consumers);
    fprintf(stderr, "rabbitmqctl reconnect ok\n");
}

/* A fresh consumer after a broker-side close resumes consuming. */
static void test_ctl_reconnect_consumer(lr_amqp_sync_t *s) {
    if (rabbitmqctl() == NULL) {
        return;
    }
    obs_t o = {0};
    const char *const consume[] = {qfull, NULL};
    char err[512];
    start(&o, "C", url, consume, NULL);
    T_ASSERT(run_until(is_up, &o, 10000));
    o.auto_ack = true;
    run_for(500); /* drain leftovers */
    test_ctl_reconnect(s, &o, 1);
    size_t before = o.acked;
    lr_amqp_msg_t m = {.body = "{}", .body_len = 2, .message_id = "after-forced-close"};
    T_EQ_INT(lr_amqp_sync_publish(s, LR_AMQP_EXCHANGE, qshort, &m, 5000, err, sizeof(err)), 0);
    count_want_t w = {&o.acked, before + 1};
    T_ASSERT(run_until(count_reached, &w, 5000));
    stop(&o);
}

int main(void) {
    const char *m = getenv("LONGRUN_TEST_TIMEOUT_MULTIPLIER");
    if (m != NULL && atol(m) > 0) {
        mult = atol(m);
    }
    const char *lvl = getenv("LONGRUN_LOG_LEVEL");
    lr_log_init("test_amqp", NULL, lvl != NULL ? lr_log_level_parse(lvl) : LR_LOG_WARN, 0);
    T_EQ_INT(uv_loop_init(&loop), 0);
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, tick_cb, 20, 20);

    test_url_check();

    url = getenv("LONGRUN_AMQP_URL");
    if (url == NULL || url[0] == '\0') {
        T_SKIP("LONGRUN_AMQP_URL is not set");
    }
    snprintf(qshort, sizeof(qshort), "t%ld", (long)getpid());
    snprintf(qfull, sizeof(qfull), "%s%s", LR_AMQP_QUEUE_PREFIX, qshort);
    snprintf(cshort, sizeof(cshort), "c%ld", (long)getpid());
    snprintf(cfull, sizeof(cfull), "%s%s", LR_AMQP_QUEUE_PREFIX, cshort);
    snprintf(tapq, sizeof(tapq), "longrun.test.dlx.%ld", (long)getpid());

    char err[1024];
    lr_amqp_sync_t *s = NULL;
    int rc = lr_amqp_sync_connect(&s, url, 5000, err, sizeof(err));
    if (rc != 0) {
        T_FAIL("cannot connect to LONGRUN_AMQP_URL: %s: %s", lr_err_name(rc), err);
    }
    atexit(cleanup_queues);

    /* The dead-letter tap: a private copy of longrun.dlx's output. */
    {
        raw_t r;
        raw_open(&r);
        amqp_table_entry_t e[1];
        e[0].key = amqp_cstring_bytes("x-expires");
        e[0].value.kind = AMQP_FIELD_KIND_I32;
        e[0].value.value.i32 = 600000;
        amqp_exchange_declare(r.st, 1, amqp_cstring_bytes(LR_AMQP_DLX), amqp_cstring_bytes("fanout"), 0, 1, 0, 0,
                              amqp_empty_table);
        raw_check(&r, "declare dlx");
        amqp_queue_declare(r.st, 1, amqp_cstring_bytes(tapq), 0, 0, 0, 0, (amqp_table_t){1, e});
        raw_check(&r, "declare tap");
        amqp_queue_bind(r.st, 1, amqp_cstring_bytes(tapq), amqp_cstring_bytes(LR_AMQP_DLX), amqp_cstring_bytes(""),
                        amqp_empty_table);
        raw_check(&r, "bind tap");
        raw_close(&r);
    }

    test_refused();
    test_sync(s);
    obs_t a = {0};
    test_threaded(s, &a);
    test_proxy_reconnect(s);
    test_ctl_reconnect(s, &a, 0);
    test_ctl_reconnect_consumer(s);

    /* Stop A: later calls are refused, the loop closes cleanly. */
    lr_amqp_t *ap = a.a;
    lr_amqp_stop(ap, 5000, stopped_cb, &a);
    confirms_t c = {0};
    lr_amqp_msg_t msg = {.body = "{}", .body_len = 2};
    T_EQ_INT(lr_amqp_publish(ap, LR_AMQP_EXCHANGE, qshort, &msg, confirm_cb, &c), LR_ESHUTDOWN);
    T_EQ_INT(lr_amqp_connected(ap), 0);
    T_ASSERT(run_until(is_stopped, &a, 20000));
    while (a.nheld > 0) {
        lr_amqp_delivery_free(a.held[--a.nheld]);
    }

    lr_amqp_sync_close(s);
    cleanup_queues();
    qfull[0] = '\0';

    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    T_EQ_INT(uv_loop_close(&loop), 0);
    fprintf(stderr, "all ok\n");
    return 0;
}
