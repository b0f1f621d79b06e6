/*
 * test_health.c - unit test of common/health.c: the health server stays
 * answerable when clients misbehave, and every response is bounded.
 *
 *   1. A connection whose descriptor is above 1024 (FD_SETSIZE) is served.
 *   2. One client address gets at most LR_HEALTH_PER_IP_CONNECTIONS.
 *   3. 2,000 idle connections from 20 addresses plus slow-loris clients
 *      (one header byte every 200 ms): /healthz, /readyz, /health and
 *      /metrics from another address still answer, each within a second.
 *   4. An idle connection is closed after LR_HEALTH_TIMEOUT_SECONDS.
 *   5. Only GET and HEAD are answered (405 with Allow otherwise).
 *   6. A snapshot of any size up to LR_HEALTH_SNAPSHOT_MAX is served whole;
 *      a larger or malformed one is refused, and /health says so.
 *   7. A not-ready reason holding a DSN shows no password.
 *
 * The server runs in this process (its own thread), so the test raises
 * RLIMIT_NOFILE for both ends.  Addresses 127.0.0.2.. are loopback too.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "err.h"
#include "health.h"
#include "log.h"
#include "testutil.h"

#define N_IDLE 2000
#define N_IDLE_ADDRS 20
#define N_LORIS 16
#define N_DUMMY_FDS 1100
#define PROBE_MAX_MS 1000.0

static int port;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1000.0 + (double)t.tv_nsec / 1e6;
}

/* A TCP socket from 127.0.0.<src> to the server; blocking unless nb. */
static int dial(int src, bool nb) {
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM | (nb ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) {
        T_FAIL("socket: %s (RLIMIT_NOFILE too low?)", strerror(errno));
    }
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000000u | (unsigned)src);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0) {
        T_SKIP("cannot bind 127.0.0.%d: %s", src, strerror(errno));
    }
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(0x7f000001u);
    if (connect(fd, (struct sockaddr *)&a, sizeof(a)) != 0 && errno != EINPROGRESS) {
        T_FAIL("connect: %s", strerror(errno));
    }
    return fd;
}

/* Whether the server closed fd (EOF or reset), waiting up to ms. */
static bool closed_by_server(int fd, int ms) {
    struct pollfd p = {fd, POLLIN, 0};
    char c;
    if (poll(&p, 1, ms) <= 0) {
        return false;
    }
    return recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) <= 0;
}

typedef struct reply {
    int status; /* 0: no answer */
    char *body; /* malloc'd, NUL-terminated */
    size_t len;
    char head[2048];
    double ms;
} reply_t;

/* One request from 127.0.0.<src>: raw request text, answer read until the
 * server closes (Connection: close) or 3 s pass. */
static reply_t request(int src, const char *req) {
    reply_t r;
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    struct timeval tv = {3, 0};
    double t0 = now_ms();
    int fd;
    char *sep;
    memset(&r, 0, sizeof(r));
    T_ASSERT(buf != NULL);
    fd = dial(src, false);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (send(fd, req, strlen(req), MSG_NOSIGNAL) != (ssize_t)strlen(req)) {
        goto out;
    }
    for (;;) {
        ssize_t n;
        if (len + 1 >= cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            T_ASSERT(buf != NULL);
        }
        n = recv(fd, buf + len, cap - len - 1, 0);
        if (n <= 0) {
            break;
        }
        len += (size_t)n;
    }
    buf[len] = '\0';
    sep = strstr(buf, "\r\n\r\n");
    if (len > 12 && strncmp(buf, "HTTP/1.", 7) == 0 && sep != NULL) {
        r.status = atoi(buf + 9);
        snprintf(r.head, sizeof(r.head), "%.*s", (int)(sep - buf), buf);
        r.len = len - (size_t)(sep + 4 - buf);
        r.body = strdup(sep + 4);
    }
out:
    r.ms = now_ms() - t0;
    close(fd);
    free(buf);
    if (r.body == NULL) {
        r.body = strdup("");
    }
    return r;
}

