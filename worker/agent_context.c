/*
 * agent_context.c - the conversation an agent step sends to its model: built
 * from the step log (or kept from the previous step of the delivery), cut by
 * the agent's context strategy, and the summary step of the "summarize"
 * strategy.
 *
 * Design.  Pure functions of st->conv and the agent's settings, called by
 * exec_agent.c on the loop thread while a step is PREPARING (and when a
 * summary arrives); nothing here waits, logs prompts or touches the state.
 *
 * Strategies: "full" sends everything; "window" keeps the first user
 * message and the last N messages, never separating a tool result from the
 * call that asked for it; "summarize" sends the latest summary folded into
 * the first message plus everything after the part it covers, and asks for a
 * new summary (a step of its own) once that grows over summarize_tokens.
 * With both, the messages a pin rule matches are sent too, with the call or
 * the results they are paired with (a "group").
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "agent_state.h"

/* The first user message of a task, from its input. */
static cJSON *user_message(const cJSON *input) {
    cJSON *m = cJSON_CreateObject();
    const char *text = NULL;
    char *owned = NULL;
    cJSON_AddStringToObject(m, "role", "user");
    if (cJSON_IsString(input)) {
        text = input->valuestring;
    } else {
        static const char *const keys[] = {"prompt", "question", "message", "task", NULL};
        for (int i = 0; keys[i] != NULL && text == NULL; i++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(input, keys[i]);
            if (cJSON_IsString(v)) {
                text = v->valuestring;
            }
        }
        if (text == NULL) {
            owned = cJSON_PrintUnformatted(input);
            text = owned != NULL ? owned : "";
        }
    }
    cJSON_AddStringToObject(m, "content", text);
    free(owned);
    return m;
}

static const char *role_of(const cJSON *m) { return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "role")); }
static const char *str_of(const cJSON *m, const char *k) {
    return cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, k));
}

/* ------------------------------------------------------------------ pins */

/* Does message m match pin rule p (every field it gives)? */
static bool pin_match(const lr_pin_t *p, const cJSON *m) {
    const char *role = role_of(m), *text = str_of(m, "content");
    if (role == NULL || strcmp(role, "summary") == 0 || (p->role != NULL && strcmp(p->role, role) != 0)) {
        return false;
    }
    if (p->contains != NULL && (text == NULL || strstr(text, p->contains) == NULL)) {
        return false;
    }
    if (p->tool != NULL) {
        const cJSON *c;
        bool calls = false;
        if (strcmp(role, "tool") == 0) {
            const char *name = str_of(m, "name");
            return name != NULL && strcmp(name, p->tool) == 0;
        }
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(m, "tool_calls")) {
            const char *name = str_of(c, "name");
            calls = calls || (name != NULL && strcmp(name, p->tool) == 0);
        }
        return calls;
    }
    return true;
}

/* Messages go in groups that are sent whole or not at all: an assistant
 * message with tool calls and the tool results after it; any other message
 * alone.  The index past the group that starts at i. */
static int group_end(const cJSON *conv, int i) {
    int n = cJSON_GetArraySize(conv);
    const cJSON *m = cJSON_GetArrayItem(conv, i);
    const char *role = role_of(m);
    if (role == NULL || strcmp(role, "assistant") != 0 ||
        cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(m, "tool_calls")) == 0) {
        return i + 1;
    }
    for (i++; i < n; i++) {
        const char *r = role_of(cJSON_GetArrayItem(conv, i));
        if (r == NULL || strcmp(r, "tool") != 0) {
            break;
        }
    }
    return i;
}

/* Appends to out the pinned groups of conv[from .. to). */
static void add_pinned(cJSON *out, const lr_agent_t *ag, const cJSON *conv, int from, int to) {
    for (int i = from; i < to && ag->npins > 0;) {
        int end = group_end(conv, i);
        bool pinned = false;
        for (int j = i; j < end && !pinned; j++) {
            for (int k = 0; k < ag->npins && !pinned; k++) {
                pinned = pin_match(&ag->pins[k], cJSON_GetArrayItem(conv, j));
            }
        }
        for (int j = i; pinned && j < end && j < to; j++) {
            cJSON_AddItemToArray(out, cJSON_Duplicate(cJSON_GetArrayItem(conv, j), true));
        }
        i = end;
    }
}

