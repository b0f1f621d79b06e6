#!/usr/bin/env node
// A longrun producer in Node.js (amqplib): publish N tasks, wait for every outcome.
//
//   LONGRUN_AMQP_URL=amqp://user:pass@host:5672/vhost node producer.js N [options]
//
// What it does, in the order a real producer should do it (docs/task-contract.md):
//
// 1. declares its own reply queue: exclusive to this connection, named
//    <first prefix of LONGRUN_REPLY_TO_PREFIX, default "reply.">node-<random hex> -- workers
//    only publish outcomes to queues with that prefix (a server-named amq.gen-* queue would
//    be refused) -- and starts consuming it *before* publishing anything;
// 2. publishes N tasks to exchange longrun.tasks on a confirm channel with mandatory
//    routing: persistent, messageId = task id = body "id" (the idempotency key: publish the
//    same id again and it is the same task), replyTo = the reply queue, and a correlation id
//    of its own per task. All N are in flight at once; nacked ones are published again with
//    backoff; a task the broker returns (no such queue) is an error;
// 3. waits (at most --timeout seconds) for one outcome per task, matching each by its
//    correlation id and checking that messageId and the body's "id" are that task's id;
// 4. prints one line per task and a summary as its last line, and exits
//    0 every task succeeded, 1 some task ended otherwise (dead, cancelled) or a reply did not
//    match, 2 bad usage or configuration, 3 could not connect or publish,
//    4 timed out with outcomes missing (they stay in PostgreSQL: `longrun status ID`).
'use strict';

const crypto = require('node:crypto');
const { once } = require('node:events');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

const EXCHANGE = 'longrun.tasks';
const PUBLISH_TRIES = 4; // a nack can be transient (a quorum queue changing leader, a full queue draining)

class Exit extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function usage(msg) {
  return new Exit(2, msg);
}

function replyPrefix() {
  const raw = (process.env.LONGRUN_REPLY_TO_PREFIX ?? 'reply.').trim();
  if (raw === 'none') {
    throw usage('LONGRUN_REPLY_TO_PREFIX=none: workers reply only to direct reply-to; this example needs a reply queue prefix');
  }
  const prefix = raw.split(',')[0].trim();
  if (!prefix || prefix.startsWith('longrun.')) {
    throw usage(`LONGRUN_REPLY_TO_PREFIX=${JSON.stringify(raw)}: need a prefix that does not start with longrun.`);
  }
  return prefix;
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        agent: { type: 'string', default: 'example' },
        input: { type: 'string', default: '{"question": "Weather in Oslo?"}' },
        queue: { type: 'string', default: 'default' },
        'max-steps': { type: 'string' },
        timeout: { type: 'string', default: '120' },
      },
    });
  } catch (e) {
    throw usage(`${e.message}\nusage: producer.js N [--agent NAME] [--input JSON] [--queue NAME] [--max-steps N] [--timeout S]`);
  }
  const { values, positionals } = parsed;
  const n = Number(positionals[0]);
  if (positionals.length !== 1 || !Number.isInteger(n) || n < 1 || n > 10000) {
    throw usage(`N must be 1..10000, not ${positionals.join(' ') || 'missing'}`);
  }
  let input;
  try {
    input = JSON.parse(values.input);
  } catch (e) {
    throw usage(`--input is not JSON: ${e.message}`);
  }
  const timeout = Number(values.timeout);
  if (!(timeout > 0)) {
    throw usage(`--timeout must be a positive number of seconds, not ${values.timeout}`);
  }
  let maxSteps;
  if (values['max-steps'] !== undefined) {
    maxSteps = Number(values['max-steps']);
    if (!Number.isInteger(maxSteps)) {
      throw usage(`--max-steps must be an integer, not ${values['max-steps']}`);
    }
  }
  return { n, agent: values.agent, input, queue: values.queue, maxSteps, timeout };
}

// TODO(issue 18 item 2, the task event stream): follow one task live.
// When workers publish task events to the RabbitMQ stream, consume it here from offset
// "first" (the x-stream-offset consumer argument; prefetch required), keep the events whose
// task id is taskId, print them, and stop at the task's outcome. The stream does not exist
// yet, so this does nothing; the reply is the outcome.
async function followEvents(_conn, _taskId) {}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Publishes every task on the confirm channel, all in flight at once, and resolves when the
// broker has acked each one. A nacked task is published again (with the same id, so a copy
// the broker kept after all would run only once). A returned task (mandatory, unroutable) is
// an error: the broker sends basic.return before the ack of the same message, on the same
// channel, so `returned` is complete when the acks are in.
async function publishAll(ch, tasks, returned) {
  let todo = tasks;
  for (let attempt = 0; todo.length > 0; attempt++) {
    if (attempt === PUBLISH_TRIES) {
      throw new Exit(3, `${todo.length} task(s) nacked ${PUBLISH_TRIES} times (queue full?), first ${todo[0].id}`);
    }
    if (attempt > 0) {
      await sleep(250 * 2 ** (attempt - 1));
    }
    const confirms = [];
    for (const t of todo) {
      let settle;
      confirms.push(new Promise((resolve) => (settle = resolve)));
      const body = Buffer.from(JSON.stringify(t.body));
      const ok = ch.publish(EXCHANGE, t.queue, body, t.props, (err) => settle({ t, err }));
      if (!ok) {
        await once(ch, 'drain'); // the socket's buffer is full: wait before publishing more
      }
    }
    const results = await Promise.all(confirms);
    for (const { t } of results) {
      if (returned.has(t.id)) {
        throw new Exit(3, `task ${t.id} came back unroutable: no queue longrun.q.${t.queue} (start a worker with that queue first)`);
      }
    }
    todo = results.filter((r) => r.err).map((r) => r.t);
  }
}

