/*
 * urlguard.h - which URLs a worker may call, and which addresses it may
 * connect to (server-side request forgery defence; urlguard.c).
 *
 * Two checks, both needed:
 *
 *   1. lr_urlguard_match(): the URL against allow rules, on the URL as
 *      libcurl's URL API parses and normalises it (scheme and host
 *      lower-cased, IPv4 numbers in any base made dotted decimal, dot
 *      segments removed, percent-encoded unreserved characters decoded).
 *      Scheme, host (exact, or any subdomain on a label boundary for a
 *      `*.` rule), port (explicit or the scheme's default) and path
 *      prefix (on a segment boundary) must all match one rule.  Userinfo,
 *      IPv6 zone ids and encoded path separators are refused.
 *   2. lr_urlguard_check_addr(): the address actually connected to (curl's
 *      CURLOPT_OPENSOCKETFUNCTION, after DNS): loopback, private, link-local,
 *      cloud metadata, unique-local, unspecified and reserved addresses
 *      (also as IPv4-mapped, NAT64 or 6to4 IPv6) are refused unless a
 *      matching rule names that address or a range holding it.  This is
 *      what defeats names that resolve to internal addresses and DNS
 *      rebinding.
 *
 * Rule syntax (LONGRUN_CALLBACK_ALLOW; docs/configuration.md): rules
 * separated by commas; a rule is a URL `scheme://host[:port][/path]`,
 * optionally followed (after white space) by addresses or CIDR ranges the
 * rule lets the connection reach although they are internal:
 *
 *   https://hooks.example.com/longrun, http://127.0.0.1:8080/cb
 *
 * A host "*.svc.example.com" matches any subdomain of svc.example.com (not
 * the name itself); "... 10.0.0.0/8" after the URL lets it reach 10/8.
 *
 * A rule whose host is an IP literal names that address.  An egress list
 * (LONGRUN_EGRESS_ALLOW) is just addresses and ranges: lr_urlguard_nets().
 *
 * Ownership: the guard is owned by its creator (lr_urlguard_free); it is
 * immutable after parsing, so any thread may read it.  Bounds: at most
 * LR_URLGUARD_MAX_RULES rules of LR_URLGUARD_MAX_NETS ranges each, URLs of
 * at most LR_URLGUARD_MAX_URL bytes.
 */
#ifndef LR_URLGUARD_H
#define LR_URLGUARD_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "err.h"

#define LR_URLGUARD_MAX_RULES 64
#define LR_URLGUARD_MAX_NETS 16
#define LR_URLGUARD_MAX_URL 8192

/* Why a URL or an address was refused; names are metric labels. */
#define LR_URLGUARD_REASONS(X)                                                                  \
    X(OK, "ok")                         /* allowed */                                           \
    X(BAD_URL, "bad_url")               /* not an http(s) URL libcurl parses, or too long */    \
    X(USERINFO, "userinfo")             /* user[:password]@ in the authority */                 \
    X(ZONE_ID, "zone_id")               /* an IPv6 zone id (%25eth0) */                         \
    X(AMBIGUOUS_PATH, "ambiguous_path") /* %2F, %5C, %00 or a backslash in the path */          \
    X(NOT_ALLOWED, "not_allowed")       /* no rule matches */                                   \
    X(LOOPBACK, "loopback")             /* 127.0.0.0/8, ::1 */                                  \
    X(PRIVATE, "private")               /* 10/8, 172.16/12, 192.168/16, 100.64/10, fec0::/10 */ \
    X(LINK_LOCAL, "link_local")         /* 169.254/16, fe80::/10 */                             \
    X(METADATA, "metadata")             /* cloud metadata endpoints */                          \
    X(UNIQUE_LOCAL, "unique_local")     /* fc00::/7 */                                          \
    X(UNSPECIFIED, "unspecified")       /* 0.0.0.0/8, :: */                                     \
    X(RESERVED, "reserved")             /* multicast, 240/4, IPv4-compatible IPv6, ... */       \
    X(BAD_ADDRESS, "bad_address")       /* not an IPv4 or IPv6 socket address */

enum lr_urlguard_reason {
#define LR_UG_ENUM(name, text) LR_UG_##name,
    LR_URLGUARD_REASONS(LR_UG_ENUM)
#undef LR_UG_ENUM
        LR_UG_COUNT
};

/* The static label of a reason ("loopback"); never NULL. */
const char *lr_urlguard_reason_name(enum lr_urlguard_reason r);

typedef struct lr_urlguard lr_urlguard_t;

/* Parses allow rules (syntax above).  text NULL or empty: a guard that
 * allows no URL.  Returns 0 and *out, LR_ECONFIG with the bad rule and why
 * in errbuf, or LR_ENOMEM; *out is NULL on failure. */
int lr_urlguard_parse(lr_urlguard_t **out, const char *text, char *errbuf, size_t errlen) LR_MUSTCHECK;

/* Parses an egress list: addresses and CIDR ranges separated by commas or
 * white space, which connections may reach although internal.  allowed is
 * a bit mask (1u << LR_UG_LOOPBACK | ...) of classes allowed without being
 * listed.  Returns as lr_urlguard_parse. */
int lr_urlguard_nets(lr_urlguard_t **out, const char *text, unsigned allowed, char *errbuf, size_t errlen) LR_MUSTCHECK;

void lr_urlguard_free(lr_urlguard_t *g);

/* Checks url against g's rules.  Returns 0 when some rule matches: *rules
 * gets a bit per matching rule (for lr_urlguard_check_addr) and, when
 * normalized != NULL, *normalized the URL to send (malloc'd, the caller
 * frees it): the normalised form that was checked, so that the server
 * sees what the rules saw.  Returns LR_EPERM with *why set when refused,
 * LR_ENOMEM.  *why is always set (LR_UG_OK on success). */
int lr_urlguard_match(const lr_urlguard_t *g, const char *url, uint64_t *rules, char **normalized,
                      enum lr_urlguard_reason *why) LR_MUSTCHECK;

/* The class of an address: LR_UG_OK for a public one, else the range it
 * is in (IPv4-mapped, NAT64 and 6to4 IPv6 judged by their IPv4 address).
 * len is the size of *sa (sockaddr_in or sockaddr_in6). */
enum lr_urlguard_reason lr_urlguard_classify(const struct sockaddr *sa, size_t len);

/* Whether a connection may reach sa: public addresses always; others when
 * their class is in g's allowed mask, or some range of g (of a rule in
 * rules, or of the egress list) holds the address.  Returns 0, or LR_EPERM
 * with *why the class.  Thread-safe (g is read only). */
int lr_urlguard_check_addr(const lr_urlguard_t *g, uint64_t rules, const struct sockaddr *sa, size_t len,
                           enum lr_urlguard_reason *why) LR_MUSTCHECK;

/* What of url may be logged: "scheme://host:port/path" as curl parses it,
 * without userinfo, query or fragment (which may hold secrets), at most
 * buflen - 1 bytes; "(unparseable URL of N bytes)" when curl cannot parse
 * it.  Log lines still pass through lr_config_mask_secrets. */
void lr_urlguard_loggable(const char *url, char *buf, size_t buflen);

/* Formats sa's address (no port) into buf: "127.0.0.1", "::1". */
void lr_urlguard_addr_str(const struct sockaddr *sa, size_t len, char *buf, size_t buflen);

#endif
