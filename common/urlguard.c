/*
 * urlguard.c - URL allow rules and the connect-time address check; see
 * urlguard.h for what is checked and why.
 *
 * URLs are parsed by libcurl's URL API (curl_url_set with CURLUPART_URL),
 * the same parser the transfer uses, so the host and port checked are the
 * ones curl connects to: curl lower-cases the scheme, decodes a
 * percent-encoded host and rewrites IPv4 numbers in any base ("2130706433",
 * "0177.0.0.1", "0x7f.1") as dotted decimal.  What curl 7.88 leaves alone
 * is done here: the host is lower-cased, percent-encoded unreserved
 * characters of the path are decoded (so "%2e%2e" is a dot segment) and dot
 * segments removed again.  The URL sent is rebuilt from that normalised
 * form, so the server sees the path the rules saw.
 *
 * The address table is the one place that says which ranges are internal.
 * Pure functions; no I/O; a guard is immutable once parsed.
 */
#include "urlguard.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_HOST 253
#define MAX_EGRESS_NETS (4 * LR_URLGUARD_MAX_NETS)
#define MAX_RULES_TEXT (64 * 1024)

/* An address range; family 4 uses a[0..3]. */
typedef struct net {
    int family; /* 4 or 6 */
    uint8_t a[16];
    int bits;
} net_t;

typedef struct rule {
    char scheme[8];
    char host[MAX_HOST + 1]; /* lower case; without the "*." of a subdomain rule */
    bool sub;                /* "*.host": any subdomain of host, not host itself */
    bool ip;                 /* host is an IP literal (nets[0] is that address) */
    long port;
    char *path; /* normalised prefix ("/" = any) */
    net_t nets[LR_URLGUARD_MAX_NETS];
    int nnets;
} rule_t;

struct lr_urlguard {
    rule_t rules[LR_URLGUARD_MAX_RULES];
    int nrules;
    net_t nets[MAX_EGRESS_NETS]; /* the egress list */
    int nnets;
    unsigned allowed; /* classes allowed unlisted (1u << reason) */
};

/* A parsed URL, normalised. */
typedef struct parsed {
    char scheme[8];
    char host[MAX_HOST + 1];
    bool ip;
    net_t addr; /* when ip */
    long port;
    char *path; /* malloc'd */
} parsed_t;

static const char *const reason_names[] = {
#define LR_UG_NAME(name, text) text,
    LR_URLGUARD_REASONS(LR_UG_NAME)
#undef LR_UG_NAME
};

const char *lr_urlguard_reason_name(enum lr_urlguard_reason r) {
    return (unsigned)r < LR_UG_COUNT ? reason_names[r] : "unknown";
}

/* ---- addresses ---------------------------------------------------------- */

typedef struct range {
    net_t net;
    enum lr_urlguard_reason cls;
} range_t;

#define V4(b0, b1, b2, b3, n, c) \
    { {4, {b0, b1, b2, b3}, n}, c }
#define V6(n, c, ...) \
    { {6, {__VA_ARGS__}, n}, c }

/* First match wins: the single metadata addresses come before the ranges
 * that hold them. */
static const range_t ranges[] = {
    V4(0, 0, 0, 0, 8, LR_UG_UNSPECIFIED),
    V4(10, 0, 0, 0, 8, LR_UG_PRIVATE),
    V4(100, 100, 100, 200, 32, LR_UG_METADATA), /* Alibaba Cloud */
    V4(100, 64, 0, 0, 10, LR_UG_PRIVATE),       /* carrier-grade NAT */
    V4(127, 0, 0, 0, 8, LR_UG_LOOPBACK),
    V4(168, 63, 129, 16, 32, LR_UG_METADATA),   /* Azure wire server */
    V4(169, 254, 169, 254, 32, LR_UG_METADATA), /* AWS, GCP, Azure, OpenStack, ... */
    V4(169, 254, 170, 2, 32, LR_UG_METADATA),   /* AWS ECS task metadata */
    V4(169, 254, 0, 0, 16, LR_UG_LINK_LOCAL),
    V4(172, 16, 0, 0, 12, LR_UG_PRIVATE),
    V4(192, 0, 0, 192, 32, LR_UG_METADATA), /* Oracle Cloud */
    V4(192, 0, 0, 0, 24, LR_UG_RESERVED),
    V4(192, 168, 0, 0, 16, LR_UG_PRIVATE),
    V4(198, 18, 0, 0, 15, LR_UG_RESERVED),
    V4(224, 0, 0, 0, 4, LR_UG_RESERVED), /* multicast */
    V4(240, 0, 0, 0, 4, LR_UG_RESERVED), /* and 255.255.255.255 */
    V6(128, LR_UG_UNSPECIFIED, 0),
    V6(128, LR_UG_LOOPBACK, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1),
    V6(96, LR_UG_RESERVED, 0),                                  /* IPv4-compatible (deprecated) */
    V6(48, LR_UG_RESERVED, 0x00, 0x64, 0xff, 0x9b, 0x00, 0x01), /* local-use NAT64 */
    V6(64, LR_UG_RESERVED, 0x01, 0x00),                         /* discard */
    V6(128, LR_UG_METADATA, 0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54), /* AWS */
    V6(7, LR_UG_UNIQUE_LOCAL, 0xfc),
    V6(10, LR_UG_LINK_LOCAL, 0xfe, 0x80),
    V6(10, LR_UG_PRIVATE, 0xfe, 0xc0), /* site-local (deprecated) */
    V6(8, LR_UG_RESERVED, 0xff),       /* multicast */
};