/* Window context: keep the first user message, the pinned messages before
 * the window and the last N messages, starting the window at a user or
 * assistant message so that no tool result is separated from the call that
 * asked for it. */
static cJSON *apply_window(const lr_agent_t *ag, const cJSON *conv, int n) {
    int total = cJSON_GetArraySize(conv);
    int start = total - n;
    cJSON *out = cJSON_CreateArray();
    if (start <= 1) {
        cJSON_Delete(out);
        return cJSON_Duplicate(conv, true);
    }
    while (start < total) {
        const char *role = role_of(cJSON_GetArrayItem(conv, start));
        if (role != NULL && strcmp(role, "tool") != 0) {
            break;
        }
        start++;
    }
    cJSON_AddItemToArray(out, cJSON_Duplicate(cJSON_GetArrayItem(conv, 0), true));
    add_pinned(out, ag, conv, 1, start);
    for (int i = start; i < total; i++) {
        cJSON_AddItemToArray(out, cJSON_Duplicate(cJSON_GetArrayItem(conv, i), true));
    }
    return out;
}

/* ---------------------------------------------------- summarize context */

const char lr_agent_summary_system[] =
    "[longrun:summarize] You condense the transcript of an AI agent's work so far into a "
    "summary that lets the agent continue without the transcript: the goal, what was done "
    "and found (with the tool results that still matter, quoted exactly where exact values "
    "count), decisions made, and what remains open.  Plain text, at most 400 words.";
#define SUMMARY_PIECE_MAX 4000

/* The last summary message of conv (NULL if none) and where it applies. */
static const cJSON *last_summary(const cJSON *conv, int *covers, int *turns) {
    const cJSON *found = NULL;
    const cJSON *m;
    *covers = 0;
    *turns = 0;
    cJSON_ArrayForEach(m, conv) {
        const char *role = role_of(m);
        if (role != NULL && strcmp(role, "summary") == 0) {
            const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "covers");
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(m, "turns");
            int n = cJSON_GetArraySize(conv);
            if (cJSON_IsNumber(c) && c->valuedouble >= 1 && c->valuedouble <= n) {
                found = m;
                *covers = (int)c->valuedouble;
                *turns = cJSON_IsNumber(t) && t->valuedouble >= 0 ? (int)t->valuedouble : 0;
            }
        }
    }
    return found;
}

/* Summarize context: the first (user) message carries the latest summary,
 * followed by the pinned messages of the part it covers and every message
 * after that part. */
static cJSON *apply_summary(const lr_agent_t *ag, const cJSON *conv) {
    int covers, turns, n = cJSON_GetArraySize(conv);
    const cJSON *sum = last_summary(conv, &covers, &turns);
    cJSON *out, *first;
    const char *orig, *text;
    size_t len;
    char *merged;
    if (sum == NULL || n == 0) {
        return cJSON_Duplicate(conv, true);
    }
    out = cJSON_CreateArray();
    first = cJSON_Duplicate(cJSON_GetArrayItem(conv, 0), true);
    orig = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first, "content"));
    text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(sum, "content"));
    len = (orig != NULL ? strlen(orig) : 0) + (text != NULL ? strlen(text) : 0) + 128;
    merged = malloc(len);
    if (merged != NULL) {
        snprintf(merged, len, "%s\n\n[longrun summary of %d earlier messages, %d assistant turns]\n%s",
                 orig != NULL ? orig : "", covers, turns, text != NULL ? text : "");
        cJSON_ReplaceItemInObjectCaseSensitive(first, "content", cJSON_CreateString(merged));
        free(merged);
    }
    cJSON_AddItemToArray(out, first);
    add_pinned(out, ag, conv, 1, covers);
    for (int i = covers; i < n; i++) {
        const cJSON *m = cJSON_GetArrayItem(conv, i);
        const char *role = role_of(m);
        if (i == 0 || (role != NULL && strcmp(role, "summary") == 0)) {
            continue;
        }
        cJSON_AddItemToArray(out, cJSON_Duplicate(m, true));
    }
    return out;
}