static reply_t get(int src, const char *method, const char *path) {
    char req[256];
    snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", method, path);
    return request(src, req);
}

/* ---- 1. descriptors above FD_SETSIZE ------------------------------------ */

static int dummies[N_DUMMY_FDS];

static void test_high_fd(void) {
    reply_t r;
    for (int i = 0; i < N_DUMMY_FDS; i++) {
        dummies[i] = open("/dev/null", O_RDONLY);
        T_ASSERT(dummies[i] >= 0);
    }
    /* the server's end of the next connection gets a descriptor > 1024 */
    r = get(1, "GET", "/healthz");
    T_EQ_INT(r.status, 200);
    T_EQ_STR(r.body, "ok\n");
    free(r.body);
    printf("fd above FD_SETSIZE: /healthz answered\n");
}

/* ---- 2. per-address limit ------------------------------------------------ */

static void test_per_ip(void) {
    int fds[LR_HEALTH_PER_IP_CONNECTIONS * 3];
    int n = (int)(sizeof(fds) / sizeof(fds[0])), open_now = 0;
    for (int i = 0; i < n; i++) {
        fds[i] = dial(60, false);
    }
    for (int i = 0; i < n; i++) {
        open_now += closed_by_server(fds[i], i == 0 ? 500 : 20) ? 0 : 1;
    }
    printf("per-address limit: %d of %d connections from one address kept open\n", open_now, n);
    T_ASSERT(open_now <= LR_HEALTH_PER_IP_CONNECTIONS);
    T_ASSERT(open_now >= LR_HEALTH_PER_IP_CONNECTIONS / 2);
    for (int i = 0; i < n; i++) {
        close(fds[i]);
    }
}

/* ---- 3. a flood of idle and slow clients --------------------------------- */

static int idle[N_IDLE];
static int loris[N_LORIS];
static volatile int loris_stop;

