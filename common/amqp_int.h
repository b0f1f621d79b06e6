/*
 * amqp_int.h - what the files of the RabbitMQ client share (amqp.c, amqp_wire.c,
 * amqp_conn.c, amqp_owner.c, amqp_sync.c); not for the rest of the program,
 * which sees amqp.h.
 */
#ifndef LR_AMQP_INT_H
#define LR_AMQP_INT_H

#include "amqp.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "list.h"
#include "log.h"
#include "metrics.h"

#define CHANNEL 1
#define FRAME_MAX 131072
#ifndef OWNER_HEARTBEAT_S
#define OWNER_HEARTBEAT_S 30 /* owner connection; rabbitmq-c sends and checks them */
#endif
#define CONNECT_TIMEOUT_MS 10000 /* owner thread: TCP + TLS connect, then login */
#define RPC_TIMEOUT_MS 30000     /* any synchronous AMQP method (declare, consume, ...) */
#define CLOSE_TIMEOUT_MS 2000    /* graceful channel/connection close */
#define CONTENT_TIMEOUT_MS 30000 /* between the frames of one message */
#define IDLE_TICK_MS 1000        /* owner wakes at least this often (heartbeats) */
#define STOP_GRACE_MS 3000       /* after stop's timeout, kick a stuck socket */
#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 10000
#define MAX_INFLIGHT 65536     /* publishes accepted and not yet completed */
#define CMD_BATCH 1024         /* commands executed before reading frames again */
#define FRAME_BATCH 256        /* frames handled before executing commands again */
#define MAX_MSG_HEADERS 64     /* header pairs per published message */
#define MAX_SHORTSTR 255       /* AMQP short strings: names, ids, content type */
#define MAX_HEADER_BYTES 32768 /* sum of header names and values per message */
#define MAX_QUEUE_NAME 200     /* short task-queue name (longrun.q. prepended) */
#define HEADERS_JSON_MAX (1024 * 1024)
#define JSON_MAX_DEPTH 16
#define DETAIL_MAX 512
#define SYNC_NACK_ATTEMPTS 4 /* blocking publish: tries when the broker nacks */
#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"
#define FNV_INIT 14695981039346656037ull /* FNV-1a offset basis (lra_fnv1a) */

typedef struct url {
    char *buf; /* parsed copy; ci's strings point into it */
    struct amqp_connection_info ci;
    char redacted[320]; /* amqp://user@host:port/vhost, no password */
} url_t;

typedef struct conn {
    amqp_connection_state_t st;
    bool channel_open;
    bool broken;       /* socket unusable: skip the polite close */
    uint64_t next_seq; /* confirm sequence number of the next publish */
} conn_t;

/* A failed synchronous method, translated. */
typedef struct rpc_err {
    int code;                /* AMQP reply code (403, 404, 406, 320...) or 0 */
    char server[DETAIL_MAX]; /* the broker's reply text, or the library's */
} rpc_err_t;

/* One message's content (header frame + body frames), read after
 * basic.deliver or basic.return. */
typedef struct content {
    amqp_basic_properties_t *props; /* in the connection's pool: valid until
                                       amqp_maybe_release_buffers() */
    char *body;                     /* malloc'd, NUL-terminated, or NULL if not kept */
    size_t body_len;                /* bytes kept in body */
    uint64_t total_len;             /* body size announced by the broker */
    bool truncated;                 /* total_len > the kept limit */
    uint64_t hash;                  /* FNV-1a of the whole body */
} content_t;

typedef struct item item_t;

typedef struct pub {
    item_t *ev; /* the publish command's own item, reused as its outcome
                   event so that reporting the outcome cannot fail */
    lr_amqp_confirm_cb cb;
    void *arg;
    int result;    /* outcome once completed */
    uint64_t seq;  /* confirm sequence number once sent */
    bool returned; /* basic.return seen; the ack that follows means failure */
    uint64_t hash; /* body hash, to recognise a basic.return */
    char *exchange, *routing_key;
    lr_amqp_msg_t msg;    /* points into strs / body */
    char *body;           /* freed once sent */
    char *strs;           /* one allocation: ids, content type, header pairs */
    const char **headers; /* inside strs */
} pub_t;

/* Unconfirmed publishes by sequence number: v[(head + i) % cap] holds seq
 * base + i, NULL once completed out of order. */
typedef struct ring {
    pub_t **v;
    size_t cap, head, n;
    uint64_t base;
} ring_t;

typedef enum {
    CMD_ACK,
    CMD_REJECT,
    CMD_PUBLISH,
    CMD_CANCEL,
    CMD_STOP,
    EV_DELIVERY,
    EV_CONFIRM,
    EV_STATE,
    EV_STOPPED,
} item_type_t;

/* A command (loop -> owner) or an event (owner -> loop). */
struct item {
    lr_list_t link; /* in one of the command or event lists below */
    item_type_t type;
    uint64_t generation;          /* CMD_ACK/REJECT: of the delivery; EV_STATE: new one */
    uint64_t tag;                 /* CMD_ACK/REJECT */
    bool requeue;                 /* CMD_REJECT */
    long timeout_ms;              /* CMD_STOP */
    pub_t *pub;                   /* CMD_PUBLISH, EV_CONFIRM */
    lr_amqp_delivery_t *delivery; /* EV_DELIVERY */
    int connected;                /* EV_STATE */
    char *detail;                 /* EV_STATE */
};

