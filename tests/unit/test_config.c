/*
 * test_config.c - unit test of common/config.c: secret masking
 * (lr_config_mask_secrets) on every form a DSN or URL takes, and the places
 * that must use it: lr_config_print (--print-config), and every log line
 * (lr_log_emit).
 *
 * A secret is "leaked" when any 3-byte run of it shows up in the output: the
 * secrets below are made of runs that appear nowhere else, so a partly
 * masked password (a cut at a quote, at an '@', at a space) fails too.
 */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"
#include "testutil.h"

#define S1 "Zq9Xw7Vk"
#define S2 "Pm4Hj2Rt"

static int cases;

/* Fails when any 3-byte run of secret occurs in out. */
static void no_secret_at(const char *in, const char *out, const char *secret, int line) {
    size_t n = strlen(secret);
    for (size_t i = 0; i + 3 <= n; i++) {
        char run[4];
        memcpy(run, secret + i, 3);
        run[3] = '\0';
        if (strstr(out, run) != NULL) {
            fprintf(stderr, "test_config.c:%d: FAIL: secret %s leaks (run \"%s\")\n  in:  %s\n  out: %s\n", line,
                    secret, run, in, out);
            exit(1);
        }
    }
}

/* Masks in; out must hold no byte run of either secret and must contain
 * every string of keep (NULL-terminated). */
static void check_at(const char *in, const char *const *keep, int line) {
    char out[2048];
    lr_config_mask_secrets(in, out, sizeof(out));
    no_secret_at(in, out, S1, line);
    no_secret_at(in, out, S2, line);
    for (int i = 0; keep != NULL && keep[i] != NULL; i++) {
        if (strstr(out, keep[i]) == NULL) {
            fprintf(stderr, "test_config.c:%d: FAIL: \"%s\" lost\n  in:  %s\n  out: %s\n", line, keep[i], in, out);
            exit(1);
        }
    }
    cases++;
}
#define CHECK(in, ...) check_at((in), (const char *const[]){__VA_ARGS__, NULL}, __LINE__)

/* Text without secrets comes back byte for byte. */
static void same_at(const char *in, int line) {
    char out[2048];
    lr_config_mask_secrets(in, out, sizeof(out));
    if (strcmp(in, out) != 0) {
        fprintf(stderr, "test_config.c:%d: FAIL: changed\n  in:  %s\n  out: %s\n", line, in, out);
        exit(1);
    }
    cases++;
}
#define SAME(in) same_at((in), __LINE__)

static void test_forms(void) {
    /* PostgreSQL URIs: userinfo and query parameters (libpq's password and
     * sslpassword), percent-encoded, IPv6, several hosts (which curl cannot
     * parse but libpq can), a socket directory in the query. */
    CHECK("postgresql://u@h/db?password=" S1, "h", "db", "***");
    CHECK("postgresql://u:" S1 "@h:5432/db", "h", "5432", "db", "***");
    CHECK("postgres://u:" S1 "@h/db?sslmode=require&sslpassword=" S2, "require", "***");
    CHECK("postgresql://u:" S1 "@h1:5432,h2:5433/db?password=" S2, "h1", "h2", "5433", "***");
    CHECK("postgresql://u:Zq%40" S1 "@h/db", "h", "***");
    CHECK("postgresql://u:" S1 "@[::1]:5432/db", "::1", "***");
    CHECK("postgresql:///db?host=/var/run/postgresql&password=" S1, "/var/run/postgresql", "***");
    CHECK("postgresql://h/db?application_name=x&password=" S1 "&connect_timeout=5", "application_name",
          "connect_timeout", "***");
    /* libpq refuses an upper-case keyword; the mask must not rely on libpq. */
    CHECK("postgresql://h/db?PASSWORD=" S1, "***");
    /* key=value conninfo: any order, quotes, escapes, spaces around '=' */
    CHECK("host=h password=" S1 " user=u", "host=h", "user=u", "***");
    CHECK("password=" S1 " host=h", "host=h", "***");
    CHECK("host=h sslpassword=" S1 " sslmode=verify-full", "verify-full", "***");
    CHECK("host=h password='" S1 " " S2 "' user=u", "user=u", "***");
    CHECK("host=h password='" S1 "\\' " S2 "' user=u", "user=u", "***");
    CHECK("host=h password = " S1 " user=u", "user=u", "***");
    CHECK("host=h password=" S1 "\\ " S2 " user=u", "user=u", "***");
    CHECK("host=h dbname=d password=", "host=h");
    /* a dbname that is itself a conninfo (libpq expands it), a password
     * that looks like a URL */
    CHECK("dbname=postgresql://u:" S1 "@h/db", "dbname=");
    CHECK("dbname='host=h password=" S1 "' user=x", "user=x");
    CHECK("host=h password=abc://" S1 " user=u", "user=u");
    CHECK("postgresql://h/postgresql%3A%2F%2Fu%3A" S1 "%40h%2Fdb", "host=h");
    /* AMQP URLs */
    CHECK("amqp://u:" S1 "@h", "amqp://u:***@h");
    CHECK("amqps://u:" S1 "@h:5671/vhost", "amqps://u:***@h:5671/vhost");
    CHECK("amqp://:" S1 "@h:5672/%2F", "***@h:5672/%2F");
    CHECK("amqp://u:Zq%40" S1 "@h/", "amqp://u:***@h/");
    /* an unencoded '@' in the password: unparseable, masked whole */
    CHECK("amqp://u:" S1 "@" S2 "@h/", "amqp://");
    /* HTTP URLs: userinfo and credentials in the query or fragment */
    CHECK("https://u:" S1 "@models.example.com/v1", "models.example.com/v1");
    CHECK("https://generativelanguage.example.com/v1/models?key=" S1 "&alt=sse", "alt=sse", "key=***");
    CHECK("https://h/p?access_token=" S1 "&x=1#id_token=" S2, "x=1");
    CHECK("https://h/p?X-Amz-Signature=" S1 "&X-Amz-Credential=" S2 "&X-Amz-Expires=60", "X-Amz-Expires=60");
    CHECK("https://h/p?client_secret=" S1 "&api_key=" S2, "https://h/p?");
    /* URLs and conninfo inside error messages */
    CHECK("cannot connect to amqp://u:" S1 "@h:5672/v: connection refused", "cannot connect to", "h:5672",
          "connection refused");
    CHECK("cannot connect to PostgreSQL at postgresql://u:" S1 "@db.internal:5432/app: timeout", "db.internal",
          ": timeout");
    CHECK("upstream \"https://u:" S1 "@h/x?token=" S2 "\" failed", "upstream \"", "\" failed");
    CHECK("pg: invalid conninfo: host=h password=" S1 " junk", "pg: invalid conninfo", "junk");
    CHECK("two: amqp://a:" S1 "@h1/ and amqp://b:" S2 "@h2/", "h1", "h2", " and ");
    CHECK("PGPASSWORD=" S1 " psql", "psql");
    CHECK("bad: password='" S2 "' is quoted", "bad:", "is quoted");
    /* no secrets: unchanged, byte for byte */
    SAME("postgresql://longrun@127.0.0.1:55432/longrun");
    SAME("host=h port=5432 user=u dbname=d");
    SAME("amqp://longrun@127.0.0.1:55672/");
    SAME("https://api.example.com/v1/chat/completions?stream=true");
    SAME("FATAL:  password authentication failed for user \"u\"");
    SAME("plain text, 100% fine: a=b c=d");
    SAME("");
}

