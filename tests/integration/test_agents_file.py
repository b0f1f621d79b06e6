"""Issue 4 / bad-input corpus: every kind of invalid agents file gets a precise error
from `longrun-worker --check-config` (exit 2, the JSON path named), and a valid one
passes.  No servers: --check-config only loads and validates the file."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

MODEL = {"provider": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"}
TOOL = {"url": "http://127.0.0.1:9/tools/t", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}


def agents(agent=None, tools=None, top=None):
    a = {"name": "a1", "models": [dict(MODEL)], "tools": ["t"]}
    a.update(agent or {})
    doc = {"tools": {"t": dict(TOOL)}, "agents": [a]}
    if tools is not None:
        doc["tools"] = tools
    doc.update(top or {})
    return json.dumps(doc)


MCP = {"url": "http://127.0.0.1:9/mcp"}
CASES = [
    ("not JSON", "{\"agents\": [", "not valid JSON"),
    ("MCP server without url", agents(top={"mcp_servers": {"m": {}}}), "mcp_servers.m.url: required"),
    ("MCP server unknown key", agents(top={"mcp_servers": {"m": dict(MCP, tools=[])}}),
     "mcp_servers.m: unknown field \"tools\""),
    ("MCP header secret not set",
     agents(top={"mcp_servers": {"m": dict(MCP, headers={"Authorization": "Bearer ${LONGRUN_NO_SUCH_VAR}"})}}),
     "mcp_servers.m.headers.Authorization: environment variable LONGRUN_NO_SUCH_VAR"),
    ("MCP header the client sets", agents(top={"mcp_servers": {"m": dict(MCP, headers={"Mcp-Session-Id": "x"})}}),
     "set by the MCP client itself"),
    ("MCP allow not an array", agents(top={"mcp_servers": {"m": dict(MCP, allow="echo")}}), "mcp_servers.m.allow"),
    ("MCP timeout out of range", agents(top={"mcp_servers": {"m": dict(MCP, timeout_ms=5)}}),
     "mcp_servers.m.timeout_ms"),
    ("agent lists an unknown MCP server", agents({"mcp": ["nope"]}), "agents[0] (a1).mcp[0]: \"nope\" is not defined"),
    ("unknown top-level key", agents(top={"agentz": []}), "agentz"),
    ("unknown agent key", agents({"temperature": 1}), "agents[0]"),
    ("bad provider", agents({"models": [dict(MODEL, provider="openia")]}), "models[0].provider"),
    ("missing model", agents({"models": [{"provider": "openai"}]}), "models[0].model"),
    ("unknown tool in an agent", agents({"tools": ["nope"]}), "\"nope\" is not defined"),
    ("${VAR} not set", agents(tools={"t": dict(TOOL, url="${LONGRUN_NO_SUCH_VAR}/x")}), "LONGRUN_NO_SUCH_VAR"),
    ("built-in tool redefined", agents(tools={"sleep": dict(TOOL)}, agent={"tools": ["sleep"]}), "built-in"),
    ("tool schema with an unknown type",
     agents(tools={"t": dict(TOOL, parameters={"type": "object", "properties": {"q": {"type": "strin"}}})}),
     "tools.t.parameters: properties.q.type"),
    ("tool schema with a pattern POSIX cannot read",
     agents(tools={"t": dict(TOOL, parameters={"type": "string", "pattern": "(?<=a)b"})}), "tools.t.parameters"),
    ("tool schema with a dangling $ref",
     agents(tools={"t": dict(TOOL, parameters={"$ref": "#/$defs/nope"})}), "tools.t.parameters"),
    ("summarize without a threshold", agents({"context": {"strategy": "summarize"}}), "threshold_tokens"),
    ("pin with the full context", agents({"context": {"strategy": "full", "pin": [{"role": "user"}]}}), "pin"),
    ("pin not an array", agents({"context": {"strategy": "window", "pin": {"role": "user"}}}), "pin"),
    ("empty pin rule", agents({"context": {"strategy": "window", "pin": [{}]}}), "pin[0]"),
    ("unknown pin key", agents({"context": {"strategy": "window", "pin": [{"name": "x"}]}}), "name"),
    ("pin role unknown", agents({"context": {"strategy": "window", "pin": [{"role": "system"}]}}), "pin[0].role"),
    ("pin contains not a string", agents({"context": {"strategy": "window", "pin": [{"contains": 3}]}}),
     "pin[0].contains"),
    ("unknown context strategy", agents({"context": {"strategy": "compress"}}), "context.strategy"),
    ("slice of 0 steps", agents({"slice": {"steps": 0}}), "slice.steps"),
    ("unknown slice key", agents({"slice": {"stepz": 2}}), "stepz"),
    ("max_outage_seconds of 0", agents({"max_outage_seconds": 0}), "max_outage_seconds"),
    ("max_outage_seconds not an integer", agents({"max_outage_seconds": 1.5}), "max_outage_seconds"),
    ("unknown budget_clock", agents({"budget_clock": "cpu"}), "budget_clock"),
    ("budget_clock not a string", agents({"budget_clock": True}), "budget_clock"),
    ("negative max_concurrency", agents({"models": [dict(MODEL, max_concurrency=-1)]}), "max_concurrency"),
    ("budget out of range", agents({"budgets": {"max_steps": 0}}), "max_steps"),
    ("spend_caps not an object", agents({"spend_caps": 5}), "agents[0] (a1).spend_caps"),
    ("negative daily cap", agents({"spend_caps": {"daily_usd": -1}}), "spend_caps.daily_usd"),
    ("monthly cap not a number", agents({"spend_caps": {"monthly_usd": "10"}}), "spend_caps.monthly_usd"),
    ("unknown spend_caps key", agents({"spend_caps": {"weekly_usd": 1}}), "weekly_usd"),
    ("tenants not an object", agents(top={"tenants": []}), "tenants"),
    ("bad tenant name", agents(top={"tenants": {"a b": {"spend_caps": {"daily_usd": 1}}}}), "tenants.a b"),
    ("unknown tenant key", agents(top={"tenants": {"acme": {"caps": {}}}}), "tenants.acme"),
    ("tenant cap out of range", agents(top={"tenants": {"acme": {"spend_caps": {"daily_usd": 2e9}}}}),
     "tenants.acme.spend_caps.daily_usd"),
]


def check_config(text):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(text)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LONGRUN_")}
        env["LONGRUN_AGENTS_FILE"] = f.name
        return subprocess.run([os.path.join(h.BUILD, "longrun-worker"), "--check-config"], env=env,
                              capture_output=True, text=True, timeout=30)
    finally:
        os.unlink(f.name)


def test():
    ok = check_config(agents({"context": {"strategy": "summarize", "threshold_tokens": 4000, "messages": 6,
                                          "pin": [{"role": "tool", "tool": "lookup", "contains": "id"}]},
                              "slice": {"steps": 5, "seconds": 30}, "max_outage_seconds": 600, "budget_clock": "wall",
                              "models": [dict(MODEL, max_concurrency=4)],
                              "spend_caps": {"daily_usd": 5, "monthly_usd": 100.5}},
                             top={"tenants": {"acme:eu-1": {"spend_caps": {"monthly_usd": 0}}, "b": {}}}))
    h.eq(ok.returncode, 0, "a valid file passes: %s" % ok.stderr)
    h.check("configuration ok" in ok.stdout, ok.stdout)
    for what, text, word in CASES:
        r = check_config(text)
        h.eq(r.returncode, 2, "%s: exit code (stderr: %s)" % (what, r.stderr.strip()))
        h.check("invalid agents file" in r.stderr and word in r.stderr,
                "%s: the message names %r: %s" % (what, word, r.stderr.strip()))
        h.check("Traceback" not in r.stderr and "Sanitizer" not in r.stderr, "%s: clean failure" % what)
    h.log("%d invalid agents files rejected with a precise message" % len(CASES))


h.run(test)