/* The conversation as the agent's context strategy sends it: a new array
 * (*owned) or st->conv itself when it is sent whole. */
cJSON *lr_agent_context_of(const agent_state_t *st, bool *owned) {
    int covers, turns;
    *owned = true;
    if (st->agent->context == LR_CONTEXT_WINDOW) {
        return apply_window(st->agent, st->conv, st->agent->context_messages);
    }
    if (last_summary(st->conv, &covers, &turns) != NULL) {
        return apply_summary(st->agent, st->conv);
    }
    *owned = false;
    return st->conv;
}

/* Does the conversation need a summary before the next model call?  Sets
 * summary_cut (keep the last N messages verbatim, starting at an assistant
 * message so that no tool result loses its call) and summary_turns. */
bool lr_agent_summary_needed(agent_state_t *st) {
    int n = cJSON_GetArraySize(st->conv), covers, turns, cut;
    cJSON *ctx;
    char *txt;
    long est;
    if (st->agent->context != LR_CONTEXT_SUMMARIZE) {
        return false;
    }
    ctx = apply_summary(st->agent, st->conv);
    txt = ctx != NULL ? cJSON_PrintUnformatted(ctx) : NULL;
    est = txt != NULL ? (long)strlen(txt) / 4 : 0;
    free(txt);
    cJSON_Delete(ctx);
    if (est <= st->agent->summarize_tokens) {
        return false;
    }
    (void)last_summary(st->conv, &covers, &turns);
    cut = n - st->agent->context_messages;
    while (cut < n) {
        const char *role = role_of(cJSON_GetArrayItem(st->conv, cut));
        if (role != NULL && strcmp(role, "assistant") == 0) {
            break;
        }
        cut++;
    }
    if (cut >= n || cut <= (covers > 1 ? covers : 1)) {
        return false; /* nothing new to summarize: send as is (the context check still applies) */
    }
    turns = 0;
    for (int i = 0; i < cut; i++) {
        const char *role = role_of(cJSON_GetArrayItem(st->conv, i));
        if (role != NULL && strcmp(role, "assistant") == 0) {
            turns++;
        }
    }
    st->summary_cut = cut;
    st->summary_turns = turns;
    return true;
}

static void append_piece(char **buf, size_t *len, size_t *cap, const char *a, const char *b) {
    size_t need = strlen(a) + (b != NULL ? (strlen(b) < SUMMARY_PIECE_MAX ? strlen(b) : SUMMARY_PIECE_MAX) : 0) + 8;
    if (*buf == NULL) {
        return;
    }
    if (*len + need > *cap) {
        size_t ncap = (*cap + need) * 2;
        char *nb = realloc(*buf, ncap);
        if (nb == NULL) {
            free(*buf);
            *buf = NULL;
            return;
        }
        *buf = nb;
        *cap = ncap;
    }
    *len += (size_t)snprintf(*buf + *len, *cap - *len, "%s%.*s%s\n", a, SUMMARY_PIECE_MAX, b != NULL ? b : "",
                             b != NULL && strlen(b) > SUMMARY_PIECE_MAX ? " [...]" : "");
}

/* The summarization request: one user message with the transcript of
 * conv[0 .. cut), the previous summary standing for what it covered. */
