#!/usr/bin/python3
"""Writes the seed corpus of every fuzz target into tests/fuzz/corpus/<target>/.

    /usr/bin/python3 tests/fuzz/make_seeds.py

Seeds are real examples: task bodies from docs/task-contract.md and the
malformed kinds of tests/integration/test_malformed.py, the agents files of
the repository, the OpenAI spec examples (OPENAI_SPEC_DIR, default
/work/shared/reference/openai-spec, if present), and the OpenAI and Anthropic
bodies -- successes and errors -- that the fixture server
(tests/fixtures/fixture_server.py) really sends for its scripted models.
Files are named by content (sha1 prefix), so running this again only adds.
The corpus is committed; this script is for regenerating or extending it.
"""
import glob
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
CORPUS = os.path.join(HERE, "corpus")
SPEC = os.environ.get("OPENAI_SPEC_DIR") or "/work/shared/reference/openai-spec"


def put(target, data, name=None):
    if isinstance(data, str):
        data = data.encode()
    if not isinstance(data, bytes):
        data = json.dumps(data).encode()
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    h = hashlib.sha1(data).hexdigest()[:12]
    fn = os.path.join(d, (name + "-" if name else "") + h)
    if not any(f.endswith(h) for f in os.listdir(d)):
        with open(fn, "wb") as f:
            f.write(data)


UUID = "7f1c1a52-8f3e-4c2b-9b7a-1e2d3c4b5a69"


def task_seeds():
    t = "fuzz_task"
    put(t, {"id": UUID, "agent": "example", "input": "Weather in Oslo?"}, "minimal")
    put(t, {"id": "0b6d8a4e-2f53-4f7e-9c1a-5d2e8b7c6a10", "agent": "example",
            "input": {"question": "Weather in Oslo?"},
            "budgets": {"max_steps": 10, "max_tool_calls": 10, "max_tokens": 50000, "max_cost_usd": 0.5,
                        "max_seconds": 600},
            "max_attempts": 3, "deadline": "2026-11-22T10:00:00Z", "tenant": "acme:eu-1",
            "metadata": {"team": "search", "n": [1, 2, 3]}, "callback_url": "https://example.com/hook"}, "full")
    put(t, {"id": UUID}, "continuation")
    put(t, {"id": UUID.upper()}, "continuation-upper")
    put(t, {"agent": "http-steps", "input": {"steps": 3, "path": "/step"}}, "no-id")
    put(t, {"agent": "a", "input": ["x", 1, None]}, "input-array")
    put(t, {"id": UUID, "agent": "a", "input": {}, "deadline": "2026-11-22T10:00:00.123+02:00"}, "deadline-offset")
    put(t, {"id": UUID, "agent": "a", "input": {}, "deadline": "2026-11-22 10:00:00z"}, "deadline-space")
    # the malformed kinds of test_malformed.py
    put(t, b"this is not json", "not-json")
    put(t, b"\xff\x00\xfe\x01garbage", "binary")
    put(t, b'{"id":"%s","agent":"http-steps","input":{"steps":' % UUID.encode(), "truncated")
    put(t, json.dumps({"id": UUID}) + " trailing", "trailing")
    put(t, json.dumps({"id": UUID}) + " \x00 after-nul", "trailing-after-nul")
    put(t, b"", "empty")
    put(t, b"   \n\t ", "whitespace")
    put(t, [1, "agent", "http-steps"], "array")
    put(t, "\"task\"", "scalar")
    put(t, {"id": UUID, "input": {"steps": 1}}, "no-agent")
    put(t, {"id": UUID, "agent": "Bad Agent", "input": {}}, "bad-agent")
    put(t, {"id": UUID, "agent": "http-steps"}, "no-input")
    put(t, {"id": UUID, "agent": "http-steps", "input": None}, "null-input")
    put(t, {"id": UUID, "agent": "http-steps", "input": 5}, "number-input")
    put(t, {"id": "not-a-uuid", "agent": "http-steps", "input": {}}, "bad-id")
    put(t, {"id": 12, "agent": "http-steps", "input": {}}, "number-id")
    put(t, {"id": UUID, "agent": "http-steps", "input": {}, "colour": 1}, "unknown-field")
    put(t, {"id": UUID, "agent": "http-steps", "input": {}, "\u00fc" * 40: 1}, "unknown-field-utf8")
    put(t, {"id": UUID, "agent": "x", "input": {"d": json.loads("[" * 40 + "]" * 40)}}, "too-deep")
    put(t, {"id": UUID, "agent": "x", "input": {}, "budgets": {"max_steps": 0}}, "budget-range")
    put(t, {"id": UUID, "agent": "x", "input": {}, "budgets": {"max_steps": 1.5}}, "budget-fraction")
    put(t, {"id": UUID, "agent": "x", "input": {}, "budgets": {"max_bananas": 3}}, "budget-unknown")
    put(t, {"id": UUID, "agent": "x", "input": {}, "budgets": {"max_tokens": "many"}}, "budget-type")
    put(t, '{"id":"%s","agent":"x","input":{},"budgets":{"max_cost_usd":1e999}}' % UUID, "budget-inf")
    put(t, '{"id":"%s","agent":"x","input":{},"max_attempts":1e999}' % UUID, "attempts-inf")
    put(t, {"id": UUID, "agent": "x", "input": {}, "max_attempts": 0}, "attempts-zero")
    put(t, {"id": UUID, "agent": "x", "input": {}, "tenant": "t" * 65}, "tenant-long")
    put(t, {"id": UUID, "agent": "x", "input": {}, "tenant": "a b"}, "tenant-space")
    put(t, {"id": UUID, "agent": "x", "input": {}, "metadata": {"pad": "x" * 17000}}, "metadata-big")
    put(t, {"id": UUID, "agent": "x", "input": {}, "metadata": []}, "metadata-array")
    put(t, {"id": UUID, "agent": "x", "input": {}, "callback_url": "ftp://x"}, "callback-ftp")
    put(t, '{"id":"%s","id":"%s","agent":"x","input":{}}' % (UUID, UUID), "duplicate-key")
    put(t, '{"id":"%s","agent":"x\\u0000y","input":{}}' % UUID, "nul-escape")
    put(t, '{"id":"%s","agent":"x","input":"\\ud800"}' % UUID, "lone-surrogate")


