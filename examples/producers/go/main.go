// A longrun producer in Go (amqp091-go): publish N tasks, wait for every outcome.
//
//	LONGRUN_AMQP_URL=amqp://user:pass@host:5672/vhost ./producer N [options]
//
// What it does, in the order a real producer should do it (docs/task-contract.md):
//
//  1. declares its own reply queue: exclusive to this connection, named
//     <first prefix of LONGRUN_REPLY_TO_PREFIX, default "reply.">go-<random hex> -- workers
//     only publish outcomes to queues with that prefix (a server-named amq.gen-* queue would
//     be refused) -- and starts consuming it before publishing anything;
//  2. publishes N tasks to exchange longrun.tasks on a channel in confirm mode with mandatory
//     routing: persistent, MessageId = task id = body "id" (the idempotency key: publish the
//     same id again and it is the same task), ReplyTo = the reply queue, and a correlation id
//     of its own per task. All N are in flight at once; nacked ones are published again with
//     backoff; a task the broker returns (no such queue) is an error;
//  3. waits (at most -timeout seconds) for one outcome per task, matching each by its
//     correlation id and checking that MessageId and the body's "id" are that task's id;
//  4. prints one line per task and a summary as its last line, and exits
//     0 every task succeeded, 1 some task ended otherwise (dead, cancelled) or a reply did not
//     match, 2 bad usage or configuration, 3 could not connect or publish,
//     4 timed out with outcomes missing (they stay in PostgreSQL: `longrun status ID`).
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const (
	exchange     = "longrun.tasks"
	publishTries = 4 // a nack can be transient (a quorum queue changing leader, a full queue draining)
	confirmWait  = 30 * time.Second
)

// exitError carries the process exit code with its message.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func fail(code int, format string, a ...interface{}) error {
	return &exitError{code, fmt.Sprintf(format, a...)}
}

type options struct {
	n        int
	agent    string
	input    json.RawMessage
	queue    string
	maxSteps int
	timeout  time.Duration
}

// parseOptions accepts flags before and after N (Go's flag package stops at the first
// argument that is not a flag, so parsing resumes after each one).
func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("producer", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	agent := fs.String("agent", "example", "agent name (default: example, from examples/agents.json)")
	input := fs.String("input", `{"question": "Weather in Oslo?"}`, "task input, JSON")
	queue := fs.String("queue", "default", "task queue short name, the routing key")
	maxSteps := fs.Int("max-steps", 0, "budgets.max_steps of each task (0: not set)")
	timeout := fs.Float64("timeout", 120, "seconds to wait for all outcomes")
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return o, fail(2, "%v\nusage: producer N [-agent NAME] [-input JSON] [-queue NAME] [-max-steps N] [-timeout S]", err)
		}
		if fs.NArg() == 0 {
			break
		}
		positional = append(positional, fs.Arg(0))
		args = fs.Args()[1:]
	}
	if len(positional) != 1 {
		return o, fail(2, "N must be 1..10000, not %q", strings.Join(positional, " "))
	}
	n, err := strconv.Atoi(positional[0])
	if err != nil || n < 1 || n > 10000 {
		return o, fail(2, "N must be 1..10000, not %s", positional[0])
	}
	if !json.Valid([]byte(*input)) {
		return o, fail(2, "-input is not JSON: %s", *input)
	}
	if !(*timeout > 0) {
		return o, fail(2, "-timeout must be a positive number of seconds, not %v", *timeout)
	}
	o = options{n: n, agent: *agent, input: json.RawMessage(*input), queue: *queue, maxSteps: *maxSteps,
		timeout: time.Duration(*timeout * float64(time.Second))}
	return o, nil
}

func replyPrefix() (string, error) {
	raw, set := os.LookupEnv("LONGRUN_REPLY_TO_PREFIX")
	raw = strings.TrimSpace(raw)
	if !set {
		raw = "reply."
	}
	if raw == "none" {
		return "", fail(2, "LONGRUN_REPLY_TO_PREFIX=none: workers reply only to direct reply-to; this example needs a reply queue prefix")
	}
	prefix := strings.TrimSpace(strings.Split(raw, ",")[0])
	if prefix == "" || strings.HasPrefix(prefix, "longrun.") {
		return "", fail(2, "LONGRUN_REPLY_TO_PREFIX=%q: need a prefix that does not start with longrun.", raw)
	}
	return prefix, nil
}