/* The first 12 bytes of an IPv4-mapped IPv6 address (::ffff:a.b.c.d). */
static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

static bool net_has(const net_t *n, int family, const uint8_t *a) {
    int full = n->bits / 8, rest = n->bits % 8;
    if (n->family != family) {
        return false;
    }
    if (memcmp(n->a, a, (size_t)full) != 0) {
        return false;
    }
    return rest == 0 || ((n->a[full] ^ a[full]) & (uint8_t)(0xff << (8 - rest))) == 0;
}

/* The address of sa as (family, bytes), an IPv4-mapped IPv6 address as
 * IPv4.  Returns false for anything but a complete IPv4/IPv6 address. */
static bool sa_bytes(const struct sockaddr *sa, size_t len, int *family, uint8_t a[16]) {
    if (sa == NULL) {
        return false;
    }
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)(const void *)sa;
        memcpy(a, &s4->sin_addr, 4);
        *family = 4;
        return true;
    }
    if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)(const void *)sa;
        memcpy(a, &s6->sin6_addr, 16);
        *family = 6;
        if (memcmp(a, mapped, 12) == 0) {
            memmove(a, a + 12, 4);
            *family = 4;
        }
        return true;
    }
    return false;
}

static enum lr_urlguard_reason classify_bytes(int family, const uint8_t *a) {
    static const uint8_t nat64[12] = {0x00, 0x64, 0xff, 0x9b};
    if (family == 6 && memcmp(a, nat64, 12) == 0) {
        return classify_bytes(4, a + 12); /* NAT64: the IPv4 address it reaches */
    }
    if (family == 6 && a[0] == 0x20 && a[1] == 0x02) {
        enum lr_urlguard_reason c = classify_bytes(4, a + 2); /* 6to4 */
        if (c != LR_UG_OK) {
            return c;
        }
    }
    for (size_t i = 0; i < sizeof(ranges) / sizeof(ranges[0]); i++) {
        if (net_has(&ranges[i].net, family, a)) {
            return ranges[i].cls;
        }
    }
    return LR_UG_OK;
}

enum lr_urlguard_reason lr_urlguard_classify(const struct sockaddr *sa, size_t len) {
    uint8_t a[16];
    int family;
    if (!sa_bytes(sa, len, &family, a)) {
        return LR_UG_BAD_ADDRESS;
    }
    return classify_bytes(family, a);
}

void lr_urlguard_addr_str(const struct sockaddr *sa, size_t len, char *buf, size_t buflen) {
    uint8_t a[16];
    int family;
    if (buflen == 0) {
        return;
    }
    buf[0] = '\0';
    if (!sa_bytes(sa, len, &family, a) || buflen < INET6_ADDRSTRLEN) {
        snprintf(buf, buflen, "?");
        return;
    }
    if (sa->sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, buf, (socklen_t)buflen);
    } else {
        inet_ntop(AF_INET, a, buf, (socklen_t)buflen);
    }
}