static void *loris_main(void *arg) {
    static const char req[] =
        "GET /healthz HTTP/1.1\r\nHost: test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    size_t pos = 0;
    (void)arg;
    while (!loris_stop) {
        for (int i = 0; i < N_LORIS; i++) {
            (void)send(loris[i], req + pos % (sizeof(req) - 1), 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        pos++;
        usleep(200 * 1000);
    }
    return NULL;
}

static void test_flood(lr_health_t *h) {
    pthread_t th;
    double worst = 0, t_end;
    int probes = 0, held = 0;
    static const char *const paths[] = {"/healthz", "/readyz", "/health", "/metrics"};
    (void)h;
    for (int i = 0; i < N_LORIS; i++) {
        loris[i] = dial(50, true);
    }
    T_ASSERT(pthread_create(&th, NULL, loris_main, NULL) == 0);
    for (int i = 0; i < N_IDLE; i++) {
        idle[i] = dial(2 + i % N_IDLE_ADDRS, true);
    }
    usleep(300 * 1000);
    /* Probes for 3 s, under LR_HEALTH_TIMEOUT_SECONDS: every idle
     * connection the server kept is still held meanwhile. */
    t_end = now_ms() + 3000;
    while (now_ms() < t_end) {
        for (size_t p = 0; p < sizeof(paths) / sizeof(paths[0]); p++) {
            reply_t r = get(1, "GET", paths[p]);
            if (r.status != 200 || r.ms > PROBE_MAX_MS) {
                T_FAIL("%s under a flood: status %d after %.0f ms (want 200 within %.0f ms)", paths[p], r.status, r.ms,
                       PROBE_MAX_MS);
            }
            worst = r.ms > worst ? r.ms : worst;
            probes++;
            free(r.body);
        }
        usleep(100 * 1000);
    }
    for (int i = 0; i < N_IDLE; i++) {
        held += closed_by_server(idle[i], 0) ? 0 : 1;
    }
    printf("flood: %d idle connections from %d addresses (%d held by the server) + %d slow-loris: %d probes, "
           "slowest %.1f ms\n",
           N_IDLE, N_IDLE_ADDRS, held, N_LORIS, probes, worst);
    T_ASSERT(held <= LR_HEALTH_MAX_CONNECTIONS);
    {
        /* the refusals are counted (by libmicrohttpd's limits, or because
         * only the reserve was left), the open connections shown */
        reply_t r = get(1, "GET", "/metrics");
        double refused = 0;
        static const char *const reasons[] = {"limit", "reserved"};
        for (int i = 0; i < 2; i++) {
            char key[128];
            const char *at;
            snprintf(key, sizeof(key), "longrun_http_connections_refused_total{reason=\"%s\"} ", reasons[i]);
            at = strstr(r.body, key);
            refused += at != NULL ? atof(at + strlen(key)) : 0;
        }
        printf("flood: %.0f connections refused (longrun_http_connections_refused_total)\n", refused);
        T_ASSERT(refused >= N_IDLE - LR_HEALTH_MAX_CONNECTIONS);
        T_ASSERT(strstr(r.body, "longrun_http_connections ") != NULL);
        free(r.body);
    }
    loris_stop = 1;
    pthread_join(th, NULL);
    for (int i = 0; i < N_IDLE; i++) {
        close(idle[i]);
    }
    for (int i = 0; i < N_LORIS; i++) {
        close(loris[i]);
    }
}

/* ---- 4. idle timeout ------------------------------------------------------ */

static void test_idle_timeout(void) {
    int fd = dial(70, false);
    double t0 = now_ms(), waited;
    bool closed = closed_by_server(fd, (LR_HEALTH_TIMEOUT_SECONDS + 3) * 1000);
    waited = now_ms() - t0;
    close(fd);
    printf("idle connection closed by the server after %.1f s\n", waited / 1000.0);
    T_ASSERT(closed);
}

/* ---- 5. methods ----------------------------------------------------------- */

static void test_methods(void) {
    reply_t r = get(1, "HEAD", "/healthz");
    T_EQ_INT(r.status, 200);
    T_EQ_INT(r.len, 0);
    free(r.body);
    r = request(1, "POST /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc");
    T_EQ_INT(r.status, 405);
    T_ASSERT(strstr(r.head, "Allow: GET, HEAD") != NULL);
    free(r.body);
    r = get(1, "DELETE", "/metrics");
    T_EQ_INT(r.status, 405);
    free(r.body);
    r = get(1, "GET", "/nope");
    T_EQ_INT(r.status, 404);
    free(r.body);
}

/* ---- 6. snapshots --------------------------------------------------------- */

/* /health parses as JSON; returns its "status" object (caller deletes the
 * root, *root). */
static const cJSON *health_status(cJSON **root) {
    reply_t r = get(1, "GET", "/health");
    T_EQ_INT(r.status, 200);
    *root = cJSON_Parse(r.body);
    if (*root == NULL) {
        T_FAIL("/health is not JSON (%zu bytes): %.200s ...", r.len, r.body);
    }
    free(r.body);
    return cJSON_GetObjectItemCaseSensitive(*root, "status");
}

static void test_snapshot(lr_health_t *h) {
    size_t n = 100 * 1024;
    char *big = malloc(LR_HEALTH_SNAPSHOT_MAX + 64);
    cJSON *root;
    const cJSON *st, *v;
    T_ASSERT(big != NULL);
    /* 100 KiB: far above the 6 KiB the daemons used to build in */
    snprintf(big, n + 1, "{\"circuits\":\"%*s\"}", (int)(n - 16), "");
    memset(big + 13, 'c', n - 16);
    T_EQ_INT(lr_health_set_snapshot(h, big), 0);
    st = health_status(&root);
    v = cJSON_GetObjectItemCaseSensitive(st, "circuits");
    T_ASSERT(cJSON_IsString(v));
    T_EQ_INT(strlen(v->valuestring), n - 16);
    cJSON_Delete(root);

    /* cut JSON (what a fixed buffer produces): refused, said in /health */
    T_EQ_INT(lr_health_set_snapshot(h, "{\"worker\":\"w1\",\"circ"), LR_EPARSE);
    st = health_status(&root);
    T_ASSERT(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(st, "snapshot_error")));
    cJSON_Delete(root);

    /* over the maximum: refused, never cut */
    memset(big, ' ', LR_HEALTH_SNAPSHOT_MAX + 10);
    big[0] = '{';
    big[LR_HEALTH_SNAPSHOT_MAX + 9] = '}';
    big[LR_HEALTH_SNAPSHOT_MAX + 10] = '\0';
    T_EQ_INT(lr_health_set_snapshot(h, big), LR_ETOOBIG);
    st = health_status(&root);
    T_ASSERT(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(st, "snapshot_error")));
    cJSON_Delete(root);

    T_EQ_INT(lr_health_set_snapshot(h, "{\"worker\":\"w1\"}"), 0);
    st = health_status(&root);
    T_EQ_STR(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(st, "worker")), "w1");
    cJSON_Delete(root);
    free(big);
}