// uuid4 returns a random (version 4) UUID; the standard library has none.
func uuid4() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

type task struct {
	id, corr string
	body     []byte
}

// The outcome message's body (docs/task-contract.md, "reply_to").
type outcome struct {
	ID         string          `json:"id"`
	Status     string          `json:"status"`
	Result     json.RawMessage `json:"result"`
	Error      *string         `json:"error"`
	StopReason *string         `json:"stop_reason"`
	Usage      struct {
		Steps int `json:"steps"`
	} `json:"usage"`
}

// publishAll publishes every task with all of them in flight, then waits for each confirm.
// Nacked tasks are published again with backoff. A returned task (mandatory, unroutable) is
// an error: the broker sends basic.return before the ack of the same message on the same
// channel, and the library hands it to the buffered returns channel before it confirms, so
// the returns are all there once the acks are.
func publishAll(ch *amqp.Channel, tasks []task, queue, replyQueue string, returns <-chan amqp.Return) error {
	todo := tasks
	for attempt := 0; len(todo) > 0; attempt++ {
		if attempt == publishTries {
			return fail(3, "%d task(s) nacked %d times (queue full?), first %s", len(todo), publishTries, todo[0].id)
		}
		if attempt > 0 {
			time.Sleep(250 * time.Millisecond << (attempt - 1))
		}
		ctx, cancel := context.WithTimeout(context.Background(), confirmWait)
		confirms := make([]*amqp.DeferredConfirmation, len(todo))
		for i, t := range todo {
			dc, err := ch.PublishWithDeferredConfirmWithContext(ctx, exchange, queue, true, false, amqp.Publishing{
				MessageId:     t.id,
				CorrelationId: t.corr,
				ReplyTo:       replyQueue,
				DeliveryMode:  amqp.Persistent,
				ContentType:   "application/json",
				Body:          t.body,
			})
			if err != nil {
				cancel()
				return fail(3, "publishing task %s failed: %v", t.id, err)
			}
			confirms[i] = dc
		}
		var nacked []task
		for i, dc := range confirms {
			if !dc.Wait() {
				if ctx.Err() != nil {
					cancel()
					return fail(3, "no confirm for task %s within %v", todo[i].id, confirmWait)
				}
				nacked = append(nacked, todo[i])
			}
		}
		cancel()
		select {
		case r := <-returns:
			return fail(3, "task %s came back unroutable: no queue longrun.q.%s (start a worker with that queue first); %s",
				r.MessageId, queue, r.ReplyText)
		default:
		}
		todo = nacked
	}
	return nil
}

// TODO(issue 18 item 2, the task event stream): follow one task live.
// When workers publish task events to the RabbitMQ stream, consume it here from offset
// "first" (the x-stream-offset consumer argument; Qos required), keep the events whose task
// id is taskID, print them, and stop at the task's outcome. The stream does not exist yet, so
// this does nothing; the reply is the outcome.
func followEvents(_ *amqp.Connection, _ string) {}

