/*
 * test_urlguard.c - the callback URL allow rules and the connect-time
 * address classifier (common/urlguard.c), against a corpus of bypass forms
 * (issue 15 item 1): each is refused for the reason named, and the
 * legitimate URLs are accepted in their normalised form.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>

#include "testutil.h"
#include "urlguard.h"

#define RULES                                                                     \
    "https://hooks.example.com/longrun, https://*.svc.example.com/cb 10.0.0.0/8," \
    "http://127.0.0.1:8080/cb, https://[2001:db8::1]/v6"

typedef struct {
    const char *url;
    enum lr_urlguard_reason why;
} refused_t;

/* Every one of these must be refused by RULES, for the reason given. */
static const refused_t bypass[] = {
    /* suffix and look-alike hosts */
    {"https://hooks.example.com.evil.net/longrun", LR_UG_NOT_ALLOWED},
    {"https://evilhooks.example.com/longrun", LR_UG_NOT_ALLOWED},
    {"https://svc.example.com/cb", LR_UG_NOT_ALLOWED}, /* *. is subdomains only */
    {"https://xsvc.example.com/cb", LR_UG_NOT_ALLOWED},
    {"https://a.svc.example.com.evil.net/cb", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com./longrun", LR_UG_NOT_ALLOWED}, /* trailing dot */
    {"https://a.svc.example.com./cb", LR_UG_NOT_ALLOWED},
    /* userinfo */
    {"https://hooks.example.com@evil.net/longrun", LR_UG_USERINFO},
    {"https://user:pass@hooks.example.com/longrun", LR_UG_USERINFO},
    {"https://hooks.example.com:443@evil.net/longrun", LR_UG_USERINFO},
    {"https://hooks.example.com%40evil.net/longrun", LR_UG_BAD_URL}, /* decodes to a name with '@' */
    /* dot segments, encodings, path boundaries */
    {"https://hooks.example.com/longrun/../admin", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com/longrun/%2e%2e/admin", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com/longrun/%2E%2e/admin", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com/longrun/.%2e/admin", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com/longrun/./../x", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com/longrun%2f..%2fadmin", LR_UG_AMBIGUOUS_PATH},
    {"https://hooks.example.com/longrun%5c..%5cadmin", LR_UG_AMBIGUOUS_PATH},
    {"https://hooks.example.com/longrun/%00", LR_UG_AMBIGUOUS_PATH},
    {"https://hooks.example.com/longrun/%zz", LR_UG_AMBIGUOUS_PATH},
    {"https://hooks.example.com/longrunx", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com/LONGRUN", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com//longrun", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com#@evil.net/longrun", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com?@evil.net/longrun", LR_UG_NOT_ALLOWED},
    /* percent-encoded hosts */
    {"https://%68ooks.example.com.evil.net/longrun", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com%2eevil.net/longrun", LR_UG_NOT_ALLOWED},
    /* schemes and ports */
    {"http://hooks.example.com/longrun", LR_UG_NOT_ALLOWED},
    {"HtTp://hooks.example.com/longrun", LR_UG_NOT_ALLOWED},
    {"ftp://hooks.example.com/longrun", LR_UG_BAD_URL},
    {"//hooks.example.com/longrun", LR_UG_BAD_URL},
    {"https://hooks.example.com:8443/longrun", LR_UG_NOT_ALLOWED},
    {"https://hooks.example.com:80/longrun", LR_UG_NOT_ALLOWED},
    {"http://127.0.0.1/cb", LR_UG_NOT_ALLOWED}, /* the rule says :8080 */
    {"http://127.0.0.1:8081/cb", LR_UG_NOT_ALLOWED},
    /* numeric IPv4 in other bases, IPv6 literals and zone ids */
    {"http://2130706433/cb", LR_UG_NOT_ALLOWED},
    {"http://0177.0.0.1/cb", LR_UG_NOT_ALLOWED},
    {"http://0x7f.1/cb", LR_UG_NOT_ALLOWED},
    {"http://127.1/cb", LR_UG_NOT_ALLOWED},
    {"http://127.0.0.2:8080/cb", LR_UG_NOT_ALLOWED},
    {"http://[::1]:8080/cb", LR_UG_NOT_ALLOWED},
    {"http://[::ffff:127.0.0.2]:8080/cb", LR_UG_NOT_ALLOWED},
    {"http://[::ffff:169.254.169.254]/", LR_UG_NOT_ALLOWED},
    {"http://169.254.169.254/latest/meta-data/", LR_UG_NOT_ALLOWED},
    {"https://[2001:db8::2]/v6", LR_UG_NOT_ALLOWED},
    {"https://[2001:db8::1%25eth0]/v6", LR_UG_ZONE_ID},
    {"http://[fe80::1%25eth0]/", LR_UG_ZONE_ID},
    /* not URLs */
    {"", LR_UG_BAD_URL},
    {"https://hooks.example.com /longrun", LR_UG_BAD_URL},
    {"https://h\xc3\xa9llo.example.com/longrun", LR_UG_BAD_URL},
};

typedef struct {
    const char *url;
    const char *normalized;
} accepted_t;

static const accepted_t legit[] = {
    {"https://hooks.example.com/longrun", "https://hooks.example.com/longrun"},
    {"https://hooks.example.com/longrun/", "https://hooks.example.com/longrun/"},
    {"https://hooks.example.com/longrun/a/b?x=1", "https://hooks.example.com/longrun/a/b?x=1"},
    {"https://HOOKS.Example.COM/longrun", "https://hooks.example.com/longrun"},
    {"HTTPS://hooks.example.com/longrun", "https://hooks.example.com/longrun"},
    {"https://hooks.example.com:443/longrun", "https://hooks.example.com:443/longrun"},
    {"https://hooks.example.com/x/../longrun", "https://hooks.example.com/longrun"},
    {"https://hooks.example.com/%6Congrun/%7e%41", "https://hooks.example.com/longrun/~A"},
    {"https://hooks.example.com/longrun/a%20b", "https://hooks.example.com/longrun/a%20b"},
    {"https://hooks.example.com/longrun#frag", "https://hooks.example.com/longrun"},
    {"https://a.svc.example.com/cb", "https://a.svc.example.com/cb"},
    {"https://a.b.svc.example.com/cb/x", "https://a.b.svc.example.com/cb/x"},
    {"http://127.0.0.1:8080/cb", "http://127.0.0.1:8080/cb"},
    /* the same address, written otherwise: curl connects to 127.0.0.1 */
    {"http://0x7f.0.0.1:8080/cb", "http://127.0.0.1:8080/cb"},
    {"https://[2001:db8::1]/v6", "https://[2001:db8::1]/v6"},
    {"https://[2001:db8:0:0::1]/v6/x", NULL},
};

static struct sockaddr_storage sa_of(const char *addr, size_t *len) {
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof(ss));
    if (strchr(addr, ':') != NULL) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
        s6->sin6_family = AF_INET6;
        if (inet_pton(AF_INET6, addr, &s6->sin6_addr) != 1) {
            T_FAIL("bad test address %s", addr);
        }
        *len = sizeof(*s6);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
        s4->sin_family = AF_INET;
        if (inet_pton(AF_INET, addr, &s4->sin_addr) != 1) {
            T_FAIL("bad test address %s", addr);
        }
        *len = sizeof(*s4);
    }
    return ss;
}

typedef struct {
    const char *addr;
    enum lr_urlguard_reason cls;
} classified_t;

static const classified_t addrs[] = {
    {"127.0.0.1", LR_UG_LOOPBACK},
    {"127.255.255.254", LR_UG_LOOPBACK},
    {"0.0.0.0", LR_UG_UNSPECIFIED},
    {"0.1.2.3", LR_UG_UNSPECIFIED},
    {"10.1.2.3", LR_UG_PRIVATE},
    {"172.16.0.1", LR_UG_PRIVATE},
    {"172.31.255.255", LR_UG_PRIVATE},
    {"192.168.1.1", LR_UG_PRIVATE},
    {"100.64.0.1", LR_UG_PRIVATE},
    {"100.127.255.255", LR_UG_PRIVATE},
    {"169.254.169.254", LR_UG_METADATA},
    {"169.254.170.2", LR_UG_METADATA},
    {"100.100.100.200", LR_UG_METADATA},
    {"192.0.0.192", LR_UG_METADATA},
    {"168.63.129.16", LR_UG_METADATA},
    {"169.254.1.1", LR_UG_LINK_LOCAL},
    {"224.0.0.1", LR_UG_RESERVED},
    {"255.255.255.255", LR_UG_RESERVED},
    {"::", LR_UG_UNSPECIFIED},
    {"::1", LR_UG_LOOPBACK},
    {"::ffff:127.0.0.1", LR_UG_LOOPBACK},
    {"::ffff:169.254.169.254", LR_UG_METADATA},
    {"::ffff:10.0.0.1", LR_UG_PRIVATE},
    {"::ffff:0.0.0.0", LR_UG_UNSPECIFIED},
    {"::127.0.0.1", LR_UG_RESERVED},
    {"64:ff9b::7f00:1", LR_UG_LOOPBACK},
    {"64:ff9b::a9fe:a9fe", LR_UG_METADATA},
    {"2002:7f00:1::1", LR_UG_LOOPBACK},
    {"2002:a9fe:a9fe::", LR_UG_METADATA},
    {"fe80::1", LR_UG_LINK_LOCAL},
    {"febf:ffff::1", LR_UG_LINK_LOCAL},
    {"fc00::1", LR_UG_UNIQUE_LOCAL},
    {"fd12:3456::1", LR_UG_UNIQUE_LOCAL},
    {"fd00:ec2::254", LR_UG_METADATA},
    {"fec0::1", LR_UG_PRIVATE},
    {"ff02::1", LR_UG_RESERVED},
    /* public */
    {"8.8.8.8", LR_UG_OK},
    {"172.32.0.1", LR_UG_OK},
    {"100.128.0.1", LR_UG_OK},
    {"169.253.255.255", LR_UG_OK},
    {"93.184.216.34", LR_UG_OK},
    {"2606:4700::1111", LR_UG_OK},
    {"::ffff:8.8.8.8", LR_UG_OK},
    {"64:ff9b::808:808", LR_UG_OK},
    {"2002:808:808::1", LR_UG_OK},
};

static void test_matcher(void) {
    lr_urlguard_t *g = NULL;
    char err[256];
    uint64_t rules;
    char *norm;
    enum lr_urlguard_reason why;
    size_t n = sizeof(bypass) / sizeof(bypass[0]);

    T_EQ_INT(lr_urlguard_parse(&g, RULES, err, sizeof(err)), 0);
    T_ASSERT(n >= 30);
    for (size_t i = 0; i < n; i++) {
        norm = (char *)"unset";
        int rc = lr_urlguard_match(g, bypass[i].url, &rules, &norm, &why);
        if (rc != LR_EPERM || why != bypass[i].why || norm != NULL || rules != 0) {
            T_FAIL("bypass %zu \"%s\": rc %d, reason %s (want %s), normalized %s", i, bypass[i].url, rc,
                   lr_urlguard_reason_name(why), lr_urlguard_reason_name(bypass[i].why), norm ? norm : "(null)");
        }
    }
    for (size_t i = 0; i < sizeof(legit) / sizeof(legit[0]); i++) {
        int rc = lr_urlguard_match(g, legit[i].url, &rules, &norm, &why);
        if (rc != 0 || why != LR_UG_OK || rules == 0 || norm == NULL) {
            T_FAIL("legit \"%s\": rc %d, reason %s", legit[i].url, rc, lr_urlguard_reason_name(why));
        }
        if (legit[i].normalized != NULL) {
            T_EQ_STR(norm, legit[i].normalized);
        }
        free(norm);
    }
    /* which rules matched: the *.svc rule is the second */
    T_EQ_INT(lr_urlguard_match(g, "https://x.svc.example.com/cb", &rules, NULL, &why), 0);
    T_EQ_INT(rules, 2);
    lr_urlguard_free(g);

    /* no rules: nothing is allowed */
    T_EQ_INT(lr_urlguard_parse(&g, "", err, sizeof(err)), 0);
    T_EQ_INT(lr_urlguard_match(g, "https://hooks.example.com/", &rules, NULL, &why), LR_EPERM);
    T_EQ_INT(why, LR_UG_NOT_ALLOWED);
    lr_urlguard_free(g);
    T_EQ_INT(lr_urlguard_match(NULL, "https://hooks.example.com/", &rules, NULL, &why), LR_EPERM);
    T_EQ_INT(lr_urlguard_match(NULL, NULL, &rules, NULL, &why), LR_EPERM);
    T_EQ_INT(why, LR_UG_BAD_URL);
    printf("matcher: %zu bypass forms refused, %zu legitimate URLs accepted\n", n, sizeof(legit) / sizeof(legit[0]));
}

static void test_bad_rules(void) {
    static const char *const bad[] = {
        "ftp://x/",
        "https://u@x/",
        "https://u:p@x/",
        "https://x/?q=1",
        "https://x/#f",
        "https://*.1.2.3.4/",
        "https://x/ 10.0.0.0/33",
        "https://x/ notanip",
        "https://x/ 10.0.0.0/",
        "not a url",
        "https://[fe80::1%25eth0]/",
        "https://x/a%2fb",
        "https://*./",
        "https://*.x.com*./",
    };
    lr_urlguard_t *g = (lr_urlguard_t *)&g;
    char err[256];
    char many[64 * 32];
    size_t off = 0;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        int rc = lr_urlguard_parse(&g, bad[i], err, sizeof(err));
        if (rc != LR_ECONFIG || g != NULL || err[0] == '\0') {
            T_FAIL("bad rule \"%s\" accepted (rc %d)", bad[i], rc);
        }
    }
    for (int i = 0; i < LR_URLGUARD_MAX_RULES + 1; i++) {
        off += (size_t)snprintf(many + off, sizeof(many) - off, "https://h%d.example.com/,", i);
    }
    T_EQ_INT(lr_urlguard_parse(&g, many, err, sizeof(err)), LR_ECONFIG);
    T_ASSERT(strstr(err, "more than") != NULL);
    T_EQ_INT(lr_urlguard_nets(&g, "10.0.0.0/8, bogus", 0, err, sizeof(err)), LR_ECONFIG);
    T_ASSERT(strstr(err, "bogus") != NULL);
    T_ASSERT(g == NULL);
}

static void test_classifier(void) {
    size_t n = sizeof(addrs) / sizeof(addrs[0]);
    for (size_t i = 0; i < n; i++) {
        size_t len;
        struct sockaddr_storage ss = sa_of(addrs[i].addr, &len);
        enum lr_urlguard_reason c = lr_urlguard_classify((struct sockaddr *)&ss, len);
        if (c != addrs[i].cls) {
            T_FAIL("%s: %s, want %s", addrs[i].addr, lr_urlguard_reason_name(c), lr_urlguard_reason_name(addrs[i].cls));
        }
    }
    /* a short or foreign socket address */
    size_t len;
    struct sockaddr_storage ss = sa_of("8.8.8.8", &len);
    T_EQ_INT(lr_urlguard_classify((struct sockaddr *)&ss, len - 1), LR_UG_BAD_ADDRESS);
    ss.ss_family = AF_UNIX;
    T_EQ_INT(lr_urlguard_classify((struct sockaddr *)&ss, sizeof(ss)), LR_UG_BAD_ADDRESS);
    printf("classifier: %zu addresses\n", n);
}

static int check(const lr_urlguard_t *g, uint64_t rules, const char *addr, enum lr_urlguard_reason *why) {
    size_t len;
    struct sockaddr_storage ss = sa_of(addr, &len);
    return lr_urlguard_check_addr(g, rules, (struct sockaddr *)&ss, len, why);
}

static void test_check_addr(void) {
    lr_urlguard_t *g = NULL;
    char err[256], buf[64];
    uint64_t rules, loop_rule;
    enum lr_urlguard_reason why;

    T_EQ_INT(lr_urlguard_parse(&g, RULES, err, sizeof(err)), 0);
    /* a name that matched but resolves to an internal address (or was
     * rebound to one) is refused at connect time */
    T_EQ_INT(lr_urlguard_match(g, "https://hooks.example.com/longrun", &rules, NULL, &why), 0);
    T_EQ_INT(check(g, rules, "93.184.216.34", &why), 0);
    T_EQ_INT(check(g, rules, "127.0.0.1", &why), LR_EPERM);
    T_EQ_INT(why, LR_UG_LOOPBACK);
    T_EQ_INT(check(g, rules, "169.254.169.254", &why), LR_EPERM);
    T_EQ_INT(why, LR_UG_METADATA);
    T_EQ_INT(check(g, rules, "::ffff:169.254.169.254", &why), LR_EPERM);
    T_EQ_INT(check(g, rules, "10.0.0.5", &why), LR_EPERM);
    T_EQ_INT(why, LR_UG_PRIVATE);
    /* the IP literal rule names its address, in either form, and no other */
    T_EQ_INT(lr_urlguard_match(g, "http://127.0.0.1:8080/cb", &loop_rule, NULL, &why), 0);
    T_EQ_INT(check(g, loop_rule, "127.0.0.1", &why), 0);
    T_EQ_INT(check(g, loop_rule, "::ffff:127.0.0.1", &why), 0);
    T_EQ_INT(check(g, loop_rule, "127.0.0.2", &why), LR_EPERM);
    T_EQ_INT(check(g, loop_rule, "::1", &why), LR_EPERM);
    /* the *.svc rule lists 10/8: only for URLs that rule matched */
    T_EQ_INT(lr_urlguard_match(g, "https://a.svc.example.com/cb", &rules, NULL, &why), 0);
    T_EQ_INT(check(g, rules, "10.9.9.9", &why), 0);
    T_EQ_INT(check(g, rules, "::ffff:10.9.9.9", &why), 0);
    T_EQ_INT(check(g, rules, "11.0.0.1", &why), 0);
    T_EQ_INT(check(g, rules, "172.16.0.1", &why), LR_EPERM);
    T_EQ_INT(check(g, loop_rule, "10.9.9.9", &why), LR_EPERM);
    T_EQ_INT(check(NULL, 0, "127.0.0.1", &why), LR_EPERM);
    lr_urlguard_free(g);

    /* egress: classes allowed without a list, and a list */
    T_EQ_INT(lr_urlguard_nets(&g, "", (1u << LR_UG_LOOPBACK) | (1u << LR_UG_PRIVATE), err, sizeof(err)), 0);
    T_EQ_INT(check(g, 0, "127.0.0.1", &why), 0);
    T_EQ_INT(check(g, 0, "10.1.1.1", &why), 0);
    T_EQ_INT(check(g, 0, "169.254.169.254", &why), LR_EPERM);
    T_EQ_INT(why, LR_UG_METADATA);
    T_EQ_INT(check(g, 0, "fe80::1", &why), LR_EPERM);
    lr_urlguard_free(g);
    T_EQ_INT(lr_urlguard_nets(&g, "127.0.0.1 10.0.0.0/8,[fd00::]/8 ::ffff:192.168.0.0/112", 0, err, sizeof(err)), 0);
    T_EQ_INT(check(g, 0, "127.0.0.1", &why), 0);
    T_EQ_INT(check(g, 0, "127.0.0.2", &why), LR_EPERM);
    T_EQ_INT(check(g, 0, "10.255.0.1", &why), 0);
    T_EQ_INT(check(g, 0, "fd00::1", &why), 0);
    T_EQ_INT(check(g, 0, "fc00::1", &why), LR_EPERM);
    T_EQ_INT(check(g, 0, "192.168.3.4", &why), 0);
    T_EQ_INT(check(g, 0, "192.169.3.4", &why), 0); /* public */
    T_EQ_INT(check(g, 0, "169.254.169.254", &why), LR_EPERM);
    lr_urlguard_free(g);
    lr_urlguard_free(NULL);

    size_t len;
    struct sockaddr_storage ss = sa_of("::ffff:127.0.0.1", &len);
    lr_urlguard_addr_str((struct sockaddr *)&ss, len, buf, sizeof(buf));
    T_EQ_STR(buf, "::ffff:127.0.0.1");
}

int main(void) {
    test_matcher();
    test_bad_rules();
    test_classifier();
    test_check_addr();
    printf("ok\n");
    return 0;
}