/* A buffer too small cuts the masked text, never the mask. */
static void test_cut(void) {
    char out[24];
    const char *in = "postgresql://u:" S1 "@h/db?password=" S2;
    for (size_t cap = 1; cap <= sizeof(out); cap++) {
        memset(out, 'x', sizeof(out));
        lr_config_mask_secrets(in, out, cap);
        T_ASSERT(memchr(out, '\0', cap) != NULL);
        no_secret_at(in, out, S1, __LINE__);
        no_secret_at(in, out, S2, __LINE__);
    }
}

/* --print-config masks both sensitive entries, whatever their form. */
static void test_print(void) {
    lr_config_t cfg;
    char err[256];
    char *text = NULL;
    size_t len = 0;
    FILE *f;
    setenv("LONGRUN_DATABASE_URL", "host=127.0.0.1 user=u password=" S1 " dbname=d", 1);
    setenv("LONGRUN_AMQP_URL", "amqp://u:" S2 "@127.0.0.1:5672/", 1);
    T_EQ_INT(lr_config_load(&cfg, err, sizeof(err)), 0);
    f = open_memstream(&text, &len);
    T_ASSERT(f != NULL);
    lr_config_print(&cfg, f);
    fclose(f);
    no_secret_at("print-config", text, S1, __LINE__);
    no_secret_at("print-config", text, S2, __LINE__);
    T_ASSERT(strstr(text, "LONGRUN_DATABASE_URL=") != NULL);
    T_ASSERT(strstr(text, "127.0.0.1") != NULL);
    free(text);
    unsetenv("LONGRUN_DATABASE_URL");
    unsetenv("LONGRUN_AMQP_URL");
}

/* Every log line goes through the mask, whatever the caller formatted. */
static void test_log(void) {
    char path[] = "/tmp/test_config_log.XXXXXX";
    char text[8192];
    int fd = mkstemp(path);
    int saved = dup(STDOUT_FILENO);
    ssize_t n;
    T_ASSERT(fd >= 0 && saved >= 0);
    fflush(stdout);
    T_ASSERT(dup2(fd, STDOUT_FILENO) >= 0);
    for (int json = 0; json <= 1; json++) {
        lr_log_init("test", "w1", LR_LOG_INFO, json);
        lr_warn("test.dsn", "cannot connect to %s: refused", "postgresql://u:" S1 "@h/db?sslpassword=" S2);
        lr_warn("test.conninfo", "%s", "host=h password='" S1 " " S2 "' user=u");
        lr_error("test.amqp", "broker at amqp://u:%s@h:5672/ closed the connection", S2);
    }
    fflush(stdout);
    T_ASSERT(dup2(saved, STDOUT_FILENO) >= 0);
    close(saved);
    n = pread(fd, text, sizeof(text) - 1, 0);
    close(fd);
    unlink(path);
    T_ASSERT(n > 0);
    text[n] = '\0';
    no_secret_at("log", text, S1, __LINE__);
    no_secret_at("log", text, S2, __LINE__);
    T_ASSERT(strstr(text, "test.dsn") != NULL && strstr(text, "closed the connection") != NULL);
}

int main(void) {
    test_forms();
    test_cut();
    test_print();
    test_log();
    printf("test_config: %d masking cases, cut, print-config and log lines ok\n", cases);
    return 0;
}