func run() (int, error) {
	opt, err := parseOptions(os.Args[1:])
	if err != nil {
		return 0, err
	}
	url := os.Getenv("LONGRUN_AMQP_URL")
	if url == "" {
		return 0, fail(2, "LONGRUN_AMQP_URL is not set (e.g. amqp://longrun:longrun@127.0.0.1:55672/)")
	}
	prefix, err := replyPrefix()
	if err != nil {
		return 0, err
	}
	t0 := time.Now()

	conn, err := amqp.Dial(url)
	if err != nil {
		return 0, fail(3, "cannot connect to LONGRUN_AMQP_URL: %v", err)
	}
	defer conn.Close()

	// 1. The reply queue, consumed before the first publish. Exclusive: only this connection
	// may use it, and the broker deletes it when the connection closes (an outcome that
	// arrives after that is returned to the worker, which logs task.reply_failed; the outcome
	// is still in PostgreSQL).
	replies, err := conn.Channel()
	if err != nil {
		return 0, fail(3, "opening a channel: %v", err)
	}
	var rnd [16]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return 0, fail(3, "random: %v", err)
	}
	replyQueue := prefix + "go-" + hex.EncodeToString(rnd[:])
	if _, err := replies.QueueDeclare(replyQueue, false, false, true, false, nil); err != nil {
		return 0, fail(3, "declaring the reply queue %s: %v", replyQueue, err)
	}
	deliveries, err := replies.Consume(replyQueue, "", true, true, false, false, nil)
	if err != nil {
		return 0, fail(3, "consuming the reply queue %s: %v", replyQueue, err)
	}
	fmt.Printf("reply queue %s\n", replyQueue)

	// 2. Publish with confirms and mandatory routing.
	ch, err := conn.Channel()
	if err != nil {
		return 0, fail(3, "opening a channel: %v", err)
	}
	if err := ch.Confirm(false); err != nil {
		return 0, fail(3, "confirm mode: %v", err)
	}
	returns := ch.NotifyReturn(make(chan amqp.Return, opt.n+1))
	pending := make(map[string]string, opt.n) // correlation id -> task id
	tasks := make([]task, 0, opt.n)
	for i := 0; i < opt.n; i++ {
		body := map[string]interface{}{"agent": opt.agent, "input": opt.input}
		id := uuid4()
		body["id"] = id
		if opt.maxSteps != 0 {
			body["budgets"] = map[string]int{"max_steps": opt.maxSteps}
		}
		b, err := json.Marshal(body)
		if err != nil {
			return 0, fail(2, "encoding the task: %v", err)
		}
		t := task{id: id, corr: uuid4(), body: b}
		tasks = append(tasks, t)
		pending[t.corr] = t.id
	}
	if err := publishAll(ch, tasks, opt.queue, replyQueue, returns); err != nil {
		return 0, err
	}
	for _, t := range tasks {
		fmt.Printf("published %s correlation_id=%s\n", t.id, t.corr)
	}
	followEvents(conn, tasks[0].id)

	// 3. Wait for the outcomes, at most -timeout seconds.
	outcomes := make(map[string]string, opt.n) // task id -> status
	unexpected := 0
	deadline := time.NewTimer(opt.timeout)
	defer deadline.Stop()
wait:
	for len(pending) > 0 {
		select {
		case d, ok := <-deliveries:
			if !ok {
				fmt.Fprintln(os.Stderr, "connection lost while waiting")
				break wait
			}
			tid, known := pending[d.CorrelationId]
			if !known {
				unexpected++
				fmt.Printf("unexpected reply correlation_id=%s message_id=%s\n", d.CorrelationId, d.MessageId)
				continue
			}
			delete(pending, d.CorrelationId)
			var o outcome
			if err := json.Unmarshal(d.Body, &o); err != nil || d.MessageId != tid || o.ID != tid {
				fmt.Printf("mismatch correlation_id=%s: sent task %s, reply says message_id=%s id=%s\n",
					d.CorrelationId, tid, d.MessageId, o.ID)
				outcomes[tid] = "mismatch"
				continue
			}
			outcomes[tid] = o.Status
			line := fmt.Sprintf("reply %s %s correlation_id=%s steps=%d", tid, o.Status, d.CorrelationId, o.Usage.Steps)
			if o.Status != "succeeded" {
				stop, _ := json.Marshal(o.StopReason)
				msg, _ := json.Marshal(o.Error)
				line += fmt.Sprintf(" stop_reason=%s error=%s", strings.Trim(string(stop), `"`), msg)
			}
			fmt.Println(line)
		case <-deadline.C:
			break wait
		}
	}
	for corr, tid := range pending {
		fmt.Printf("missing %s correlation_id=%s (no outcome within %v; see longrun status %s)\n", tid, corr, opt.timeout, tid)
	}

	// 4. The summary, always the last line.
	ok := 0
	for _, s := range outcomes {
		if s == "succeeded" {
			ok++
		}
	}
	fmt.Printf("summary: published=%d succeeded=%d failed=%d missing=%d unexpected=%d seconds=%.1f\n",
		len(tasks), ok, len(outcomes)-ok, len(pending), unexpected, time.Since(t0).Seconds())
	if len(pending) > 0 {
		return 4, nil
	}
	if ok == len(tasks) && unexpected == 0 {
		return 0, nil
	}
	return 1, nil
}

func main() {
	code, err := run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "producer: %v\n", err)
		var e *exitError
		if errors.As(err, &e) {
			os.Exit(e.code)
		}
		os.Exit(3)
	}
	os.Exit(code)
}