def agents_seeds():
    t = "fuzz_agents"
    for f in [os.path.join(ROOT, "examples", "agents.json"),
              os.path.join(ROOT, "tests", "fixtures", "agents.test.json")]:
        if os.path.exists(f):
            put(t, open(f, "rb").read(), os.path.basename(f).replace(".", "-"))
    m = {"provider": "openai", "base_url": "${LONGRUN_FIXTURE_URL}/v1", "model": "fixture-steps-10"}
    put(t, {"agents": [{"name": "a", "models": [m]}]}, "minimal")
    put(t, {"tools": {"lookup": {"url": "http://x/tools/lookup", "parameters": {"type": "object"}}},
            "agents": [{"name": "a", "models": [m], "tools": ["lookup", "sleep", "wait_for_event",
                                                           "request_approval"],
                        "context": {"strategy": "window", "messages": 10}, "budgets": {"max_steps": 5}}]},
        "tools-builtins")
    put(t, {"agents": [{"name": "a", "models": [{"provider": "anthropic", "model": "claude", "tool_choice": "required",
                                                 "parallel_tool_calls": False, "temperature": 1}]}]}, "anthropic")
    put(t, {"models": {"m": {"input_per_mtok": 1, "output_per_mtok": 2, "context_tokens": 1000}},
            "agents": [{"name": "a", "models": [{"provider": "openai", "model": "m", "base_url": "${FUZZ_LONG}"}]}]},
        "prices")
    put(t, {"agents": [{"name": "a", "models": [{"provider": "openai", "model": "m", "base_url": "${NOPE}"}]}]},
        "unset-var")
    put(t, {"agents": [{"name": "a", "models": [{"provider": "openai", "model": "m", "base_url": "${FUZZ_EMPTY}"}]}]},
        "empty-var")
    put(t, {"agents": [{"name": "a", "models": [{"provider": "openai", "model": "m", "base_url": "http://${X"}]}]},
        "unterminated-var")
    put(t, {"agents": [{"name": "a", "models": [m]}, {"name": "a", "models": [m]}]}, "duplicate")
    put(t, {"agents": []}, "no-agents")
    put(t, {"tools": {"sleep": {"url": "http://x"}}, "agents": [{"name": "a", "models": [m]}]}, "redefine-builtin")
    put(t, {"tools": {"bad name": {"url": "http://x"}}, "agents": [{"name": "a", "models": [m]}]}, "bad-tool-name")
    put(t, b"[]", "array")
    put(t, b"{", "truncated")


