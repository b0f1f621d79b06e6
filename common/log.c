/* log.c - JSON-lines logger; see log.h. */
#include "log.h"

#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

int lr_log_threshold = LR_LOG_INFO;

static char log_component[32] = "longrun";
static char log_instance[128];
static int log_json = 1;
static FILE *log_out; /* NULL: stdout */

static const char *level_names[] = {"debug", "info", "warn", "error", "off"};

void lr_log_init(const char *component, const char *instance, int level, int json) {
    snprintf(log_component, sizeof(log_component), "%s", component ? component : "longrun");
    snprintf(log_instance, sizeof(log_instance), "%s", instance ? instance : "");
    lr_log_threshold = level;
    log_json = json;
}

void lr_log_to_stderr(void) { log_out = stderr; }

int lr_log_level_parse(const char *s) {
    for (int i = 0; i <= LR_LOG_OFF; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            return i;
        }
    }
    if (strcmp(s, "warning") == 0) {
        return LR_LOG_WARN;
    }
    return -1;
}

size_t lr_json_escape(char *buf, size_t len, size_t cap, const char *s) {
    static const char hex[] = "0123456789abcdef";
    if (cap == 0) {
        return 0;
    }
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        char esc[7];
        size_t n = 0;
        /* clang-format off */
        switch (*p) {
        case '"': esc[0] = '\\'; esc[1] = '"'; n = 2; break;
        case '\\': esc[0] = '\\'; esc[1] = '\\'; n = 2; break;
        case '\n': esc[0] = '\\'; esc[1] = 'n'; n = 2; break;
        case '\r': esc[0] = '\\'; esc[1] = 'r'; n = 2; break;
        case '\t': esc[0] = '\\'; esc[1] = 't'; n = 2; break;
        default:
            if (*p < 0x20) {
                esc[0] = '\\'; esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
                esc[4] = hex[*p >> 4]; esc[5] = hex[*p & 15]; n = 6;
            } else {
                esc[0] = (char)*p; n = 1;
            }
        }
        /* clang-format on */
        if (len + n >= cap) {
            break;
        }
        memcpy(buf + len, esc, n);
        len += n;
    }
    buf[len < cap ? len : cap - 1] = '\0';
    return len;
}

/* A message of LR_LOG_MSG_MAX bytes holds a whole payload line (4 KiB of
 * payload, worker/payload_log.h) and its prefix; the line has room for it
 * escaped.  Longer ones are cut. */
#define LR_LOG_MSG_MAX 6144
#define LR_LOG_LINE_MAX 16384

void lr_log_emit(int level, const lr_log_ctx_t *ctx, const char *event, const char *fmt, ...) {
    char raw[LR_LOG_MSG_MAX];
    char msg[LR_LOG_MSG_MAX];
    char line[LR_LOG_LINE_MAX];
    size_t n = 0;
    struct timeval tv;
    struct tm tm;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(raw, sizeof(raw), fmt, ap);
    va_end(ap);
    /* Whatever the caller formatted (a DSN, a URL inside an error message),
     * no secret reaches the log. */
    (void)lr_config_mask_secrets(raw, msg, sizeof(msg));
    if (level < 0 || level > LR_LOG_ERROR) {
        level = LR_LOG_ERROR;
    }
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);

    if (log_json) {
        n = (size_t)snprintf(line, sizeof(line),
                             "{\"ts\":\"%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ\",\"level\":\"%s\","
                             "\"component\":\"%s\"",
                             tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                             (long)(tv.tv_usec / 1000), level_names[level], log_component);
        if (log_instance[0] != '\0') {
            n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"worker\":\"");
            n = lr_json_escape(line, n, sizeof(line), log_instance);
            n += (size_t)snprintf(line + n, sizeof(line) - n, "\"");
        }
        n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"event\":\"");
        n = lr_json_escape(line, n, sizeof(line), event);
        n += (size_t)snprintf(line + n, sizeof(line) - n, "\"");
        if (ctx != NULL && ctx->task_id != NULL) {
            n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"task_id\":\"%s\"", ctx->task_id);
        }
        if (ctx != NULL && ctx->step >= 0) {
            n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"step\":%lld", (long long)ctx->step);
        }
        if (ctx != NULL && ctx->epoch >= 0) {
            n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"epoch\":%lld", (long long)ctx->epoch);
        }
        n += (size_t)snprintf(line + n, sizeof(line) - n, ",\"msg\":\"");
        n = lr_json_escape(line, n, sizeof(line) - 3, msg);
        n += (size_t)snprintf(line + n, sizeof(line) - n, "\"}\n");
    } else {
        n = (size_t)snprintf(line, sizeof(line), "%02d:%02d:%02d.%03ld %-5s %s%s%s", tm.tm_hour, tm.tm_min, tm.tm_sec,
                             (long)(tv.tv_usec / 1000), level_names[level], event,
                             ctx != NULL && ctx->task_id != NULL ? " task=" : "",
                             ctx != NULL && ctx->task_id != NULL ? ctx->task_id : "");
        if (n < sizeof(line) && ctx != NULL && ctx->step >= 0) {
            n += (size_t)snprintf(line + n, sizeof(line) - n, " step=%lld", (long long)ctx->step);
        }
        if (n < sizeof(line)) {
            n += (size_t)snprintf(line + n, sizeof(line) - n, " %s\n", msg);
        }
    }
    if (n >= sizeof(line)) {
        n = sizeof(line) - 1;
        line[n - 1] = '\n';
    }
    fwrite(line, 1, n, log_out != NULL ? log_out : stdout);
    fflush(log_out != NULL ? log_out : stdout);
}
