#!/usr/bin/env python3
"""Prints N example task bodies, one JSON object per line, for `longrun enqueue`.

The mix: mostly the example agent (a scripted model on the fixture server that
calls tools, then answers), plus deterministic `http-steps` tasks when the
agent runtime is not configured.
"""
import json
import os
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
agents_file = os.environ.get("LONGRUN_AGENTS_FILE", "")
use_agent = bool(agents_file) and os.path.exists(agents_file) and os.environ.get("DEMO_KIND", "agent") == "agent"
for i in range(n):
    if use_agent and i % 5 != 4:
        body = {"agent": "example", "input": {"question": f"What is the weather in city #{i}?"},
                "budgets": {"max_steps": 10}, "metadata": {"demo": True, "n": i}}
    else:
        body = {"agent": "http-steps", "input": {"steps": 5 + i % 6}, "metadata": {"demo": True, "n": i}}
    print(json.dumps(body))