async function main() {
  const opt = options();
  const url = process.env.LONGRUN_AMQP_URL;
  if (!url) {
    throw usage('LONGRUN_AMQP_URL is not set (e.g. amqp://longrun:longrun@127.0.0.1:55672/)');
  }
  const prefix = replyPrefix();
  const t0 = performance.now();

  let conn;
  try {
    conn = await amqp.connect(url);
  } catch (e) {
    throw new Exit(3, `cannot connect to LONGRUN_AMQP_URL: ${e.message}`);
  }
  let connError = null;
  conn.on('error', (e) => {
    connError = e;
  });

  try {
    // 1. The reply queue, consumed before the first publish. Exclusive: only this connection
    // may use it, and the broker deletes it when the connection closes (an outcome that
    // arrives after that is returned to the worker, which logs task.reply_failed; the
    // outcome is still in PostgreSQL).
    const replies = await conn.createChannel();
    const replyQueue = `${prefix}node-${crypto.randomBytes(16).toString('hex')}`;
    await replies.assertQueue(replyQueue, { exclusive: true, durable: false });

    const pending = new Map(); // correlation id -> task id
    const outcome = new Map(); // task id -> status
    let unexpected = 0;
    let allIn;
    const allReplies = new Promise((resolve) => {
      allIn = resolve;
    });

    await replies.consume(
      replyQueue,
      (msg) => {
        if (msg === null) {
          return; // the broker cancelled the consumer
        }
        const corr = msg.properties.correlationId;
        const tid = pending.get(corr);
        if (tid === undefined) {
          unexpected++;
          console.log(`unexpected reply correlation_id=${corr} message_id=${msg.properties.messageId}`);
          return;
        }
        pending.delete(corr);
        let o = {};
        try {
          o = JSON.parse(msg.content.toString('utf8'));
        } catch {
          // counted as a mismatch below
        }
        if (msg.properties.messageId !== tid || o.id !== tid) {
          console.log(`mismatch correlation_id=${corr}: sent task ${tid}, reply says message_id=${msg.properties.messageId} id=${o.id}`);
          outcome.set(tid, 'mismatch');
        } else {
          outcome.set(tid, o.status);
          let line = `reply ${tid} ${o.status} correlation_id=${corr} steps=${o.usage?.steps}`;
          if (o.status !== 'succeeded') {
            line += ` stop_reason=${o.stop_reason} error=${JSON.stringify(o.error)}`;
          }
          console.log(line);
        }
        if (pending.size === 0) {
          allIn();
        }
      },
      { noAck: true },
    );
    console.log(`reply queue ${replyQueue}`);

    // 2. Publish with confirms and mandatory routing.
    const ch = await conn.createConfirmChannel();
    const returned = new Set();
    ch.on('return', (msg) => returned.add(msg.properties.messageId));
    const tasks = [];
    for (let i = 0; i < opt.n; i++) {
      const id = crypto.randomUUID();
      const corr = crypto.randomUUID();
      const body = { id, agent: opt.agent, input: opt.input };
      if (opt.maxSteps !== undefined) {
        body.budgets = { max_steps: opt.maxSteps };
      }
      const props = {
        messageId: id,
        correlationId: corr,
        replyTo: replyQueue,
        persistent: true,
        contentType: 'application/json',
        mandatory: true,
      };
      tasks.push({ id, corr, body, props, queue: opt.queue });
      pending.set(corr, id);
    }
    try {
      await publishAll(ch, tasks, returned);
    } catch (e) {
      if (e instanceof Exit) {
        throw e;
      }
      throw new Exit(3, `publishing failed: ${e.message}`);
    }
    for (const t of tasks) {
      console.log(`published ${t.id} correlation_id=${t.corr}`);
    }
    await followEvents(conn, tasks[0].id);

    // 3. Wait for the outcomes, at most --timeout seconds.
    let timer;
    const timedOut = new Promise((resolve) => {
      timer = setTimeout(resolve, opt.timeout * 1000);
    });
    await Promise.race([allReplies, timedOut]);
    clearTimeout(timer);
    if (connError) {
      console.error(`connection lost while waiting: ${connError.message}`);
    }
    for (const [corr, tid] of pending) {
      console.log(`missing ${tid} correlation_id=${corr} (no outcome within ${opt.timeout} s; see longrun status ${tid})`);
    }

    // 4. The summary, always the last line.
    const statuses = [...outcome.values()];
    const ok = statuses.filter((s) => s === 'succeeded').length;
    const seconds = ((performance.now() - t0) / 1000).toFixed(1);
    console.log(
      `summary: published=${tasks.length} succeeded=${ok} failed=${statuses.length - ok} missing=${pending.size} unexpected=${unexpected} seconds=${seconds}`,
    );
    if (pending.size > 0) {
      return 4;
    }
    return ok === tasks.length && unexpected === 0 ? 0 : 1;
  } finally {
    try {
      await conn.close();
    } catch {
      // already closed
    }
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (e) => {
    console.error(`producer.js: ${e.message}`);
    process.exitCode = e instanceof Exit ? e.code : 3;
  },
);
