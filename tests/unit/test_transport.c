/*
 * test_transport.c - unit test of common/transport.c: which hosts count as
 * this machine, and which configurations may then go in plain text.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "transport.h"
#include "testutil.h"

#define SECRET "Wq7Zr3Np"

static void local(const char *host, bool want, int line) {
    if (lr_transport_host_is_local(host) != want) {
        fprintf(stderr, "test_transport.c:%d: FAIL: lr_transport_host_is_local(\"%s\") != %s\n", line,
                host != NULL ? host : "(null)", want ? "true" : "false");
        exit(1);
    }
}
#define LOCAL(h) local((h), true, __LINE__)
#define REMOTE(h) local((h), false, __LINE__)

static void test_hosts(void) {
    LOCAL(NULL);
    LOCAL("");
    LOCAL("127.0.0.1");
    LOCAL("127.1.2.3");
    LOCAL("127.255.255.255");
    LOCAL("::1");
    LOCAL("0:0:0:0:0:0:0:1");
    LOCAL("::ffff:127.0.0.1");
    LOCAL("localhost");
    LOCAL("LocalHost");
    LOCAL("localhost.");
    LOCAL("/var/run/postgresql");
    LOCAL("/tmp");
    LOCAL("@abstract-socket");

    REMOTE("10.0.0.1");
    REMOTE("128.0.0.1");
    REMOTE("126.255.255.255");
    REMOTE("0.0.0.0");
    REMOTE("::");
    REMOTE("::2");
    REMOTE("::ffff:10.0.0.1");
    REMOTE("fe80::1");
    REMOTE("192.168.1.10");
    REMOTE("db.example.com");
    REMOTE("localhost.example.com");
    REMOTE("localhostx");
    REMOTE("127.0.0.1.nip.io");
    REMOTE("2130706433"); /* 127.0.0.1 in decimal: a name to inet_pton, resolved by the libraries */
    REMOTE("0177.0.0.1"); /* octal: not a dotted quad for inet_pton */
    REMOTE("127.1");      /* short form: likewise */
    REMOTE("[::1]");      /* brackets are URL syntax, removed by the parsers before this */
    REMOTE(" 127.0.0.1");
}

typedef struct tcase {
    const char *db, *amqp;
    const char *pgsslmode; /* PGSSLMODE, NULL = unset */
    const char *verify;    /* LONGRUN_AMQP_TLS_VERIFY, NULL = unset */
    int want;              /* 0 or LR_ECONFIG */
    const char *says;      /* in the message when refused */
} tcase_t;

#define LOCAL_AMQP "amqp://u:p@127.0.0.1:5672/"

