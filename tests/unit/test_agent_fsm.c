/* test_agent_fsm.c - the agent step's table of legal moves (worker/agent_fsm.c).
 *
 * The expected moves are written out here, independently of the table in
 * agent_fsm.c, and every (from, to) pair is checked against them; then the
 * shape of the machine: every state reachable from IDLE, every state that
 * holds a step able to get back to IDLE (cancel), RELEASED final. */
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#include "agent_fsm.h"
#include "testutil.h"

enum { N = LR_AGENT_NSTATES };

enum {
    IDLE = LR_AGENT_IDLE,
    PREPARING = LR_AGENT_PREPARING,
    CAP_CHECK = LR_AGENT_CAP_CHECK,
    CAP_WAIT = LR_AGENT_CAP_WAIT,
    RESERVING = LR_AGENT_RESERVING,
    RATE_WAIT = LR_AGENT_RATE_WAIT,
    GATE_WAIT = LR_AGENT_GATE_WAIT,
    MEM_WAIT = LR_AGENT_MEM_WAIT,
    CALLING = LR_AGENT_CALLING,
    BACKOFF = LR_AGENT_BACKOFF,
    TOOLS = LR_AGENT_TOOLS,
    RELEASED = LR_AGENT_RELEASED,
};

static const struct move {
    int from, to;
    const char *why;
} legal[] = {
    {IDLE, PREPARING, "start"},
    {IDLE, RELEASED, "release"},
    {PREPARING, CAP_CHECK, "a spend cap applies"},
    {PREPARING, CAP_WAIT, "the ledger's query not queued"},
    {CAP_CHECK, PREPARING, "within every cap"},
    {CAP_CHECK, CAP_WAIT, "ledger unavailable"},
    {CAP_CHECK, IDLE, "over a cap: suspend; cancel"},
    {CAP_WAIT, PREPARING, "ask again"},
    {CAP_WAIT, IDLE, "cancel"},
    {PREPARING, RESERVING, "the model has a rate limit"},
    {PREPARING, GATE_WAIT, "the gate is full"},
    {PREPARING, CALLING, "a slot at once, or no gate"},
    {PREPARING, TOOLS, "approved calls of a resume"},
    {PREPARING, IDLE, "ended before any wait"},
    {RESERVING, PREPARING, "reserved, or limiter down"},
    {RESERVING, RATE_WAIT, "over the limit"},
    {RESERVING, IDLE, "over the limit for long: suspend; cancel"},
    {RATE_WAIT, PREPARING, "next window"},
    {RATE_WAIT, IDLE, "cancel"},
    {PREPARING, MEM_WAIT, "no room in the memory budget"},
    {GATE_WAIT, MEM_WAIT, "slot, but no room"},
    {MEM_WAIT, CALLING, "room granted"},
    {MEM_WAIT, IDLE, "cancel"},
    {GATE_WAIT, CALLING, "slot granted"},
    {GATE_WAIT, IDLE, "no slot in time; cancel"},
    {CALLING, PREPARING, "next model of the chain"},
    {CALLING, BACKOFF, "retryable failure"},
    {CALLING, TOOLS, "tool calls"},
    {CALLING, IDLE, "answered, failed, suspended, cancelled"},
    {BACKOFF, PREPARING, "backoff over"},
    {BACKOFF, IDLE, "cancel"},
    {TOOLS, IDLE, "every call answered; cancel"},
};

static bool expected(int from, int to) {
    for (size_t i = 0; i < sizeof(legal) / sizeof(legal[0]); i++) {
        if (legal[i].from == from && legal[i].to == to) {
            return true;
        }
    }
    return false;
}

static unsigned reachable(int s) { return t_reachable(s, N, lr_agent_transition_ok); }

int main(void) {
    /* every pair, both ways */
    for (int from = 0; from < N; from++) {
        for (int to = 0; to < N; to++) {
            bool want = expected(from, to);
            if (lr_agent_transition_ok(from, to) != want) {
                T_FAIL("%s -> %s: table says %s, expected %s", lr_agent_state_name(from), lr_agent_state_name(to),
                       want ? "illegal" : "legal", want ? "legal" : "illegal");
            }
        }
    }
    /* a state to itself is no move; out of range never legal */
    for (int s = 0; s < N; s++) {
        T_ASSERT(!lr_agent_transition_ok(s, s));
        T_ASSERT(!lr_agent_transition_ok(s, N));
        T_ASSERT(!lr_agent_transition_ok(N, s));
        T_ASSERT(!lr_agent_transition_ok(-1, s));
        T_ASSERT(!lr_agent_transition_ok(s, -1));
    }
    /* names: one per state, distinct; "?" outside */
    for (int s = 0; s < N; s++) {
        const char *a = lr_agent_state_name(s);
        T_ASSERT(a != NULL && strcmp(a, "?") != 0);
        for (int t = s + 1; t < N; t++) {
            T_ASSERT(strcmp(a, lr_agent_state_name(t)) != 0);
        }
    }
    T_EQ_STR(lr_agent_state_name(N), "?");
    T_EQ_STR(lr_agent_state_name(-1), "?");
    T_EQ_STR(lr_agent_state_name(IDLE), "idle");
    T_EQ_STR(lr_agent_state_name(RELEASED), "released");
    /* shape: all reachable from IDLE; every step state can end (IDLE);
     * RELEASED only from IDLE and final */
    T_EQ_INT(reachable(IDLE), (1u << N) - 1);
    for (int s = 0; s < N; s++) {
        if (s != RELEASED) {
            T_ASSERT(reachable(s) & (1u << IDLE));
        }
        if (s != IDLE) {
            T_ASSERT(!lr_agent_transition_ok(s, RELEASED));
        }
        T_ASSERT(!lr_agent_transition_ok(RELEASED, s));
    }
    /* every state with a step in flight can be cancelled (-> IDLE) directly */
    for (int s = PREPARING; s <= TOOLS; s++) {
        T_ASSERT(lr_agent_transition_ok(s, IDLE));
    }
    printf("ok: %zu legal moves of %d states\n", sizeof(legal) / sizeof(legal[0]), N);
    return 0;
}
