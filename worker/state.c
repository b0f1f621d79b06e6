/* state.c - step log shapes by state version; see state.h. */
#include "state.h"

#include <string.h>

#include "err.h"

static int current = LR_STATE_VERSION;

int lr_state_version(void) { return current; }

int lr_state_set_version(int v) {
    if (v < 1 || v > LR_STATE_VERSION_MAX) {
        return LR_EINVAL;
    }
    current = v;
    return 0;
}

/* Renames key `from` to `to` in every tool message. */
static void rename_tool_field(cJSON *messages, const char *from, const char *to) {
    cJSON *m;
    cJSON_ArrayForEach(m, messages) {
        const char *role = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role"));
        cJSON *v;
        if (role == NULL || strcmp(role, "tool") != 0) {
            continue;
        }
        v = cJSON_DetachItemFromObjectCaseSensitive(m, from);
        if (v != NULL) {
            cJSON_DeleteItemFromObjectCaseSensitive(m, to);
            cJSON_AddItemToObject(m, to, v);
        }
    }
}

int lr_state_decode(int v, cJSON *messages) {
    if (v < 1 || v > current) {
        return LR_EINVAL;
    }
    if (v == 2) {
        rename_tool_field(messages, "output", "content");
    }
    return 0;
}

void lr_state_encode(cJSON *messages) {
    if (current == 2) {
        rename_tool_field(messages, "content", "output");
    }
}