static const tcase_t cases[] = {
    /* PostgreSQL: plain text only to this machine */
    {"postgresql://u:" SECRET "@10.0.0.1/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, LR_ECONFIG,
     "sslmode=disable to 10.0.0.1"},
    {"postgresql://u:" SECRET "@db.example.com/db?sslmode=allow", LOCAL_AMQP, NULL, NULL, LR_ECONFIG,
     "sslmode=allow to db.example.com"},
    {"host=10.0.0.1 password=" SECRET " sslmode=disable", LOCAL_AMQP, NULL, NULL, LR_ECONFIG, "10.0.0.1"},
    {"hostaddr=10.0.0.1 host=localhost sslmode=disable", LOCAL_AMQP, NULL, NULL, LR_ECONFIG, "10.0.0.1"},
    {"postgresql://u@127.0.0.1,10.0.0.2/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, LR_ECONFIG, "10.0.0.2"},
    {"postgresql://u@10.0.0.1/db", LOCAL_AMQP, "disable", NULL, LR_ECONFIG, "sslmode=disable"},
    {"postgresql://u@[fe80::1]/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, LR_ECONFIG, "fe80::1"},
    {"postgresql://u@10.0.0.1/db?sslmode=prefer", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"postgresql://u@10.0.0.1/db", LOCAL_AMQP, NULL, NULL, 0, NULL}, /* prefer */
    {"postgresql://u@10.0.0.1/db?sslmode=require", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"postgresql://u@10.0.0.1/db?sslmode=verify-full", LOCAL_AMQP, "disable", NULL, 0, NULL}, /* URL wins */
    {"postgresql://u@127.0.0.1:5432/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"postgresql://u@[::1]/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"postgresql://u@localhost/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"postgresql://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=disable", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"host=/var/run/postgresql sslmode=disable", LOCAL_AMQP, NULL, NULL, 0, NULL},
    {"dbname=db sslmode=disable", LOCAL_AMQP, NULL, NULL, 0, NULL}, /* the default Unix socket */
    {"", LOCAL_AMQP, "disable", NULL, 0, NULL},
    {"not a conninfo", LOCAL_AMQP, NULL, NULL, 0, NULL}, /* left to the pool to report */
    /* RabbitMQ: amqp:// only to this machine; amqps:// verified */
    {"", "amqp://u:" SECRET "@10.0.0.1:5672/", NULL, NULL, LR_ECONFIG, "amqp:// to 10.0.0.1"},
    {"", "amqp://u:" SECRET "@rabbitmq.example.com/", NULL, NULL, LR_ECONFIG, "rabbitmq.example.com"},
    {"", "amqp://u:" SECRET "@[fd00::5]:5672/", NULL, NULL, LR_ECONFIG, "fd00::5"},
    {"", "amqp://u:p@%31%30.0.0.1/", NULL, NULL, LR_ECONFIG, "10.0.0.1"}, /* percent-decoded as rabbitmq-c does */
    {"", "amqps://u:" SECRET "@10.0.0.1/", NULL, "0", LR_ECONFIG, "LONGRUN_AMQP_TLS_VERIFY=0"},
    {"", "amqps://u:p@10.0.0.1/", NULL, "1", 0, NULL},
    {"", "amqps://u:p@10.0.0.1/", NULL, NULL, 0, NULL},
    {"", "amqp://u:p@[::1]:5672/", NULL, NULL, 0, NULL},
    {"", "amqp://u:p@localhost/", NULL, NULL, 0, NULL},
    {"", "amqps://u:p@127.0.0.1/", NULL, "0", 0, NULL},
};

static void test_check(void) {
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const tcase_t *c = &cases[i];
        char err[512] = "";
        lr_config_t cfg;
        int rc;
        memset(&cfg, 0, sizeof(cfg));
        snprintf(cfg.database_url, sizeof(cfg.database_url), "%s", c->db);
        snprintf(cfg.amqp_url, sizeof(cfg.amqp_url), "%s", c->amqp);
        if (c->pgsslmode != NULL) {
            setenv("PGSSLMODE", c->pgsslmode, 1);
        } else {
            unsetenv("PGSSLMODE");
        }
        if (c->verify != NULL) {
            setenv("LONGRUN_AMQP_TLS_VERIFY", c->verify, 1);
        } else {
            unsetenv("LONGRUN_AMQP_TLS_VERIFY");
        }
        rc = lr_transport_check(&cfg, err, sizeof(err));
        if (rc != c->want) {
            T_FAIL("case %zu (%s, %s): rc %d != %d (%s)", i, c->db, c->amqp, rc, c->want, err);
        }
        if (c->says != NULL && (strstr(err, c->says) == NULL || strstr(err, "LONGRUN_ALLOW_PLAINTEXT=1") == NULL)) {
            T_FAIL("case %zu: \"%s\" should say \"%s\" and LONGRUN_ALLOW_PLAINTEXT=1", i, err, c->says);
        }
        if (strstr(err, SECRET) != NULL) {
            T_FAIL("case %zu: the password leaked: %s", i, err);
        }
        /* the operator's flag lets every case through */
        cfg.allow_plaintext = 1;
        T_EQ_INT(lr_transport_check(&cfg, err, sizeof(err)), 0);
    }
    unsetenv("PGSSLMODE");
    unsetenv("LONGRUN_AMQP_TLS_VERIFY");
}

int main(void) {
    unsetenv("PGHOST");
    unsetenv("PGHOSTADDR");
    test_hosts();
    test_check();
    printf("ok: transport\n");
    return 0;
}
