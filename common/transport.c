/* transport.c - which connections may be plain text; see transport.h. */
#include "transport.h"

#include <arpa/inet.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "amqp.h"

#define ALLOW_HINT "set LONGRUN_ALLOW_PLAINTEXT=1 only on a network you trust"

bool lr_transport_host_is_local(const char *host) {
    struct in_addr a4;
    struct in6_addr a6;
    if (host == NULL || host[0] == '\0' || host[0] == '/' || host[0] == '@') {
        return true;
    }
    if (strcasecmp(host, "localhost") == 0 || strcasecmp(host, "localhost.") == 0) {
        return true;
    }
    if (inet_pton(AF_INET, host, &a4) == 1) {
        return (ntohl(a4.s_addr) >> 24) == 127;
    }
    if (inet_pton(AF_INET6, host, &a6) == 1) {
        return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
    }
    return false;
}

/* The value libpq will use for keyword: the conninfo's, else its PG*
 * environment variable's; NULL when neither is set.  Borrowed from opts or
 * the environment. */
static const char *pq_value(const PQconninfoOption *opts, const char *keyword) {
    for (const PQconninfoOption *o = opts; o->keyword != NULL; o++) {
        if (strcmp(o->keyword, keyword) != 0) {
            continue;
        }
        if (o->val != NULL && o->val[0] != '\0') {
            return o->val;
        }
        if (o->envvar != NULL) {
            const char *v = getenv(o->envvar);
            if (v != NULL && v[0] != '\0') {
                return v;
            }
        }
        return NULL;
    }
    return NULL;
}

/* The first entry of a comma-separated libpq host list that is not local,
 * copied into out (cut to fit); false when every entry is local.  An empty
 * entry is libpq's default (the Unix socket). */
static bool first_remote(const char *list, char *out, size_t outlen) {
    const char *p = list;
    while (p != NULL) {
        const char *comma = strchr(p, ',');
        size_t n = comma != NULL ? (size_t)(comma - p) : strlen(p);
        char host[256];
        if (n < sizeof(host)) {
            memcpy(host, p, n);
            host[n] = '\0';
        } else {
            snprintf(host, sizeof(host), "(a %zu-byte host name)", n);
        }
        if (!lr_transport_host_is_local(host)) {
            snprintf(out, outlen, "%s", host);
            return true;
        }
        p = comma != NULL ? comma + 1 : NULL;
    }
    return false;
}

static int check_pg(const char *conninfo, char *errbuf, size_t errlen) {
    char *perr = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &perr);
    const char *mode, *host, *hostaddr;
    char remote[256];
    int rc = 0;
    if (opts == NULL) {
        /* A conninfo libpq cannot read is not ours to judge: the pool
           reports it at start. */
        if (perr == NULL) {
            return lr_seterr(errbuf, errlen, LR_ENOMEM, "out of memory");
        }
        PQfreemem(perr);
        return 0;
    }
    mode = pq_value(opts, "sslmode");
    host = pq_value(opts, "host");
    hostaddr = pq_value(opts, "hostaddr");
    /* disable never encrypts; allow tries without TLS first and uses it
       only if the server insists.  prefer (the default) and the stronger
       modes encrypt whenever the server offers TLS. */
    if (mode != NULL && (strcmp(mode, "disable") == 0 || strcmp(mode, "allow") == 0) &&
        (first_remote(host != NULL ? host : "", remote, sizeof(remote)) ||
         first_remote(hostaddr != NULL ? hostaddr : "", remote, sizeof(remote)))) {
        char shown[300];
        (void)lr_config_mask_secrets(remote, shown, sizeof(shown));
        rc = lr_seterr(errbuf, errlen, LR_ECONFIG,
                       "LONGRUN_DATABASE_URL: sslmode=%s to %s, which is not this machine, sends the "
                       "database password and every task in plain text; use sslmode=verify-full "
                       "(sslrootcert= the server's CA), or " ALLOW_HINT,
                       strcmp(mode, "disable") == 0 ? "disable" : "allow", shown);
    }
    PQconninfoFree(opts);
    return rc;
}

static int check_amqp(const char *url, char *errbuf, size_t errlen) {
    char host[256], shown[300];
    const char *verify = getenv("LONGRUN_AMQP_TLS_VERIFY");
    bool tls = false;
    int rc = lr_amqp_url_host(url, host, sizeof(host), &tls, NULL, 0);
    if (rc == LR_ENOMEM) {
        return lr_seterr(errbuf, errlen, rc, "out of memory");
    }
    if (rc != 0 || lr_transport_host_is_local(host)) {
        return 0; /* a bad URL is reported when the connection starts */
    }
    (void)lr_config_mask_secrets(host, shown, sizeof(shown));
    if (!tls) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "LONGRUN_AMQP_URL: amqp:// to %s, which is not this machine, sends the broker "
                         "password and every task in plain text; use amqps:// (LONGRUN_AMQP_CACERT= the "
                         "broker's CA), or " ALLOW_HINT,
                         shown);
    }
    if (verify != NULL && strcmp(verify, "0") == 0) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "LONGRUN_AMQP_TLS_VERIFY=0: amqps:// to %s without checking the broker's "
                         "certificate lets anyone on the path read it; set LONGRUN_AMQP_CACERT to the "
                         "broker's CA instead, or " ALLOW_HINT,
                         shown);
    }
    return 0;
}

int lr_transport_check(const lr_config_t *cfg, char *errbuf, size_t errlen) {
    int rc;
    if (cfg->allow_plaintext) {
        return 0;
    }
    rc = check_pg(cfg->database_url, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    return check_amqp(cfg->amqp_url, errbuf, errlen);
}
