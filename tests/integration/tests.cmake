# Integration tests: real PostgreSQL and RabbitMQ (scripts/dev test starts them).
# Label "asan": also run against the sanitizer build.
lr_py_test(integration.cli_basics integration/test_cli_basics.py TIMEOUT 180 LABELS "integration;asan")
lr_py_test(integration.worker_run integration/test_worker_run.py TIMEOUT 600 LABELS "integration;asan")
lr_py_test(integration.agent integration/test_agent.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.agent_resilience integration/test_agent_resilience.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.operator integration/test_operator.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.health integration/test_health.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.docs integration/test_docs.py TIMEOUT 60 LABELS "unit")
lr_py_test(integration.agents_file integration/test_agents_file.py TIMEOUT 60 LABELS "unit;asan")
lr_py_test(integration.ratelimit integration/test_ratelimit.py TIMEOUT 300 LABELS "integration")
# Issue 9: a short libFuzzer run (tests/fuzz/run.sh 2); skipped without clang + libFuzzer.
lr_py_test(fuzz.smoke integration/test_fuzz_smoke.py TIMEOUT 300 LABELS "fuzz")
lr_py_test(integration.state_version integration/test_state_version.py TIMEOUT 120 LABELS "integration;asan")
lr_py_test(integration.rolling_deploy integration/test_rolling_deploy.py TIMEOUT 300 LABELS "integration")
lr_py_test(integration.tenants integration/test_tenants.py TIMEOUT 300 LABELS "integration")
# Issue 8: kustomize renderings validated offline (schemas, policy, references): no servers.
lr_py_test(k8s.validate k8s/test_validate.py TIMEOUT 120 LABELS "k8s")
# Issue 8: the container image (buildah, daemonless); opt-in with LONGRUN_IMAGE_TEST=1, else skipped (77).
lr_py_test(k8s.image k8s/test_image.py TIMEOUT 1200 LABELS "image" SERIAL)
# Issue 3 (durable core) and issue 5 (scheduler): failure semantics with real servers.
lr_py_test(integration.malformed integration/test_malformed.py TIMEOUT 120 LABELS "integration;asan")
lr_py_test(integration.reply_to integration/test_reply_to.py TIMEOUT 120 LABELS "integration;asan")
lr_py_test(integration.fencing integration/test_fencing.py TIMEOUT 180 LABELS "integration")
lr_py_test(integration.sigterm integration/test_sigterm.py TIMEOUT 240 LABELS "integration")
# Issue 16 (1): 30 drains of one task: hand-backs do not spend the delivery limit.
lr_py_test(integration.drains integration/test_drains.py TIMEOUT 300 LABELS "integration")
# Issue 16 (3): PostgreSQL backends killed during a run: exactly one reply per task.
lr_py_test(integration.pg_kills integration/test_pg_kills.py TIMEOUT 300 LABELS "integration;asan")
# Issue 16 (5): a worker frozen past its lease starts no tool call with its stale epoch.
lr_py_test(integration.zombie integration/test_zombie.py TIMEOUT 180 LABELS "integration;asan")
lr_py_test(integration.chaos_kill integration/test_chaos_kill.py TIMEOUT 300 LABELS "integration")
lr_py_test(integration.crash_loop integration/test_crash_loop.py TIMEOUT 180 LABELS "integration")
lr_py_test(integration.scheduler integration/test_scheduler.py TIMEOUT 400 LABELS "integration")
# Restarts the shared RabbitMQ and PostgreSQL (needs LONGRUN_HOME): nothing else may run meanwhile.
lr_py_test(integration.restarts integration/test_restarts.py TIMEOUT 400 LABELS "integration" SERIAL)
lr_py_test(integration.eval integration/test_eval.py TIMEOUT 180 LABELS "integration;asan")
lr_py_test(integration.no_progress integration/test_no_progress.py TIMEOUT 120 LABELS "integration")
lr_py_test(integration.reliability integration/test_reliability.py TIMEOUT 400 LABELS "integration;reliability")
# Issue 15: secrets masked everywhere (item 3); the health server under a flood (item 4).
lr_py_test(integration.secrets integration/test_secrets.py TIMEOUT 240 LABELS "integration;asan")
lr_py_test(integration.health_flood integration/test_health_flood.py TIMEOUT 180 LABELS "integration;asan")
# Issue 15 item 1: callback_url allow rules and the connect-time address check (SSRF).
lr_py_test(integration.callback_guard integration/test_callback_guard.py TIMEOUT 180 LABELS "integration;asan")
# Issue 15 item 1: model and tool connections checked at connect time (LONGRUN_EGRESS_ALLOW).
lr_py_test(integration.egress integration/test_egress.py TIMEOUT 120 LABELS "integration;asan")
# Issue 15: plain text refused across a network (item 5); reply_to only to allowed queues (item 2).
lr_py_test(integration.plaintext integration/test_plaintext.py TIMEOUT 180 LABELS "integration;asan")
lr_py_test(integration.reply_policy integration/test_reply_policy.py TIMEOUT 180 LABELS "integration;asan")
# Issue 16: the durability self-check (item 9), the outbox under a backlog (item 2), backpressure (item 6).
lr_py_test(integration.durability_check integration/test_durability_check.py TIMEOUT 120 LABELS "integration;asan")
lr_py_test(integration.outbox_backlog integration/test_outbox_backlog.py TIMEOUT 300 LABELS "integration")
lr_py_test(integration.backpressure integration/test_backpressure.py TIMEOUT 180 LABELS "integration;asan")
# Issue 16 item 8: readiness that means ready (auth storms, every model circuit open).
lr_py_test(integration.readiness integration/test_readiness.py TIMEOUT 180 LABELS "integration;asan")
# Issue 16 (7): a provider outage parks tasks (provider_unavailable) instead of burning attempts.
lr_py_test(integration.provider_outage integration/test_provider_outage.py TIMEOUT 240 LABELS "integration;asan")
# Issue 16 (4): a memory budget under 500 x 4 MiB answers in half the address space; response_too_large.
lr_py_test(integration.memory integration/test_memory.py TIMEOUT 900 LABELS "integration;asan")
lr_py_test(integration.budgets integration/test_budgets.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.fallback integration/test_fallback.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.tool_retries integration/test_tool_retries.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.context integration/test_context.py TIMEOUT 300 LABELS "integration;asan")
# Issue 17 (3): tokens per minute over any 60-second window (sliding log), two workers, tasks parked and resumed.
lr_py_test(integration.tpm_window integration/test_tpm_window.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.wait integration/test_wait.py TIMEOUT 300 LABELS "integration;asan")
lr_py_test(integration.events integration/test_events.py TIMEOUT 400 LABELS "integration;asan")
lr_py_test(integration.dlq_backoff integration/test_dlq_backoff.py TIMEOUT 120 LABELS "integration;asan")
# Issue 17 (4): immediate cancellation: in-flight tool and model calls aborted, --after-step, the claim.
lr_py_test(integration.cancel integration/test_cancel.py TIMEOUT 300 LABELS "integration;asan")
# Issue 18 (5): the example producers in three languages, each run against a fleet.
lr_py_test(integration.producer_python integration/test_producer_python.py TIMEOUT 180 LABELS "integration")
lr_py_test(integration.producer_node integration/test_producer_node.py TIMEOUT 180 LABELS "integration")
lr_py_test(integration.producer_go integration/test_producer_go.py TIMEOUT 240 LABELS "integration")
# Issue 18 (6): the example tool server: a worker killed mid-call, the re-run step reuses the stored result.
lr_py_test(integration.example_tool integration/test_example_tool.py TIMEOUT 180 LABELS "integration")
lr_py_test(integration.providers integration/test_providers.py TIMEOUT 180 LABELS "integration;asan")
# Issue 19 (3): payload logs redacted (e-mail, keys, cards, custom patterns), checked against a control worker.
lr_py_test(integration.redaction integration/test_redaction.py TIMEOUT 180 LABELS "integration;asan")
lr_py_test(integration.mcp integration/test_mcp.py TIMEOUT 300 LABELS "integration;asan")
# Issue 19 (4): spend caps per agent and tenant, fleet-wide: 200 tasks across two workers against a daily cap.
lr_py_test(integration.spend_caps integration/test_spend_caps.py TIMEOUT 400 LABELS "integration;asan")
