"""The documentation agrees with the code (no servers needed).

- every variable of common/config.c's table is in docs/configuration.md's
  table, with the same default and range, and the table lists nothing else;
- docs/task.schema.json is a valid JSON Schema and gives the same verdict as
  lr_task_parse() (common/task.c) on a set of bodies whose validity follows
  from task.c;
- every reason in docs/task-contract.md's "Reasons set by longrun" table
  occurs as a string literal in the C sources, so the docs cannot list
  reasons that do not exist;
- every built-in tool and top-level key of the agents file named in
  docs/agents.md exists in worker/agents.c.
"""
import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness as h  # noqa: E402

import jsonschema  # noqa: E402

SRC = os.path.abspath(h.SOURCE)

UUID = "7f1c1a52-8f3e-4c2b-9b7a-1e2d3c4b5a69"

# (body, valid according to lr_task_parse, why)
SAMPLES = [
    # --- valid
    ({"agent": "example", "input": "hi"}, True, "minimal task"),
    ({"id": UUID, "agent": "example", "input": {"question": "Weather in Oslo?"},
      "budgets": {"max_steps": 10, "max_tool_calls": 0, "max_tokens": 50000, "max_cost_usd": 0.5,
                  "max_seconds": 600},
      "deadline": "2026-11-22T10:00:00Z", "tenant": "acme:eu-1", "metadata": {"k": ["v", 1]},
      "callback_url": "https://example.com/cb", "max_attempts": 3}, True, "every field"),
    ({"id": UUID}, True, "continuation"),
    ({"id": UUID.upper()}, True, "continuation, uppercase uuid"),
    ({"id": UUID, "agent": "a", "input": "x"}, True, "task with id"),
    ({"agent": "a", "input": [1, 2, {"x": None}]}, True, "array input"),
    ({"agent": "a", "input": ""}, True, "empty string input"),
    ({"agent": "a", "input": {}}, True, "empty object input"),
    ({"agent": "9lives", "input": "x"}, True, "agent starts with a digit"),
    ({"agent": "a.b-c_d", "input": "x"}, True, "agent punctuation"),
    ({"agent": "a" * 64, "input": "x"}, True, "agent of 64 characters"),
    ({"agent": "http-steps", "input": {"steps": 3}}, True, "built-in kind"),
    ({"agent": "a", "input": "x", "budgets": {}}, True, "empty budgets"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": 10.0}}, True, "integral float"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": 1, "max_tool_calls": 100000,
                                                "max_tokens": 1000000000, "max_cost_usd": 100000,
                                                "max_seconds": 2592000}}, True, "budget maxima"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": 10000, "max_tool_calls": 0, "max_tokens": 1,
                                                "max_cost_usd": 0, "max_seconds": 1}}, True, "budget minima"),
    ({"agent": "a", "input": "x", "budgets": {"max_cost_usd": 0.125}}, True, "fractional cost"),
    ({"agent": "a", "input": "x", "max_attempts": 1}, True, "max_attempts 1"),
    ({"agent": "a", "input": "x", "max_attempts": 100}, True, "max_attempts 100"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00:00.123456+02:00"}, True, "fraction + offset"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22t10:00:00z"}, True, "lowercase t and z"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22 10:00:00-05:30"}, True, "space separator"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00:00." + "1" * 19 + "Z"}, True,
     "deadline of 40 characters"),
    ({"agent": "a", "input": "x", "tenant": "A" * 64}, True, "tenant of 64 characters"),
    ({"agent": "a", "input": "x", "tenant": "Acme_Corp.eu-1:prod"}, True, "tenant punctuation"),
    ({"agent": "a", "input": "x", "callback_url": "http://x"}, True, "http callback"),
    ({"agent": "a", "input": "x", "callback_url": "https://e.com/" + "p" * 2034}, True, "callback of 2048"),
    ({"agent": "a", "input": "x", "metadata": {}}, True, "empty metadata"),
    # --- invalid
    ({}, False, "empty object"),
    ([], False, "not an object"),
    ("x", False, "a string body"),
    ({"agent": "a", "input": "x", "priority": 1}, False, "unknown field"),
    ({"agent": "a", "input": "x", "reply_to": "q"}, False, "reply_to is a property, not a field"),
    ({"id": "123", "agent": "a", "input": "x"}, False, "id not a uuid"),
    ({"id": "{" + UUID + "}", "agent": "a", "input": "x"}, False, "id in braces"),
    ({"id": UUID[:-1], "agent": "a", "input": "x"}, False, "id of 35 characters"),
    ({"id": "g" + UUID[1:], "agent": "a", "input": "x"}, False, "id not hex"),
    ({"id": UUID.replace("-", ""), "agent": "a", "input": "x"}, False, "id without dashes"),
    ({"id": None}, False, "null id"),
    ({"id": 5}, False, "numeric id"),
    ({"id": "nope"}, False, "continuation with a bad id"),
    ({"id": UUID, "tenant": "t"}, False, "id + another field is not a continuation"),
    ({"id": UUID, "agent": "a"}, False, "task without input"),
    ({"input": "x"}, False, "missing agent"),
    ({"agent": "a"}, False, "missing input"),
    ({"agent": "Example", "input": "x"}, False, "uppercase agent"),
    ({"agent": "_a", "input": "x"}, False, "agent starts with _"),
    ({"agent": "-a", "input": "x"}, False, "agent starts with -"),
    ({"agent": "", "input": "x"}, False, "empty agent"),
    ({"agent": "a" * 65, "input": "x"}, False, "agent of 65 characters"),
    ({"agent": "a b", "input": "x"}, False, "agent with a space"),
    ({"agent": "a/b", "input": "x"}, False, "agent with a slash"),
    ({"agent": 5, "input": "x"}, False, "numeric agent"),
    ({"agent": "a", "input": None}, False, "null input"),
    ({"agent": "a", "input": 5}, False, "numeric input"),
    ({"agent": "a", "input": True}, False, "boolean input"),
    ({"agent": "a", "input": "x", "budgets": []}, False, "budgets not an object"),
    ({"agent": "a", "input": "x", "budgets": None}, False, "null budgets"),
    ({"agent": "a", "input": "x", "budgets": {"max_foo": 1}}, False, "unknown budget"),
    ({"agent": "a", "input": "x", "budgets": {"max_cost": 1}}, False, "max_cost is not a budget name"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": "10"}}, False, "budget as a string"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": 0}}, False, "max_steps 0"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": 10001}}, False, "max_steps 10001"),
    ({"agent": "a", "input": "x", "budgets": {"max_steps": 1.5}}, False, "max_steps 1.5"),
    ({"agent": "a", "input": "x", "budgets": {"max_tool_calls": -1}}, False, "max_tool_calls -1"),
    ({"agent": "a", "input": "x", "budgets": {"max_tool_calls": 100001}}, False, "max_tool_calls 100001"),
    ({"agent": "a", "input": "x", "budgets": {"max_tokens": 0}}, False, "max_tokens 0"),
    ({"agent": "a", "input": "x", "budgets": {"max_tokens": 1000000001}}, False, "max_tokens over 1e9"),
    ({"agent": "a", "input": "x", "budgets": {"max_cost_usd": -0.01}}, False, "negative cost"),
    ({"agent": "a", "input": "x", "budgets": {"max_cost_usd": 100000.5}}, False, "cost over 100000"),
    ({"agent": "a", "input": "x", "budgets": {"max_seconds": 0}}, False, "max_seconds 0"),
    ({"agent": "a", "input": "x", "budgets": {"max_seconds": 2592001}}, False, "max_seconds over 30 days"),
    ({"agent": "a", "input": "x", "budgets": {"max_seconds": 60.5}}, False, "fractional max_seconds"),
    ({"agent": "a", "input": "x", "max_attempts": 0}, False, "max_attempts 0"),
    ({"agent": "a", "input": "x", "max_attempts": 101}, False, "max_attempts 101"),
    ({"agent": "a", "input": "x", "max_attempts": 2.5}, False, "fractional max_attempts"),
    ({"agent": "a", "input": "x", "max_attempts": "3"}, False, "max_attempts as a string"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22"}, False, "date only"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00:00"}, False, "no zone"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00Z"}, False, "no seconds"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00:00.Z"}, False, "empty fraction"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00:00+0200"}, False, "offset without colon"),
    ({"agent": "a", "input": "x", "deadline": "2026-11-22T10:00:00." + "1" * 20 + "Z"}, False,
     "deadline of 41 characters"),
    ({"agent": "a", "input": "x", "deadline": "tomorrow"}, False, "deadline in words"),
    ({"agent": "a", "input": "x", "deadline": 1764000000}, False, "numeric deadline"),
    ({"agent": "a", "input": "x", "tenant": ""}, False, "empty tenant"),
    ({"agent": "a", "input": "x", "tenant": "A" * 65}, False, "tenant of 65 characters"),
    ({"agent": "a", "input": "x", "tenant": "a b"}, False, "tenant with a space"),
    ({"agent": "a", "input": "x", "tenant": "caf\u00e9"}, False, "non-ASCII tenant"),
    ({"agent": "a", "input": "x", "tenant": None}, False, "null tenant"),
    ({"agent": "a", "input": "x", "metadata": []}, False, "metadata not an object"),
    ({"agent": "a", "input": "x", "metadata": "k=v"}, False, "metadata as a string"),
    ({"agent": "a", "input": "x", "metadata": None}, False, "null metadata"),
    ({"agent": "a", "input": "x", "callback_url": "ftp://x"}, False, "ftp callback"),
    ({"agent": "a", "input": "x", "callback_url": "example.com/cb"}, False, "callback without scheme"),
    ({"agent": "a", "input": "x", "callback_url": "HTTPS://e.com"}, False, "uppercase scheme"),
    ({"agent": "a", "input": "x", "callback_url": "https://e.com/" + "p" * 2035}, False, "callback of 2049"),
    ({"agent": "a", "input": "x", "callback_url": None}, False, "null callback"),
]