/* ---- 7. the not-ready reason is masked ----------------------------------- */

static void test_reason_masked(lr_health_t *h) {
    reply_t r;
    lr_health_set_ready(h, 0, "cannot connect to amqp://u:Zq9Xw7Vk@broker:5672/: refused");
    r = get(1, "GET", "/readyz");
    T_EQ_INT(r.status, 503);
    T_ASSERT(strstr(r.body, "Zq9Xw7Vk") == NULL && strstr(r.body, "broker:5672") != NULL);
    free(r.body);
    r = get(1, "GET", "/health");
    T_ASSERT(strstr(r.body, "Zq9Xw7Vk") == NULL);
    free(r.body);
    lr_health_set_ready(h, 1, NULL);
}

/* With arguments, only the phases named (high_fd per_ip flood methods
 * snapshot reason idle_timeout): `test_health flood`. */
static bool want(int argc, char **argv, const char *phase) {
    if (argc < 2) {
        return true;
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], phase) == 0) {
            return true;
        }
    }
    return false;
}

int main(int argc, char **argv) {
    struct rlimit rl;
    lr_health_t *h = NULL;
    char err[256];
    int s;
    struct sockaddr_in a;
    socklen_t alen = sizeof(a);

    T_ASSERT(getrlimit(RLIMIT_NOFILE, &rl) == 0);
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < 4096) {
        T_SKIP("RLIMIT_NOFILE hard limit %lu < 4096", (unsigned long)rl.rlim_max);
    }
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > 8192 ? 8192 : rl.rlim_max;
    T_ASSERT(setrlimit(RLIMIT_NOFILE, &rl) == 0);
    lr_log_init("test", NULL, LR_LOG_WARN, 0);

    /* a free port */
    s = socket(AF_INET, SOCK_STREAM, 0);
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(0x7f000001u);
    T_ASSERT(bind(s, (struct sockaddr *)&a, sizeof(a)) == 0);
    T_ASSERT(getsockname(s, (struct sockaddr *)&a, &alen) == 0);
    port = ntohs(a.sin_port);
    close(s);

    T_EQ_INT(lr_health_start(&h, port, "test", 10000, err, sizeof(err)), 0);
    lr_health_tick(h);
    lr_health_set_ready(h, 1, NULL);

    if (want(argc, argv, "high_fd")) {
        test_high_fd();
    }
    if (want(argc, argv, "per_ip")) {
        test_per_ip();
    }
    if (want(argc, argv, "flood")) {
        test_flood(h);
    }
    if (want(argc, argv, "methods")) {
        test_methods();
    }
    if (want(argc, argv, "snapshot")) {
        test_snapshot(h);
    }
    if (want(argc, argv, "reason")) {
        test_reason_masked(h);
    }
    if (want(argc, argv, "idle_timeout")) {
        test_idle_timeout();
    }

    lr_health_stop(h);
    for (int i = 0; i < N_DUMMY_FDS; i++) {
        if (dummies[i] > 0) {
            close(dummies[i]);
        }
    }
    printf("test_health: ok\n");
    return 0;
}