def spec_seeds():
    ex = os.path.join(SPEC, "examples")
    for f in sorted(glob.glob(os.path.join(ex, "*.json"))):
        b = os.path.basename(f)
        data = open(f, "rb").read()
        if b.startswith("response.") or b.startswith("chunk."):
            put("fuzz_openai", data, "spec-" + b[:-5])
        if b.startswith("error."):
            for status in (400, 429, 500):
                put("fuzz_classify", struct.pack(">H", status) + b"\x00" + data, "spec-%d-%s" % (status, b[:-5]))


def handwritten_provider_seeds():
    o = "fuzz_openai"
    put(o, {"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}, "compat")
    put(o, {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"type": "function", "function": {"name": "g", "arguments": {"x": [1, 2]}}},
        {"id": "c3", "type": "function", "function": {"arguments": "{}"}}]}, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 1e300, "completion_tokens": -5, "prompt_tokens_details": None}}, "quirks")
    put(o, {"choices": []}, "no-choices")
    put(o, {"choices": [{"message": "text"}]}, "message-string")
    a = "fuzz_anthropic"
    put(a, {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude", "content": [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 3,
                  "cache_creation_input_tokens": 2}}, "tool-use")
    put(a, {"content": [{"type": "thinking", "thinking": "...", "signature": "x"},
                        {"type": "tool_use", "name": "f", "input": "not an object"},
                        {"type": "tool_use", "name": "g"},
                        {"type": "text"}, {"text": "no type"}], "stop_reason": "end_turn"}, "quirks")
    put(a, {"content": [{"type": "text", "text": "x" * 70000}], "stop_reason": "max_tokens"}, "long-text")
    put(a, {"content": [], "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}, "empty")
    put(a, {"content": "text"}, "content-string")


def classify_seeds():
    c = "fuzz_classify"
    bodies = [
        (429, 0, {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}),
        (429, 0, {"error": {"message": "quota", "type": "insufficient_quota", "code": "insufficient_quota"}}),
        (429, 0, {"error": {"message": "Request too large for m", "type": "tokens", "code": None}}),
        (429, 0, {"type": "error", "error": {"type": "rate_limit_error", "message": "x",
                                             "details": {"error_code": "enforced_spend_limit_reached"}}}),
        (400, 0, {"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}}),
        (400, 0, {"error": {"code": 400, "message": "ctx", "type": "exceed_context_size_error"}}),
        (529, 0, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        (500, 2, {"error": {"message": "boom", "type": "server_error", "code": None}}),
        (404, 0, {"error": {"message": "no model", "type": "invalid_request_error", "code": "model_not_found"}}),
        (401, 1, {"error": "flat string error"}),
        (503, 0, {"message": "vLLM flat shape"}),
        (408, 3, {}),
    ]
    for status, flag, body in bodies:
        put(c, struct.pack(">H", status) + bytes([flag]) + json.dumps(body).encode(), "s%d" % status)
    put(c, struct.pack(">H", 502) + b"\x00<html><body>Bad gateway</body></html>", "html")
    put(c, struct.pack(">H", 429) + b"\x04{\"error\":{}}\x00TrUe", "header-text")
    r = "fuzz_retry_after"
    for ms, s in [("1500", ""), ("", "45"), ("", "1.5"), ("", "Wed, 21 Oct 2015 07:28:00 GMT"),
                  ("", "Fri, 31 Dec 2100 23:59:59 GMT"), ("abc", "xyz"), ("-1", "-1"), ("1e3", ""),
                  ("nan", "inf"), ("", "10 seconds")]:
        put(r, ms.encode() + b"\x00" + s.encode(), "h")


def utf8_seeds():
    u = "fuzz_utf8_clean"
    samples = [b'{"tool":"lookup","args":{"step":1},"idempotency_key":null}', "caf\u00e9 \u65e5\u672c \U0001f600".encode(),
               b"caf\xe9", b"\xff\xfe\x00\x01", b"\xed\xa0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
               b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xc0\xaf", b"\xe6\x97\xa5" * 30, b"a\x00b"]
    for i, body in enumerate(samples):
        for mx in (0, 1, 5, 64, 16384):
            put(u, struct.pack(">H", mx) + body, "s%d-max%d" % (i, mx))


def urlguard_seeds():
    # rules NUL url NUL address bytes; or only a URL (checked against built-in rules)
    rules = b"https://hooks.example.com/longrun, https://*.svc.example.com/cb 10.0.0.0/8, http://127.0.0.1:8080/cb"
    for url, addr in [
            (b"https://hooks.example.com/longrun/x?y=1", b"\x5d\xb8\xd8\x22"),
            (b"https://hooks.example.com.evil.net/longrun", b""),
            (b"https://hooks.example.com@evil.net/longrun", b""),
            (b"https://hooks.example.com/longrun/%2e%2e/admin", b""),
            (b"https://hooks.example.com/longrun%2f..%2fx", b""),
            (b"https://a.svc.example.com/cb", b"\x0a\x01\x02\x03"),
            (b"http://0x7f.1:8080/cb", b"\x7f\x00\x00\x01"),
            (b"http://2130706433/", b""),
            (b"http://[::ffff:169.254.169.254]/", b"\x00" * 10 + b"\xff\xff\xa9\xfe\xa9\xfe"),
            (b"http://[fe80::1%25eth0]/", b"\xfe\x80" + b"\x00" * 13 + b"\x01"),
            (b"HTTPS://HOOKS.example.com:443/%6Congrun/./a/../b", b"\xa9\xfe\xa9\xfe")]:
        put("fuzz_urlguard", rules + b"\x00" + url + b"\x00" + addr, "u")
    put("fuzz_urlguard", b"https://hooks.example.com/longrun", "bare")
    put("fuzz_urlguard", b"https://x/ 10.0.0.0/33\x00https://x/", "badrule")
    put("fuzz_urlguard", b"https://[2001:db8::1]/v6 fd00::/8,http://[::1]:1/\x00https://[2001:db8:0::1]/v6/a\x00"
        + b"\xfd" + b"\x00" * 15, "v6")


def fixture_seeds():
    """Real bodies from the fixture server, for both wire formats."""
    tmp = tempfile.mkdtemp(prefix="lr-seeds-")
    portfile = os.path.join(tmp, "port")
    p = subprocess.Popen(["/usr/bin/python3", os.path.join(ROOT, "tests", "fixtures", "fixture_server.py"),
                          "--port", "0", "--port-file", portfile], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if os.path.exists(portfile) and open(portfile).read().strip():
                break
            time.sleep(0.1)
        base = "http://127.0.0.1:%s" % open(portfile).read().strip()
        tools_oa = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        tools_an = [{"name": "lookup", "input_schema": {"type": "object"}}]

        def call(kind, model, turn_msgs):
            if kind == "openai":
                body = {"model": model, "messages": turn_msgs, "tools": tools_oa}
                url, hdr = base + "/v1/chat/completions", {}
            else:
                body = {"model": model, "messages": turn_msgs, "tools": tools_an, "max_tokens": 100}
                url, hdr = base + "/v1/messages", {"anthropic-version": "2023-06-01"}
            req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                         headers=dict(hdr, **{"Content-Type": "application/json"}))
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        user = [{"role": "user", "content": "q"}]
        for model in ["fixture-steps-2", "fixture-steps-10", "fixture-parallel-3-2", "fixture-bad-args",
                      "fixture-args-object", "fixture-stop-with-tools", "fixture-malformed",
                      "fixture-truncated-json", "fixture-tool:sleep-2"]:
            for kind in ("openai", "anthropic"):
                status, body = call(kind, model, user)
                if 200 <= status < 300:
                    put("fuzz_" + kind, body, "fx-" + model.replace(":", "_"))
        # the final answer of a 2-step conversation
        st, b = call("openai", "fixture-steps-2", user + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_0_0", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_0_0", "content": "ok"}])
        put("fuzz_openai", b, "fx-final")
        st, b = call("anthropic", "fixture-steps-2", user + [
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_0_0", "name": "lookup", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_0_0", "content": "ok"}]}])
        put("fuzz_anthropic", b, "fx-final")
        for model in ["fixture-error-400", "fixture-error-400-context_length_exceeded", "fixture-error-401",
                      "fixture-error-403", "fixture-error-404", "fixture-error-413", "fixture-error-429",
                      "fixture-error-429-insufficient_quota", "fixture-error-429-toolarge",
                      "fixture-error-429-enforced_spend_limit_reached", "fixture-error-500", "fixture-error-502",
                      "fixture-error-503", "fixture-error-529", "fixture-error-502-html", "fixture-unknown"]:
            for kind in ("openai", "anthropic"):
                status, body = call(kind, model, user)
                put("fuzz_classify", struct.pack(">H", status) + b"\x00" + body, "fx-%s-%s" % (kind, model))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(10)


def main():
    task_seeds()
    agents_seeds()
    spec_seeds()
    handwritten_provider_seeds()
    classify_seeds()
    utf8_seeds()
    urlguard_seeds()
    fixture_seeds()
    for d in sorted(os.listdir(CORPUS)):
        print("%-18s %d seeds" % (d, len(os.listdir(os.path.join(CORPUS, d)))))


if __name__ == "__main__":
    sys.exit(main())
