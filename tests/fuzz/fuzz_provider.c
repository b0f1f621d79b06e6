/*
 * fuzz_provider.c - libFuzzer target for the model response parsers,
 * lr_provider_parse() (worker/provider.c).  Built twice by
 * tests/fuzz/CMakeLists.txt: fuzz_openai (FUZZ_PROVIDER=LR_PROVIDER_OPENAI,
 * Chat Completions bodies) and fuzz_anthropic (LR_PROVIDER_ANTHROPIC,
 * Messages bodies).
 *
 * The input is a 2xx response body, not NUL-terminated (the worker passes
 * body + length).  An accepted reply is then used as the worker uses it: the
 * neutral assistant message, followed by a tool result for each call, is
 * turned into the next request for both providers (the fallback chain can
 * switch wire formats mid-task), which parses the tool-call arguments.
 *
 * The assistant message must also be storable in jsonb (valid UTF-8): the
 * worker checkpoints it into task_steps.messages (LR_FUZZ_STRICT=0 skips that
 * check, see fuzz_util.h).
 */
#include "agents.h"
#include "fuzz_util.h"
#include "provider.h"

#ifndef FUZZ_PROVIDER
#error "define FUZZ_PROVIDER (LR_PROVIDER_OPENAI or LR_PROVIDER_ANTHROPIC)"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static lr_model_ref_t model_ref(enum lr_provider p) {
    lr_model_ref_t m;
    memset(&m, 0, sizeof(m));
    m.provider = p;
    m.base_url = (char *)"http://127.0.0.1:8080/v1";
    m.model = (char *)"fuzz-model";
    m.max_tokens_field = (char *)"max_completion_tokens";
    m.max_tokens = 256;
    m.temperature = 0.5;
    m.tool_choice = (char *)"auto";
    m.parallel_tool_calls = 1;
    m.timeout_ms = 1000;
    m.retries = 0;
    return m;
}

static const lr_tool_def_t lookup = {.name = (char *)"lookup",
                                     .description = (char *)"Look something up",
                                     .url = (char *)"http://x/tools/lookup",
                                     .timeout_ms = 1000,
                                     .max_result_bytes = 16384,
                                     .builtin = LR_TOOL_HTTP};

static void next_request(const lr_model_reply_t *r) {
    const lr_tool_def_t *tools[] = {&lookup};
    cJSON *conv = cJSON_CreateArray();
    cJSON *u = cJSON_CreateObject();
    const cJSON *calls = cJSON_GetObjectItemCaseSensitive(r->assistant, "tool_calls");
    const cJSON *c;
    cJSON_AddStringToObject(u, "role", "user");
    cJSON_AddStringToObject(u, "content", "question");
    cJSON_AddItemToArray(conv, u);
    cJSON_AddItemToArray(conv, cJSON_Duplicate(r->assistant, true));
    cJSON_ArrayForEach(c, calls) {
        cJSON *t = cJSON_CreateObject();
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(c, "id");
        cJSON_AddStringToObject(t, "role", "tool");
        cJSON_AddStringToObject(t, "tool_call_id", cJSON_IsString(id) ? id->valuestring : "");
        cJSON_AddStringToObject(t, "content", "result");
        cJSON_AddItemToArray(conv, t);
    }
    for (int p = LR_PROVIDER_OPENAI; p <= LR_PROVIDER_ANTHROPIC; p++) {
        lr_model_ref_t m = model_ref((enum lr_provider)p);
        char *req = lr_provider_request(&m, "system prompt", conv, tools, 1);
        cJSON *j;
        FUZZ_CHECK(req != NULL, "a next request is built");
        j = cJSON_Parse(req);
        FUZZ_CHECK(cJSON_IsObject(j), "the next request is a JSON object");
        cJSON_Delete(j);
        free(req);
    }
    cJSON_Delete(conv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    lr_model_ref_t m = model_ref(FUZZ_PROVIDER);
    lr_model_reply_t r;
    char err[256];
    int rc;
    int n = 0;
    const cJSON *calls, *c;

    memset(err, 'X', sizeof(err));
    rc = lr_provider_parse(&m, (const char *)data, size, 7, &r, err, sizeof(err));
    FUZZ_CHECK(rc == 0 || rc == LR_EPARSE || rc == LR_ENOMEM, "lr_provider_parse returns 0, LR_EPARSE or LR_ENOMEM");
    if (rc != 0) {
        if (rc == LR_EPARSE) {
            FUZZ_CHECK(fuzz_terminated(err, sizeof(err)) && err[0] != '\0', "a rejected body gets a message");
        }
        FUZZ_CHECK(r.assistant == NULL && r.text == NULL, "a rejected body leaves nothing to free");
        return 0;
    }
    FUZZ_CHECK(cJSON_IsObject(r.assistant), "the assistant message is an object");
    FUZZ_CHECK(fuzz_terminated(r.finish, sizeof(r.finish)), "finish is a C string");
    FUZZ_CHECK(r.tokens_in >= 0 && r.tokens_out >= 0 && r.tokens_cached >= 0, "token counts are not negative");
    calls = cJSON_GetObjectItemCaseSensitive(r.assistant, "tool_calls");
    cJSON_ArrayForEach(c, calls) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(c, "id");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(c, "name");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(c, "arguments");
        FUZZ_CHECK(cJSON_IsString(id) && cJSON_IsString(name) && cJSON_IsString(args),
                   "every tool call has string id, name and arguments");
        n++;
    }
    FUZZ_CHECK(n == r.ntool_calls, "ntool_calls counts the tool_calls array");
    if (fuzz_strict()) {
        char *s = cJSON_PrintUnformatted(r.assistant);
        FUZZ_CHECK(s != NULL && fuzz_pg_json_ok(s), "the assistant message is storable in jsonb (valid UTF-8)");
        free(s);
    }
    next_request(&r);
    lr_model_reply_free(&r);
    return 0;
}