int lr_urlguard_check_addr(const lr_urlguard_t *g, uint64_t rules, const struct sockaddr *sa, size_t len,
                           enum lr_urlguard_reason *why) {
    uint8_t a[16];
    int family;
    enum lr_urlguard_reason cls = LR_UG_BAD_ADDRESS;

    if (sa_bytes(sa, len, &family, a)) {
        cls = classify_bytes(family, a);
    }
    *why = cls;
    if (cls == LR_UG_OK) {
        return 0;
    }
    if (g == NULL || cls == LR_UG_BAD_ADDRESS) {
        return LR_EPERM;
    }
    if (g->allowed & (1u << cls)) {
        return 0;
    }
    for (int i = 0; i < g->nrules && i < 64; i++) {
        if (!(rules & ((uint64_t)1 << i))) {
            continue;
        }
        for (int k = 0; k < g->rules[i].nnets; k++) {
            if (net_has(&g->rules[i].nets[k], family, a)) {
                return 0;
            }
        }
    }
    for (int k = 0; k < g->nnets; k++) {
        if (net_has(&g->nets[k], family, a)) {
            return 0;
        }
    }
    return LR_EPERM;
}

/* "10.0.0.0/8", "::1", "[fd00::]/8" into n.  Returns false when it is not. */
static bool parse_net(const char *s, size_t len, net_t *n) {
    char buf[64];
    const char *slash;
    char *end = NULL;
    size_t alen;
    long bits;

    if (len == 0 || len >= sizeof(buf)) {
        return false;
    }
    memcpy(buf, s, len);
    buf[len] = '\0';
    slash = strchr(buf, '/');
    alen = slash != NULL ? (size_t)(slash - buf) : len;
    buf[alen] = '\0';
    memset(n, 0, sizeof(*n));
    if (buf[0] == '[' && alen >= 2 && buf[alen - 1] == ']') {
        buf[alen - 1] = '\0';
        if (inet_pton(AF_INET6, buf + 1, n->a) != 1) {
            return false;
        }
        n->family = 6;
    } else if (inet_pton(AF_INET, buf, n->a) == 1) {
        n->family = 4;
    } else if (inet_pton(AF_INET6, buf, n->a) == 1) {
        n->family = 6;
    } else {
        return false;
    }
    n->bits = n->family == 4 ? 32 : 128;
    if (slash != NULL) {
        if (!isdigit((unsigned char)slash[1])) {
            return false;
        }
        bits = strtol(slash + 1, &end, 10);
        if (*end != '\0' || bits < 0 || bits > n->bits) {
            return false;
        }
        n->bits = (int)bits;
    }
    if (n->family == 6) {
        /* An IPv4-mapped range is the IPv4 range (addresses are compared
         * that way). */
        if (n->bits >= 96 && memcmp(n->a, mapped, 12) == 0) {
            memmove(n->a, n->a + 12, 4);
            memset(n->a + 4, 0, 12);
            n->family = 4;
            n->bits -= 96;
        }
    }
    return true;
}

/* ---- URLs --------------------------------------------------------------- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c = tolower(c);
    return c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Removes "." and ".." segments from path (starting with '/') in place
 * (RFC 3986 5.2.4). */
static void remove_dots(char *path) {
    size_t r = 0, w = 0;
    while (path[r] == '/') {
        size_t s = r + 1, e = s;
        while (path[e] != '\0' && path[e] != '/') {
            e++;
        }
        size_t n = e - s;
        bool last = path[e] == '\0';
        if (n == 1 && path[s] == '.') {
            if (last) {
                path[w++] = '/';
            }
        } else if (n == 2 && path[s] == '.' && path[s + 1] == '.') {
            while (w > 0 && path[w - 1] != '/') {
                w--;
            }
            if (w > 0) {
                w--;
            }
            if (last) {
                path[w++] = '/';
            }
        } else {
            path[w++] = '/';
            memmove(path + w, path + s, n);
            w += n;
        }
        r = e;
    }
    if (w == 0) {
        path[w++] = '/';
    }
    path[w] = '\0';
}

/* The normalised form of an encoded path: unreserved characters decoded,
 * other escapes upper-case, dot segments removed.  NULL (*why set) when
 * the path is ambiguous: an escaped '/', '\' or NUL, a raw '\' or a bad
 * escape, each of which servers read differently. */
