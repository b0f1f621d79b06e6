/* err.c - text for the error table in err.h. */
#include "err.h"

#include <stdarg.h>
#include <stdio.h>

const char *lr_strerror(int err) {
    switch (err) {
    case LR_OK: return "success";
#define LR_ERR_TEXT(name, value, text) \
    case LR_E##name: return text;
        LR_ERRNO_MAP(LR_ERR_TEXT)
#undef LR_ERR_TEXT
    default: return "unknown error";
    }
}

const char *lr_err_name(int err) {
    switch (err) {
    case LR_OK: return "LR_OK";
#define LR_ERR_NAME(name, value, text) \
    case LR_E##name: return "LR_E" #name;
        LR_ERRNO_MAP(LR_ERR_NAME)
#undef LR_ERR_NAME
    default: return "LR_EUNKNOWN";
    }
}

int lr_seterr(char *errbuf, size_t errlen, int err, const char *fmt, ...) {
    if (errbuf != NULL && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(errbuf, errlen, fmt, ap);
        va_end(ap);
    }
    return err;
}