def config_entries():
    """(name, type, default, lo, hi) from common/config.c's table."""
    text = open(os.path.join(SRC, "common", "config.c")).read()
    out = []
    for m in re.finditer(r'^\s*([SID])\("(LONGRUN_[A-Z0-9_]+)",\s*\w+,\s*("[^"]*"|\w+)(?:,\s*([^,)]+),\s*([^,)]+))?',
                         text, re.M):
        kind, name, default, lo, hi = m.groups()
        if default.startswith('"'):
            default = default[1:-1]
        else:
            default = None  # a macro (LR_DEFAULT_AMQP_URL): checked by name only
        if kind == "S":
            lo = hi = None
        out.append((name, kind, default, lo, hi))
    h.check(len(out) >= 25, "parsed only %d entries from common/config.c" % len(out))
    return out


def md_table_after(path, heading):
    """Rows (lists of cells) of the first table after the heading line."""
    lines = open(path).read().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        raise h.TestFailure("%s: heading %r not found" % (path, heading))
    rows = []
    for line in lines[start + 1:]:
        s = line.strip()
        if s.startswith("#"):
            break
        if not s.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in s.strip("|").split("|")]
        if all(re.fullmatch(r":?-+:?", c) for c in cells):
            continue
        rows.append(cells)
    h.check(len(rows) > 1, "%s: no table after %r" % (path, heading))
    return rows[1:]  # without the header row