static char *normalize_path(const char *in, enum lr_urlguard_reason *why) {
    size_t n = strlen(in);
    char *out = malloc(n + 2);
    size_t w = 0;
    if (out == NULL) {
        *why = LR_UG_BAD_URL;
        return NULL;
    }
    if (in[0] != '/') {
        out[w++] = '/';
    }
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)in[i];
        if (c == '\\') {
            goto ambiguous;
        }
        if (c != '%') {
            out[w++] = (char)c;
            continue;
        }
        /* in[n] is the NUL, which is no hex digit: never reads past it. */
        int hi = hexval((unsigned char)in[i + 1]);
        int lo = hi >= 0 ? hexval((unsigned char)in[i + 2]) : -1;
        if (hi < 0 || lo < 0) {
            goto ambiguous;
        }
        c = hi * 16 + lo;
        if (c == '/' || c == '\\' || c == 0) {
            goto ambiguous;
        }
        if (isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
            out[w++] = (char)c;
        } else {
            w += (size_t)snprintf(out + w, 4, "%%%02X", (unsigned)c);
        }
        i += 2;
    }
    out[w] = '\0';
    remove_dots(out);
    return out;
ambiguous:
    free(out);
    *why = LR_UG_AMBIGUOUS_PATH;
    return NULL;
}

/* A host name of labels [a-z0-9_-] separated by single dots (a trailing
 * dot allowed: it is a different name for the rules). */
static bool valid_name(const char *h) {
    size_t label = 0;
    if (h[0] == '\0' || strlen(h) > MAX_HOST) {
        return false;
    }
    for (const char *p = h; *p != '\0'; p++) {
        if (*p == '.') {
            if (label == 0) {
                return false;
            }
            label = 0;
        } else if (isalnum((unsigned char)*p) || *p == '-' || *p == '_') {
            label++;
        } else {
            return false;
        }
    }
    return true;
}

static bool has_part(CURLU *u, CURLUPart part) {
    char *v = NULL;
    bool has = curl_url_get(u, part, &v, 0) == CURLUE_OK;
    curl_free(v);
    return has;
}

/* Parses and normalises url into p (p->path malloc'd on success).  For a
 * rule (rule = true), a query or fragment is refused too.  When normalized
 * != NULL it gets the URL rebuilt from the normalised parts. */
static enum lr_urlguard_reason parse_url(const char *url, bool rule, parsed_t *p, char **normalized) {
    CURLU *u = NULL;
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL, *full = NULL;
    enum lr_urlguard_reason why = LR_UG_BAD_URL;

    memset(p, 0, sizeof(*p));
    if (strnlen(url, LR_URLGUARD_MAX_URL + 1) > LR_URLGUARD_MAX_URL || (u = curl_url()) == NULL ||
        curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK) {
        goto out;
    }
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        goto out;
    }
    for (size_t i = 0; scheme[i] != '\0'; i++) {
        p->scheme[i] = (char)tolower((unsigned char)scheme[i]);
    }
    if (has_part(u, CURLUPART_USER) || has_part(u, CURLUPART_PASSWORD) || has_part(u, CURLUPART_OPTIONS)) {
        why = LR_UG_USERINFO;
        goto out;
    }
    if (has_part(u, CURLUPART_ZONEID)) {
        why = LR_UG_ZONE_ID;
        goto out;
    }
    if (rule && (has_part(u, CURLUPART_QUERY) || has_part(u, CURLUPART_FRAGMENT))) {
        goto out;
    }
    if (curl_url_get(u, CURLUPART_HOST, &host, CURLU_URLDECODE) != CURLUE_OK || strlen(host) > MAX_HOST ||
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK) {
        goto out;
    }
    for (size_t i = 0; host[i] != '\0'; i++) {
        p->host[i] = (char)tolower((unsigned char)host[i]);
    }
    if (p->host[0] == '[') {
        p->ip = parse_net(p->host, strlen(p->host), &p->addr) && p->addr.bits == (p->addr.family == 4 ? 32 : 128);
        if (!p->ip) {
            goto out;
        }
    } else if (inet_pton(AF_INET, p->host, p->addr.a) == 1) {
        p->ip = true;
        p->addr.family = 4;
        p->addr.bits = 32;
    } else if (!valid_name(p->host)) {
        goto out;
    }
    p->port = strtol(port, NULL, 10);
    p->path = normalize_path(path, &why);
    if (p->path == NULL) {
        goto out;
    }
    if (normalized != NULL) {
        if ((!p->ip && curl_url_set(u, CURLUPART_HOST, p->host, 0) != CURLUE_OK) ||
            curl_url_set(u, CURLUPART_PATH, p->path, 0) != CURLUE_OK ||
            curl_url_set(u, CURLUPART_FRAGMENT, NULL, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_URL, &full, 0) != CURLUE_OK || (*normalized = strdup(full)) == NULL) {
            free(p->path);
            p->path = NULL;
            why = LR_UG_BAD_URL;
            goto out;
        }
    }
    why = LR_UG_OK;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_free(full);
    curl_url_cleanup(u);
    return why;
}

