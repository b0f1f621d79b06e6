/*
 * fuzz_task.c - libFuzzer target for the task message validator,
 * lr_task_parse() (common/task.c): the body of every message the worker and
 * the scheduler consume, and every line `longrun enqueue` reads.
 *
 * The input is the raw message body (not NUL-terminated, as the broker hands
 * it over).  Besides the sanitizers, it checks the contract of task.h: the
 * return code is one of the documented ones, errbuf always holds a message on
 * failure, and an accepted body has the fields the worker relies on.
 */
#include <ctype.h>

#include "fuzz_util.h"
#include "task.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lr_task_msg_t m;
    char err[256];
    int rc;

    memset(err, 'X', sizeof(err));
    rc = lr_task_parse((const char *)data, size, &m, err, sizeof(err));
    FUZZ_CHECK(rc == 0 || rc == LR_EPARSE || rc == LR_ETOOBIG || rc == LR_EINVAL || rc == LR_ENOMEM,
               "lr_task_parse returns a documented code");
    if (rc != 0) {
        if (rc != LR_ENOMEM) {
            FUZZ_CHECK(fuzz_terminated(err, sizeof(err)) && err[0] != '\0',
                       "a rejected body gets a message naming why");
        }
        FUZZ_CHECK(m.root == NULL, "a rejected body leaves nothing to free");
        return 0;
    }
    FUZZ_CHECK(m.root != NULL, "an accepted body owns its tree");
    if (m.has_id) {
        FUZZ_CHECK(lr_uuid_valid(m.id), "id is a uuid");
        for (int i = 0; i < LR_UUID_LEN; i++) {
            FUZZ_CHECK(!isupper((unsigned char)m.id[i]), "id is lowercased");
        }
    }
    if (m.continuation) {
        FUZZ_CHECK(m.has_id && m.agent == NULL && m.input == NULL, "a continuation is an id only");
    } else {
        char *b;
        FUZZ_CHECK(m.agent != NULL && lr_name_valid(m.agent), "agent is a valid name");
        FUZZ_CHECK(m.input != NULL, "input is present");
        FUZZ_CHECK(m.max_attempts == -1 || (m.max_attempts >= 1 && m.max_attempts <= 100), "max_attempts in range");
        FUZZ_CHECK(m.budgets.max_steps == -1 || (m.budgets.max_steps >= 1 && m.budgets.max_steps <= 10000),
                   "max_steps in range");
        FUZZ_CHECK(m.deadline == NULL || lr_rfc3339_valid(m.deadline), "deadline is RFC 3339");
        FUZZ_CHECK(m.tenant == NULL || (strlen(m.tenant) >= 1 && strlen(m.tenant) <= LR_TASK_MAX_TENANT),
                   "tenant length");
        FUZZ_CHECK(m.callback_url == NULL || strlen(m.callback_url) <= LR_TASK_MAX_URL, "callback_url length");
        /* What the worker stores in tasks.budgets: must be JSON again. */
        b = lr_budgets_to_json(&m.budgets);
        if (b != NULL) {
            cJSON *j = cJSON_Parse(b);
            FUZZ_CHECK(cJSON_IsObject(j), "budgets serialize to a JSON object");
            cJSON_Delete(j);
            free(b);
        }
    }
    lr_task_msg_free(&m);
    FUZZ_CHECK(m.root == NULL, "lr_task_msg_free clears the message");
    return 0;
}
