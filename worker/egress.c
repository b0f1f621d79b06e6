/*
 * egress.c - the connect-time address check of model and tool calls
 * (egress.h).
 */
#include "egress.h"

#include <stdio.h>

#include "core.h"

#include "err.h"
#include "log.h"
#include "wmetrics.h"

int lr_egress_parse(lr_urlguard_t **out, const char *text, char *errbuf, size_t errlen) {
    unsigned allowed = 1u << LR_UG_LOOPBACK | 1u << LR_UG_PRIVATE | 1u << LR_UG_UNIQUE_LOCAL;
    return lr_urlguard_nets(out, text != NULL ? text : "", allowed, errbuf, errlen);
}

void lr_worker_egress(lr_worker_t *w, lr_http_opts_t *o) {
    o->check_addr = lr_egress_check;
    o->check_arg = w->egress;
}

int lr_egress_check(const struct sockaddr *sa, size_t len, void *arg, char *why, size_t whylen) {
    const lr_urlguard_t *g = arg;
    enum lr_urlguard_reason r;
    char addr[64];
    if (g == NULL || lr_urlguard_check_addr(g, 0, sa, len, &r) == 0) {
        return 0;
    }
    lr_urlguard_addr_str(sa, len, addr, sizeof(addr));
    snprintf(why, whylen, "%s is %s, not listed in LONGRUN_EGRESS_ALLOW", addr, lr_urlguard_reason_name(r));
    lr_metric_inc1(lr_wm.egress_refused, lr_urlguard_reason_name(r));
    lr_warn("egress.refused", "connection to %s refused: %s", addr, why);
    return LR_EPERM;
}