static bool host_matches(const rule_t *r, const parsed_t *c) {
    size_t hl, rl;
    if (r->ip || c->ip) {
        return r->ip && c->ip && c->addr.family == r->nets[0].family && net_has(&r->nets[0], c->addr.family, c->addr.a);
    }
    if (!r->sub) {
        return strcmp(c->host, r->host) == 0;
    }
    hl = strlen(c->host);
    rl = strlen(r->host);
    return hl > rl + 1 && c->host[hl - rl - 1] == '.' && strcmp(c->host + hl - rl, r->host) == 0;
}

/* A path under a prefix, on a segment boundary unless the prefix ends with
 * '/': "/cb" holds "/cb" and "/cb/x", not "/cbx". */
static bool path_under(const char *path, const char *prefix) {
    size_t n = strlen(prefix);
    if (strncmp(path, prefix, n) != 0) {
        return false;
    }
    return prefix[n - 1] == '/' || path[n] == '\0' || path[n] == '/';
}

int lr_urlguard_match(const lr_urlguard_t *g, const char *url, uint64_t *rules, char **normalized,
                      enum lr_urlguard_reason *why) {
    parsed_t c;
    char *norm = NULL;
    uint64_t m = 0;

    *rules = 0;
    if (normalized != NULL) {
        *normalized = NULL;
    }
    *why = url != NULL ? parse_url(url, false, &c, normalized != NULL ? &norm : NULL) : LR_UG_BAD_URL;
    if (*why != LR_UG_OK) {
        return LR_EPERM;
    }
    for (int i = 0; g != NULL && i < g->nrules; i++) {
        const rule_t *r = &g->rules[i];
        if (strcmp(r->scheme, c.scheme) == 0 && r->port == c.port && host_matches(r, &c) &&
            path_under(c.path, r->path)) {
            m |= (uint64_t)1 << i;
        }
    }
    free(c.path);
    if (m == 0) {
        free(norm);
        *why = LR_UG_NOT_ALLOWED;
        return LR_EPERM;
    }
    *rules = m;
    if (normalized != NULL) {
        *normalized = norm;
    }
    return 0;
}

void lr_urlguard_loggable(const char *url, char *buf, size_t buflen) {
    CURLU *u = NULL;
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;

    if (buflen == 0) {
        return;
    }
    if (url != NULL && strnlen(url, LR_URLGUARD_MAX_URL + 1) <= LR_URLGUARD_MAX_URL && (u = curl_url()) != NULL &&
        curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PATH, &path, 0) == CURLUE_OK) {
        snprintf(buf, buflen, "%s://%s:%s%s", scheme, host, port, path);
    } else {
        snprintf(buf, buflen, "(unparseable URL of %zu bytes)", url != NULL ? strlen(url) : (size_t)0);
    }
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_url_cleanup(u);
}

/* ---- parsing the rules -------------------------------------------------- */

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* One rule: text[0..len), trimmed, not empty. */
static int parse_rule(rule_t *r, const char *text, size_t len, char *errbuf, size_t errlen) {
    char url[LR_URLGUARD_MAX_URL + 1];
    size_t ulen = 0, i;
    const char *sub;
    parsed_t p;
    enum lr_urlguard_reason why;

    while (ulen < len && !is_space(text[ulen])) {
        ulen++;
    }
    if (ulen > LR_URLGUARD_MAX_URL) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "rule %.40s...: longer than %d bytes", text, LR_URLGUARD_MAX_URL);
    }
    memcpy(url, text, ulen);
    url[ulen] = '\0';
    /* "*." is not a host curl parses: take it off and remember it. */
    sub = strchr(url, ':');
    if (sub != NULL && strncmp(sub, "://*.", 5) == 0) {
        memmove((char *)sub + 3, sub + 5, strlen(sub + 5) + 1);
        r->sub = true;
    }
    why = parse_url(url, true, &p, NULL);
    if (why != LR_UG_OK) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG,
                         "rule \"%.*s\": %s (want scheme://host[:port][/path], http or https, a host "
                         "name, *.name or an IP literal, no userinfo, query or fragment)",
                         (int)(ulen < 200 ? ulen : 200), text, lr_urlguard_reason_name(why));
    }
    if (r->sub && p.ip) {
        free(p.path);
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "rule \"%.*s\": *. needs a host name", (int)ulen, text);
    }
    memcpy(r->scheme, p.scheme, sizeof(r->scheme));
    memcpy(r->host, p.host, sizeof(r->host));
    r->ip = p.ip;
    r->port = p.port;
    r->path = p.path;
    if (p.ip) {
        r->nets[r->nnets++] = p.addr;
    }
    for (i = ulen; i < len;) {
        size_t s;
        while (i < len && is_space(text[i])) {
            i++;
        }
        if (i == len) {
            break;
        }
        s = i;
        while (i < len && !is_space(text[i])) {
            i++;
        }
        if (r->nnets == LR_URLGUARD_MAX_NETS) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "rule \"%.*s\": more than %d addresses", (int)ulen, text,
                             LR_URLGUARD_MAX_NETS);
        }
        if (!parse_net(text + s, i - s, &r->nets[r->nnets])) {
            return lr_seterr(errbuf, errlen, LR_ECONFIG, "rule \"%.*s\": \"%.*s\" is not an IP address or CIDR range",
                             (int)ulen, text, (int)(i - s < 64 ? i - s : 64), text + s);
        }
        r->nnets++;
    }
    return 0;
}

