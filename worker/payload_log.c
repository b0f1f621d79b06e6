/* payload_log.c - sampled, redacted payload lines; see payload_log.h. */
#include "payload_log.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "redact.h"
#include "text.h"
#include "wmetrics.h"

static lr_redact_t *redactor; /* owned; NULL: not configured, nothing is logged */

int lr_payload_log_configure(const char *classes, const char *patterns, char *errbuf, size_t errlen) {
    lr_redact_t *r = NULL;
    int rc = lr_redact_new(&r, classes, patterns, errbuf, errlen);
    if (rc != 0) {
        return rc;
    }
    lr_redact_free(redactor);
    redactor = r;
    return 0;
}

void lr_payload_log_describe(char *buf, size_t len) {
    size_t n = 0;
    int custom = 0, nc = lr_redact_classes(redactor);
    buf[0] = '\0';
    for (int i = 0; i < nc && n < len; i++) {
        const char *c = lr_redact_class_name(redactor, i);
        if (strcmp(c, "email") == 0 || strcmp(c, "api_key") == 0 || strcmp(c, "card") == 0) {
            n += (size_t)snprintf(buf + n, len - n, "%s%s", n > 0 ? ", " : "", c);
        } else {
            custom++;
        }
    }
    if (custom > 0 && n < len) {
        snprintf(buf + n, len - n, "%s%d custom class%s", n > 0 ? " + " : "", custom, custom == 1 ? "" : "es");
    } else if (n == 0) {
        snprintf(buf, len, "nothing (LONGRUN_LOG_REDACT=none)");
    }
}

void lr_payload_log_free(void) {
    lr_redact_free(redactor);
    redactor = NULL;
}

bool lr_payload_sampled(const char *task_id, double rate) {
    uint32_t h = 2166136261u;
    if (rate <= 0) {
        return false;
    }
    for (const char *p = task_id; *p != '\0'; p++) {
        h = (h ^ (uint8_t)*p) * 16777619u;
    }
    return (double)h / (double)UINT32_MAX < rate;
}

void lr_payload_log(const lr_log_ctx_t *ctx, const char *event, const char *what, const char *text, size_t len) {
    /* Only the start of a payload is read: the window the line can show and
     * the lookahead that lets a secret across the cut be found whole. */
    size_t window = len < LR_PAYLOAD_LOG_MAX + LR_REDACT_LOOKAHEAD ? len : LR_PAYLOAD_LOG_MAX + LR_REDACT_LOOKAHEAD;
    bool cut = false;
    char *clean, counted[48] = "";
    lr_redact_out_t o;
    if (redactor == NULL) {
        return;
    }
    clean = lr_utf8_clean(text != NULL ? text : "", text != NULL ? window : 0, window, &cut);
    if (clean == NULL) {
        return;
    }
    if (lr_redact_text(redactor, clean, strlen(clean), LR_PAYLOAD_LOG_MAX, window < len || cut ? LR_REDACT_PARTIAL : 0,
                       &o) != 0) {
        free(clean);
        return; /* out of memory: no line rather than an unredacted one */
    }
    free(clean);
    if (o.matches > 0) {
        snprintf(counted, sizeof(counted), ", %d redacted", o.matches);
        for (int i = 0; i < lr_redact_classes(redactor); i++) {
            if (o.counts[i] > 0) {
                lr_metric_add(lr_wm.payloads_redacted, (const char *const[]){lr_redact_class_name(redactor, i)},
                              (double)o.counts[i]);
            }
        }
    }
    LR_LOG(LR_LOG_INFO, ctx, event, "%s (%zu bytes%s%s): %s", what, len, o.cut ? ", cut at 4096" : "", counted, o.text);
    lr_metric_add(lr_wm.payloads_logged, NULL, 1);
    free(o.text);
}
