/*
 * fuzz_agents.c - libFuzzer target for the agents-file parser,
 * lr_agents_load() (worker/agents.c), and for what the worker then builds
 * from a loaded registry: the model request body of every model of every
 * agent (lr_provider_request, lr_provider_url).
 *
 * lr_agents_load() reads a path, so each input is written to one memfd,
 * opened again through /proc/self/fd/N (a new file description, offset 0).
 * "${VAR}" expansion is exercised with a few variables set at start-up.
 * The registry is process-global: it is freed after every input so that
 * LeakSanitizer sees only real leaks.
 */
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "agents.h"
#include "fuzz_util.h"
#include "provider.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int memfd = -1;
static char path[64];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    memfd = memfd_create("fuzz_agents", 0);
    if (memfd < 0) {
        perror("memfd_create");
        abort();
    }
    snprintf(path, sizeof(path), "/proc/self/fd/%d", memfd);
    setenv("LONGRUN_FIXTURE_URL", "http://127.0.0.1:8080", 1);
    setenv("FUZZ_EMPTY", "", 1);
    setenv("FUZZ_LONG", "https://example.com/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 1);
    return 0;
}

/* A small neutral conversation that uses every tool of the agent once. */
static cJSON *conversation(const lr_agent_t *a) {
    cJSON *conv = cJSON_CreateArray();
    cJSON *u = cJSON_CreateObject();
    cJSON *as = cJSON_CreateObject();
    cJSON *calls;
    cJSON_AddStringToObject(u, "role", "user");
    cJSON_AddStringToObject(u, "content", "hello");
    cJSON_AddItemToArray(conv, u);
    cJSON_AddStringToObject(as, "role", "assistant");
    cJSON_AddNullToObject(as, "content");
    calls = cJSON_AddArrayToObject(as, "tool_calls");
    for (int i = 0; i < a->ntools; i++) {
        cJSON *c = cJSON_CreateObject();
        char id[32];
        snprintf(id, sizeof(id), "call_%d", i);
        cJSON_AddStringToObject(c, "id", id);
        cJSON_AddStringToObject(c, "name", a->tools[i]->name);
        cJSON_AddStringToObject(c, "arguments", "{\"x\":1}");
        cJSON_AddItemToArray(calls, c);
    }
    cJSON_AddItemToArray(conv, as);
    for (int i = 0; i < a->ntools; i++) {
        cJSON *t = cJSON_CreateObject();
        char id[32];
        snprintf(id, sizeof(id), "call_%d", i);
        cJSON_AddStringToObject(t, "role", "tool");
        cJSON_AddStringToObject(t, "tool_call_id", id);
        cJSON_AddStringToObject(t, "name", a->tools[i]->name);
        cJSON_AddStringToObject(t, "content", "ok");
        cJSON_AddItemToArray(conv, t);
    }
    return conv;
}

static void exercise(const lr_agent_t *a) {
    cJSON *conv = conversation(a);
    FUZZ_CHECK(a->nmodels >= 1 && a->nmodels <= 8, "1 to 8 models");
    FUZZ_CHECK(lr_name_valid(a->name), "agent name valid");
    for (int i = 0; i < a->ntools; i++) {
        FUZZ_CHECK(a->tools[i] != NULL && lr_agent_tool(a, a->tools[i]->name) != NULL, "tool lookup");
    }
    for (int i = 0; i < a->nmodels; i++) {
        const lr_model_ref_t *m = &a->models[i];
        char *url = lr_provider_url(m);
        char *req = lr_provider_request(m, a->system, conv, a->tools, a->ntools);
        cJSON *j;
        FUZZ_CHECK(url != NULL && (strncmp(url, "http://", 7) == 0 || strncmp(url, "https://", 8) == 0),
                   "endpoint is an http(s) URL");
        FUZZ_CHECK(req != NULL, "a request body is built");
        j = cJSON_Parse(req);
        FUZZ_CHECK(cJSON_IsObject(j), "the request body is a JSON object");
        cJSON_Delete(j);
        free(req);
        free(url);
    }
    cJSON_Delete(conv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[512];
    int rc;

    if (ftruncate(memfd, 0) != 0 || pwrite(memfd, data, size, 0) != (ssize_t)size) {
        abort();
    }
    memset(err, 'X', sizeof(err));
    rc = lr_agents_load(path, err, sizeof(err));
    FUZZ_CHECK(rc == 0 || rc == LR_EIO || rc == LR_EPARSE || rc == LR_ECONFIG || rc == LR_ENOMEM,
               "lr_agents_load returns a documented code");
    if (rc != 0) {
        if (rc != LR_ENOMEM) {
            FUZZ_CHECK(fuzz_terminated(err, sizeof(err)) && err[0] != '\0', "a rejected file gets a message");
        }
        FUZZ_CHECK(lr_agents_count() == 0, "a failed load leaves no registry (none was loaded)");
        return 0;
    }
    FUZZ_CHECK(lr_agents_count() >= 1, "a loaded file has agents");
    {
        /* Enumerate the agents through the public lookup, by the names in the input. */
        cJSON *root = cJSON_ParseWithLength((const char *)data, size);
        const cJSON *agents = cJSON_GetObjectItemCaseSensitive(root, "agents");
        const cJSON *it;
        int n = 0;
        cJSON_ArrayForEach(it, agents) {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(it, "name");
            const lr_agent_t *a = cJSON_IsString(name) ? lr_agents_find(name->valuestring) : NULL;
            FUZZ_CHECK(a != NULL, "every agent of the file is found by name");
            exercise(a);
            n++;
        }
        FUZZ_CHECK(n == lr_agents_count(), "agent count matches the file");
        cJSON_Delete(root);
    }
    lr_agents_free();
    return 0;
}
