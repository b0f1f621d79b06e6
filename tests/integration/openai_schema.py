"""The official OpenAI request schema (tests/fixtures/openai-spec), as a
jsonschema validator: every request body the worker sends in the tests must
validate against CreateChatCompletionRequest."""
import json
import os

import harness as h

SPEC = os.environ.get("OPENAI_SPEC_DIR") or os.path.join(h.SOURCE, "tests", "fixtures", "openai-spec")


def request_validator():
    """jsonschema validator for CreateChatCompletionRequest (resolving the
    schema files' relative $ids from a local store)."""
    import jsonschema
    path = os.path.join(SPEC, "CreateChatCompletionRequest.schema.json")
    if not os.path.exists(path):
        h.skip("OpenAI schemas not found in %s" % SPEC)
    store = {}
    for f in os.listdir(SPEC):
        if f.endswith(".json") and not f.startswith("examples"):
            try:
                doc = json.load(open(os.path.join(SPEC, f)))
            except ValueError:
                continue
            uri = "file://%s/%s" % (SPEC, f)
            store[uri] = doc
            if isinstance(doc, dict) and "$id" in doc:
                store[doc["$id"]] = doc
    schema = json.load(open(path))
    schema["$id"] = "file://%s/CreateChatCompletionRequest.schema.json" % SPEC
    resolver = jsonschema.RefResolver(base_uri=schema["$id"], referrer=schema, store=store)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, resolver=resolver)


def check_requests(env, what):
    """Validates every OpenAI request the fixture recorded; returns how many."""
    v = request_validator()
    reqs = env.fixture_requests("/v1/chat/completions")
    for r in reqs:
        errs = list(v.iter_errors(r["body"]))
        h.check(not errs, "%s: request invalid against CreateChatCompletionRequest: %s\n%s" % (
            what, errs[0].message if errs else "", json.dumps(r["body"])[:800]))
    return len(reqs)