def unquote(cell):
    return cell.replace("`", "").strip()


def check_configuration():
    path = os.path.join(SRC, "docs", "configuration.md")
    text = open(path).read()
    rows = md_table_after(path, "## The configuration table")
    doc = {}
    for cells in rows:
        name = unquote(cells[0])
        h.check(name not in doc, "configuration.md lists %s twice" % name)
        doc[name] = cells
    entries = config_entries()
    names = {e[0] for e in entries}
    for name, kind, default, lo, hi in entries:
        h.check(name in text, "%s (common/config.c) is not documented in docs/configuration.md" % name)
        h.check(name in doc, "%s is missing from the configuration table" % name)
        cells = doc[name]
        if default:
            h.eq(unquote(cells[1]), default, "default of %s in configuration.md" % name)
        if lo is not None:
            want = "%s..%s" % (lo.strip(), hi.strip())
            h.eq(unquote(cells[2]), want, "range of %s in configuration.md" % name)
    extra = sorted(set(doc) - names)
    h.check(not extra, "configuration table lists variables that common/config.c does not have: %r" % extra)


def c_sources():
    files = []
    for d in ("common", "worker", "scheduler", "cli"):
        files += glob.glob(os.path.join(SRC, d, "*.c")) + glob.glob(os.path.join(SRC, d, "*.h"))
    h.check(files, "no C sources under %s" % SRC)
    return "\n".join(open(f, errors="replace").read() for f in files)