/* Calls each(g, item, len) for every non-empty trimmed item of text split
 * at any character of seps. */
static int split(lr_urlguard_t *g, const char *text, const char *seps,
                 int (*each)(lr_urlguard_t *g, const char *s, size_t n, char *errbuf, size_t errlen), char *errbuf,
                 size_t errlen) {
    const char *p = text;
    while (*p != '\0') {
        size_t n = strcspn(p, seps);
        size_t s = 0, e = n;
        while (s < e && is_space(p[s])) {
            s++;
        }
        while (e > s && is_space(p[e - 1])) {
            e--;
        }
        if (e > s) {
            int rc = each(g, p + s, e - s, errbuf, errlen);
            if (rc != 0) {
                return rc;
            }
        }
        p += n;
        if (*p != '\0') {
            p++;
        }
    }
    return 0;
}

static int add_rule(lr_urlguard_t *g, const char *s, size_t n, char *errbuf, size_t errlen) {
    if (g->nrules == LR_URLGUARD_MAX_RULES) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "more than %d rules", LR_URLGUARD_MAX_RULES);
    }
    return parse_rule(&g->rules[g->nrules++], s, n, errbuf, errlen);
}

static int add_net(lr_urlguard_t *g, const char *s, size_t n, char *errbuf, size_t errlen) {
    if (g->nnets == MAX_EGRESS_NETS) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "more than %d addresses", MAX_EGRESS_NETS);
    }
    if (!parse_net(s, n, &g->nets[g->nnets])) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "\"%.*s\" is not an IP address or CIDR range",
                         (int)(n < 64 ? n : 64), s);
    }
    g->nnets++;
    return 0;
}

static int parse_with(lr_urlguard_t **out, const char *text, const char *seps, unsigned allowed,
                      int (*each)(lr_urlguard_t *, const char *, size_t, char *, size_t), char *errbuf, size_t errlen) {
    lr_urlguard_t *g;
    int rc = 0;

    *out = NULL;
    if (errbuf != NULL && errlen > 0) {
        errbuf[0] = '\0';
    }
    if (text != NULL && strnlen(text, MAX_RULES_TEXT + 1) > MAX_RULES_TEXT) {
        return lr_seterr(errbuf, errlen, LR_ECONFIG, "longer than %d bytes", MAX_RULES_TEXT);
    }
    g = calloc(1, sizeof(*g));
    if (g == NULL) {
        return LR_ENOMEM;
    }
    g->allowed = allowed & ~(1u << LR_UG_BAD_ADDRESS);
    if (text != NULL) {
        rc = split(g, text, seps, each, errbuf, errlen);
    }
    if (rc != 0) {
        lr_urlguard_free(g);
        return rc;
    }
    *out = g;
    return 0;
}

int lr_urlguard_parse(lr_urlguard_t **out, const char *text, char *errbuf, size_t errlen) {
    return parse_with(out, text, ",", 0, add_rule, errbuf, errlen);
}

int lr_urlguard_nets(lr_urlguard_t **out, const char *text, unsigned allowed, char *errbuf, size_t errlen) {
    return parse_with(out, text, ", \t\r\n", allowed, add_net, errbuf, errlen);
}

void lr_urlguard_free(lr_urlguard_t *g) {
    if (g == NULL) {
        return;
    }
    for (int i = 0; i < g->nrules; i++) {
        free(g->rules[i].path);
    }
    free(g);
}