cJSON *lr_agent_summary_request(const agent_state_t *st) {
    int covers, turns;
    const cJSON *prev = last_summary(st->conv, &covers, &turns);
    size_t len = 0, cap = 4096;
    char *buf = malloc(cap);
    cJSON *conv, *u;
    const cJSON *first = cJSON_GetArrayItem(st->conv, 0);
    if (buf == NULL) {
        return NULL;
    }
    buf[0] = '\0';
    append_piece(&buf, &len, &cap, "The agent's task:\n",
                 cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(first, "content")));
    if (prev != NULL) {
        append_piece(&buf, &len, &cap, "\nSummary of the earlier work:\n",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(prev, "content")));
    }
    append_piece(&buf, &len, &cap, "\nTranscript since then:", NULL);
    for (int i = prev != NULL ? covers : 1; i < st->summary_cut; i++) {
        const cJSON *m = cJSON_GetArrayItem(st->conv, i);
        const char *role = role_of(m);
        const cJSON *c;
        if (role == NULL || strcmp(role, "summary") == 0) {
            continue;
        }
        if (strcmp(role, "tool") == 0) {
            char head[160];
            snprintf(head, sizeof(head), "tool %s returned: ",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "name")) != NULL
                         ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "name"))
                         : "?");
            append_piece(&buf, &len, &cap, head, cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content")));
            continue;
        }
        if (cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content")) != NULL) {
            append_piece(&buf, &len, &cap, strcmp(role, "assistant") == 0 ? "assistant: " : "user: ",
                         cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(m, "content")));
        }
        cJSON_ArrayForEach(c, cJSON_GetObjectItemCaseSensitive(m, "tool_calls")) {
            char head[160];
            snprintf(head, sizeof(head), "assistant called %s with ",
                     cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name")) != NULL
                         ? cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "name"))
                         : "?");
            append_piece(&buf, &len, &cap, head,
                         cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(c, "arguments")));
        }
    }
    if (buf == NULL) {
        return NULL;
    }
    conv = cJSON_CreateArray();
    u = cJSON_CreateObject();
    cJSON_AddStringToObject(u, "role", "user");
    cJSON_AddStringToObject(u, "content", buf);
    cJSON_AddItemToArray(conv, u);
    free(buf);
    return conv;
}

/* --------------------------------------------------------- conversation */

/* Rebuilds st->conv from the step log the worker loaded at the claim.
 * Returns false when it does not hold every checkpointed step. */
static bool conv_rebuild(agent_state_t *st) {
    const cJSON *e;
    int nsteps = 0;
    cJSON_Delete(st->conv);
    st->conv = cJSON_CreateArray();
    cJSON_ArrayForEach(e, lr_run_history(st->run)) {
        const cJSON *m;
        if (!cJSON_IsArray(e)) {
            continue; /* signals */
        }
        nsteps++;
        cJSON_ArrayForEach(m, e) {
            cJSON_AddItemToArray(st->conv, cJSON_Duplicate(m, true));
        }
    }
    if (nsteps != lr_run_step_no(st->run)) {
        LR_LOG(LR_LOG_ERROR, &st->log, "agent.history_gap", "conversation has %d of %d steps; retrying the task",
               nsteps, lr_run_step_no(st->run));
        return false;
    }
    return true;
}

int lr_agent_conv_load(agent_state_t *st) {
    if (st->conv == NULL || st->conv_step != lr_run_step_no(st->run)) {
        if (!conv_rebuild(st)) {
            /* The history holds the steps loaded at the claim; later ones
             * live only in st->conv.  Never send a conversation with a hole:
             * hand the task back to be loaded again. */
            cJSON_Delete(st->conv);
            st->conv = NULL;
            st->out->outcome = LR_STEP_FAIL_TRANSIENT;
            snprintf(st->out->error, sizeof(st->out->error), "conversation out of sync with the step log");
            return LR_EPERM;
        }
    }
    st->conv_step = -1; /* until this step finishes */
    if (cJSON_GetArraySize(st->conv) == 0) {
        cJSON *u = user_message(lr_run_input(st->run));
        cJSON_AddItemToArray(st->conv, cJSON_Duplicate(u, true));
        cJSON_AddItemToArray(st->added, u);
    }
    return 0;
}

void lr_agent_summary_add(agent_state_t *st, const char *text) {
    cJSON *sm = cJSON_CreateObject();
    cJSON_AddStringToObject(sm, "role", "summary");
    cJSON_AddStringToObject(sm, "content", text);
    cJSON_AddNumberToObject(sm, "covers", st->summary_cut);
    cJSON_AddNumberToObject(sm, "turns", st->summary_turns);
    cJSON_AddItemToArray(st->added, cJSON_Duplicate(sm, true));
    cJSON_AddItemToArray(st->conv, sm);
}