typedef enum {
    OWNER_DISCONNECTED, /* no connection; waiting for the next attempt */
    OWNER_CONNECTING,   /* connect, login, declare, consume in progress */
    OWNER_READY,        /* connected: consuming (unless cancelled) and publishing */
    OWNER_DRAINING,     /* stop requested: waiting for outstanding confirms */
    OWNER_CLOSED,       /* finished; the thread is exiting */
} owner_state_t;

struct lr_amqp {
    /* Immutable after lr_amqp_start (read by both threads). */
    uv_loop_t *loop;
    url_t url;
    char **consume; /* NULL-terminated full queue names */
    size_t nconsume;
    char **declare; /* NULL-terminated short names */
    int prefetch;
    int delivery_limit;
    int max_length;
    lr_amqp_delivery_cb on_delivery;
    lr_amqp_state_cb on_state;
    void *arg;
    char conn_name[128];

    /* libuv handles (loop thread). */
    uv_async_t async;
    uv_timer_t stop_timer;
    int open_handles;

    pthread_t thread;
    int wake_fd; /* eventfd: commands are waiting */

    /* Shared, guarded by mu. */
    pthread_mutex_t mu;
    lr_list_t cmds;   /* item_t, oldest first */
    bool wake_armed;  /* wake_fd has been written and not yet read */
    lr_list_t events; /* item_t, oldest first */
    int kick_fd;      /* current socket, for stop's last resort; -1 when none */

    /* Loop thread only. */
    bool stopping;
    bool stopped;        /* EV_STOPPED seen; thread joined */
    size_t inflight;     /* publishes accepted, outcome not yet delivered */
    uint64_t generation; /* generation announced by the last on_state(1) */
    int connected;
    bool cancelled;
    item_t *stop_item;    /* preallocated so that lr_amqp_stop cannot fail */
    item_t *stopped_item; /* preallocated EV_STOPPED (owner thread uses it last) */
    void (*done)(void *);
    void *done_arg;

    /* Owner thread only. */
    owner_state_t state;
    conn_t conn;
    uint64_t t_generation;
    bool t_cancelled; /* basic.cancel requested: do not consume again */
    bool t_stop;
    uint64_t t_stop_deadline;
    ring_t unconfirmed;
    lr_list_t t_cmds;   /* commands taken from cmds, not yet executed */
    lr_list_t t_events; /* events not yet handed to the loop */
    uint64_t rng;
};

/* Shared functions (amqp_wire.c, amqp_conn.c, amqp_owner.c). */
uint64_t lra_now_ms(void);
struct timeval lra_ms_to_tv(long ms);
const char *lra_errno_text(int e, char *buf, size_t len);
const char *lra_status_text(int status, int saved_errno, char *buf, size_t len);
char *lra_dup_bytes(amqp_bytes_t b);
char *lra_dup_str(const char *s);
bool lra_bytes_eq(amqp_bytes_t b, const char *s);
uint64_t lra_fnv1a(uint64_t h, const void *data, size_t len);
void lra_url_free(url_t *u);
int lra_url_parse(url_t *u, const char *url, char *errbuf, size_t errlen);
int lra_status_err(int status);
void lra_send_channel_close_ok(conn_t *c);
int lra_rpc_check(conn_t *c, rpc_err_t *e);
int lra_conn_open(conn_t *c, const url_t *u, long timeout_ms, int heartbeat, const char *conn_name, char *errbuf,
                  size_t errlen);
void lra_conn_close(conn_t *c);
int lra_channel_recover(conn_t *c);
int lra_handle_channel0(conn_t *c, const amqp_frame_t *f, char *detail, size_t dlen);
int lra_wait_frame(conn_t *c, amqp_frame_t *f, long timeout_ms, char *detail, size_t dlen);
int lra_read_content(conn_t *c, size_t keep, content_t *ct, char *detail, size_t dlen);
int lra_msg_validate(const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg, char *errbuf,
                     size_t errlen);
int lra_send_publish(conn_t *c, const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg);
int lra_check_queue_names(const char *const *queues, char *errbuf, size_t errlen);
int lra_declare_topology(conn_t *c, const char *const *queues, int delivery_limit, int max_length, char *errbuf,
                         size_t errlen);
char *lra_headers_to_json(const amqp_table_t *t);
int64_t lra_header_int(const amqp_table_t *t, const char *key);
void lra_pub_free(pub_t *p);
pub_t *lra_pub_new(const char *exchange, const char *routing_key, const lr_amqp_msg_t *msg, lr_amqp_confirm_cb cb,
                   void *arg);
item_t *lra_item_pop(lr_list_t *l);
void lra_item_free(item_t *it);
void lra_confirm(lr_amqp_t *a, uint64_t tag, bool multiple, int err);
void *lra_owner_main(void *arg);

#endif