def check_reasons():
    path = os.path.join(SRC, "docs", "task-contract.md")
    rows = md_table_after(path, "### Reasons set by longrun")
    code = c_sources()
    names = []
    for cells in rows:
        m = re.fullmatch(r"`([a-z_]+)`", cells[0])
        h.check(m is not None, "reason cell %r is not one `name`" % cells[0])
        names.append(m.group(1))
    h.check(len(names) >= 10, "only %d reasons in the table" % len(names))
    for r in names:
        h.check(('"%s"' % r) in code or ("'%s'" % r) in code,
                "reason %r (docs/task-contract.md) occurs nowhere in the C sources as a string" % r)
    # and the other way round, for the reasons the worker writes itself
    for r in ("bad_json", "invalid", "oversized", "unknown_task", "unknown_agent", "crash_loop", "exhausted",
              "deadline", "permanent_error", "context_length", "max_steps", "max_tool_calls", "max_tokens",
              "max_cost", "max_seconds"):
        h.check(r in names, "reason %r is missing from docs/task-contract.md" % r)


def check_schema():
    path = os.path.join(SRC, "docs", "task.schema.json")
    schema = json.load(open(path))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    v = cls(schema)
    wrong = []
    for body, valid, why in SAMPLES:
        got = v.is_valid(body)
        if got != valid:
            wrong.append("%s: schema says %s, lr_task_parse %s (%s)" %
                         (why, "valid" if got else "invalid", "valid" if valid else "invalid",
                          json.dumps(body)[:120]))
    h.check(not wrong, "docs/task.schema.json disagrees with common/task.c:\n  " + "\n  ".join(wrong))
    # the examples in the contract are valid bodies
    text = open(os.path.join(SRC, "docs", "task-contract.md")).read()
    n = 0
    for block in re.findall(r"```json task\n(.*?)```", text, re.S):
        body = json.loads(block)
        errors = sorted(v.iter_errors(body), key=str)
        h.check(not errors, "example body in task-contract.md is invalid: %s" % (errors[:1],))
        n += 1
    h.check(n >= 2, "task-contract.md has %d ```json task examples" % n)


def check_agents_doc():
    text = open(os.path.join(SRC, "docs", "agents.md")).read()
    agents_c = open(os.path.join(SRC, "worker", "agents.c")).read()
    for tool in ("sleep", "wait_for_event", "request_approval"):
        h.check(tool in text, "built-in tool %s missing from docs/agents.md" % tool)
        h.check('"%s"' % tool in agents_c, "built-in tool %s not in worker/agents.c" % tool)
    # the full example in agents.md must be a valid agents file shape: same keys as agents.c knows
    m = re.search(r"```json agents\n(.*?)```", text, re.S)
    h.check(m is not None, "docs/agents.md has no ```json agents example")
    example = json.loads(m.group(1))
    known = {
        "top": ("models", "tools", "agents", "tenants", "$comment"),
        "tool": ("description", "parameters", "url", "timeout_ms", "retries", "requires_approval", "writes",
                 "max_result_bytes"),
        "agent": ("name", "system", "models", "tools", "budgets", "context", "description", "spend_caps"),
        "model": ("provider", "base_url", "model", "api_key_env", "max_tokens", "max_tokens_field", "temperature",
                  "tool_choice", "parallel_tool_calls", "timeout_ms", "retries"),
    }
    for kind, keys in known.items():
        for k in keys:
            h.check('"%s"' % k in agents_c, "agents.c does not know key %s (%s)" % (k, kind))

    def keys_ok(obj, kind, where):
        extra = set(obj) - set(known[kind])
        h.check(not extra, "docs/agents.md example: unknown keys %r in %s" % (sorted(extra), where))

    keys_ok(example, "top", "the top level")
    for name, t in example.get("tools", {}).items():
        keys_ok(t, "tool", "tools." + name)
    for a in example["agents"]:
        keys_ok(a, "agent", "agent " + a["name"])
        for m in a["models"]:
            keys_ok(m, "model", "agent %s models" % a["name"])


def test():
    check_configuration()
    check_schema()
    check_reasons()
    check_agents_doc()
    h.log("configuration table, task schema (%d bodies), reasons and agents example agree with the code"
          % len(SAMPLES))


if __name__ == "__main__":
    h.run(test)
