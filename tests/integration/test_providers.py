"""Issue 18, item 4: the model-server recipes of docs/providers.md, each run against the fixture
server's mode for that server's quirks: Azure OpenAI (deployment URL, api-version, api-key
header), a server without usage (tokens estimated so budgets still bind), Ollama's max_tokens.
Real RabbitMQ and PostgreSQL."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

SECRET = "azure-key-9d2f0c"


def agent(name, **model):
    m = {"provider": "openai", "api_key_env": "FIXTURE_KEY", "max_tokens": 64}
    m.update(model)
    return {"name": name, "models": [m], "tools": ["lookup"]}


AGENTS = {
    "models": {"fixture-nousage-2": {"input_per_mtok": 1, "output_per_mtok": 2}},
    "tools": {"lookup": {"description": "Look something up", "url": "${LONGRUN_FIXTURE_URL}/tools/lookup"}},
    "agents": [
        # docs/providers.md, "Azure OpenAI"
        agent("azure", base_url="${LONGRUN_FIXTURE_URL}/openai/deployments/fixture-steps-2", model="fixture-steps-2",
              auth_header="api-key", api_version="2024-10-21"),
        agent("azure-noversion", base_url="${LONGRUN_FIXTURE_URL}/openai/deployments/fixture-steps-2",
              model="fixture-steps-2", auth_header="api-key"),
        # a server that leaves usage out
        agent("nousage", base_url="${LONGRUN_FIXTURE_URL}/v1", model="fixture-nousage-2"),
        # docs/providers.md, "Ollama": it reads max_tokens only
        agent("ollama", base_url="${LONGRUN_FIXTURE_URL}/v1", model="fixture-steps-2", max_tokens_field="max_tokens"),
    ],
}


def task(env, tid):
    return env.sql("select * from tasks where id = %s", (tid,))[0]


def calls(env, tid):
    return [r for r in env.fixture_requests() if r["headers"].get("x-longrun-task-id") == tid and r["kind"] == "openai"]


def test():
    with h.Env("providers") as env:
        agents = env.write_json("agents.json", AGENTS)
        env.start_fixture("--require-auth", SECRET)
        env.start_scheduler()
        env.start_worker("w1", LONGRUN_AGENTS_FILE=agents, FIXTURE_KEY=SECRET)
        names = [a["name"] for a in AGENTS["agents"]]
        ids = dict(zip(names, env.enqueue_many([{"agent": n, "input": "recipe " + n} for n in names])))
        env.wait_all_terminal(len(names), 60, statuses=("succeeded", "dead"))

        t = task(env, ids["azure"])
        h.eq(t["status"], "succeeded", "azure: %r" % t["error"])
        rs = calls(env, ids["azure"])
        h.eq(len(rs), 2, "azure: two model calls")
        for r in rs:
            h.eq(r["path"], "/openai/deployments/fixture-steps-2/chat/completions", "the deployment URL")
            h.eq(r["query"], "api-version=2024-10-21", "the api-version parameter")
            h.eq(r["headers"].get("api-key"), SECRET, "the key in the api-key header")
            h.check("authorization" not in r["headers"], "no Authorization header to Azure")

        t = task(env, ids["azure-noversion"])
        h.eq(t["status"], "dead", "azure without api_version is refused for good")
        h.check("404" in (t["error"] or "") or "not_found" in (t["error"] or ""), t["error"])

        t = task(env, ids["nousage"])
        h.eq(t["status"], "succeeded", "nousage: %r" % t["error"])
        h.check(t["tokens_in"] > 0 and t["tokens_out"] > 0 and float(t["cost_usd"]) > 0,
                "tokens estimated without usage, so budgets and cost still bind: %r" % t)

        t = task(env, ids["ollama"])
        h.eq(t["status"], "succeeded", "ollama: %r" % t["error"])
        h.eq(len(calls(env, ids["ollama"])), 2, "ollama: two model calls")
        for r in calls(env, ids["ollama"]):
            body = r["body"]
            h.eq((body.get("max_tokens"), "max_completion_tokens" in body), (64, False), "max_tokens only")


h.run(test)
