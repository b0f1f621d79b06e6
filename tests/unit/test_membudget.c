/* test_membudget.c - the worker's memory budget (worker/membudget.h): calls
 * admitted while they fit, FIFO waits, the oldest call never waiting to
 * grow, wake-ups only from the loop, claims told when room comes back, and
 * the loop closing with nothing left open. */
#include "membudget.h"

#include <uv.h>

#include "testutil.h"

#define KIB 1024u
#define MIB (1024u * 1024u)

static int readies;
static lr_mem_call_t *ready_order[8];
static int rooms;

static void on_ready(lr_mem_call_t *c) { ready_order[readies++] = c; }
static void on_room(void *arg) {
    (void)arg;
    rooms++;
}

static void run_once(uv_loop_t *loop) { uv_run(loop, UV_RUN_NOWAIT); }

int main(void) {
    uv_loop_t loop;
    lr_mem_t m;
    lr_mem_call_t a, b, c;
    const char *source = NULL;

    T_ASSERT(uv_loop_init(&loop) == 0);
    lr_mem_init(&m, &loop, 1 * MIB, on_room, NULL);
    T_EQ_INT(m.estimate, LR_MEM_MIN_RESERVE);

    /* resident charges: room until the budget is reached */
    T_ASSERT(lr_mem_room(&m));
    lr_mem_charge(&m, 900 * KIB);
    T_ASSERT(lr_mem_room(&m));
    /* a call is admitted with the estimate while it fits */
    T_ASSERT(lr_mem_call_begin(&m, &a, on_ready));
    T_EQ_INT(a.state, LR_MEM_CALL_ACTIVE);
    T_EQ_INT(m.used, 900 * KIB + LR_MEM_MIN_RESERVE);
    /* b does not fit (900 + 64 + 64 > 1024 KiB): it waits; c queues behind it */
    T_ASSERT(!lr_mem_call_begin(&m, &b, on_ready));
    T_EQ_INT(b.state, LR_MEM_CALL_STARTING);
    T_ASSERT(!lr_mem_call_begin(&m, &c, on_ready));
    /* a waiting call means no room for claims either */
    T_ASSERT(!lr_mem_room(&m));
    /* a, the oldest call in flight, grows past the budget without waiting */
    T_ASSERT(lr_mem_call_grow(&m, &a, 2 * MIB));
    T_EQ_INT(m.used, 900 * KIB + 2 * MIB);
    T_EQ_INT(m.peak, 900 * KIB + 2 * MIB);
    /* releasing wakes nobody synchronously */
    lr_mem_release(&m, 900 * KIB);
    T_EQ_INT(readies, 0);
    run_once(&loop);
    T_EQ_INT(readies, 0); /* a still holds 2 MiB: nothing fits */
    /* a ends: its peak becomes the estimate; b is admitted from the loop */
    lr_mem_call_end(&m, &a);
    T_EQ_INT(m.estimate, 2 * MIB);
    T_EQ_INT(m.used, 0);
    T_EQ_INT(readies, 0);
    run_once(&loop);
    /* b and c asked for 64 KiB each, both fit */
    T_EQ_INT(readies, 2);
    T_ASSERT(ready_order[0] == &b && ready_order[1] == &c);
    T_EQ_INT(b.state, LR_MEM_CALL_ACTIVE);
    T_EQ_INT(m.used, 2 * LR_MEM_MIN_RESERVE);
    T_EQ_INT(rooms, 1); /* claims were told: room again */
    T_ASSERT(lr_mem_room(&m));

    /* c (not the oldest) cannot grow past the budget: paused */
    T_ASSERT(!lr_mem_call_grow(&m, &c, 1 * MIB));
    T_EQ_INT(c.state, LR_MEM_CALL_PAUSED);
    T_EQ_INT(m.used, 2 * LR_MEM_MIN_RESERVE);
    /* b (the oldest) grows */
    T_ASSERT(lr_mem_call_grow(&m, &b, 512 * KIB));
    /* b ends: c is now the oldest and is granted from the loop, even though
     * 1 MiB plus nothing would fit anyway */
    readies = 0;
    lr_mem_call_end(&m, &b);
    run_once(&loop);
    T_EQ_INT(readies, 1);
    T_ASSERT(ready_order[0] == &c);
    T_EQ_INT(c.state, LR_MEM_CALL_ACTIVE);
    T_EQ_INT(c.charged, 1 * MIB);

    /* the oldest-call rule: c, the only call, grows past the budget */
    T_ASSERT(lr_mem_call_grow(&m, &c, 3 * MIB));
    /* detach keeps the bytes charged and hands them over */
    T_EQ_INT(lr_mem_call_detach(&m, &c), 3 * MIB);
    T_EQ_INT(c.state, LR_MEM_CALL_IDLE);
    T_EQ_INT(m.used, 3 * MIB);
    T_EQ_INT(m.settling, 3 * MIB);
    /* while c's answer waits for its checkpoint (settling), a new call
     * waits even with none in flight: that release will make room */
    readies = 0;
    T_ASSERT(!lr_mem_call_begin(&m, &a, on_ready));
    T_EQ_INT(a.state, LR_MEM_CALL_STARTING);
    lr_mem_settled(&m, 3 * MIB);
    lr_mem_charge(&m, 1 * MIB);  /* c's checkpoint is written: 1 MiB of state stays */
    lr_mem_release(&m, 3 * MIB); /* and its answer's charge goes */
    run_once(&loop);
    /* over the budget still (1 MiB of 1 MiB), but nothing else would make
     * room: a is admitted, with c's peak as its reservation */
    T_EQ_INT(readies, 1);
    T_EQ_INT(a.state, LR_MEM_CALL_ACTIVE);
    T_EQ_INT(a.charged, 3 * MIB);
    /* the oldest call grows past the budget when nothing is settling... */
    T_ASSERT(lr_mem_call_grow(&m, &a, 4 * MIB));
    T_ASSERT(lr_mem_call_begin(&m, &b, on_ready) == false);
    /* ...but not while another answer settles */
    T_EQ_INT(lr_mem_call_detach(&m, &a), 4 * MIB);
    run_once(&loop); /* b: not admitted (a settles) */
    T_EQ_INT(b.state, LR_MEM_CALL_STARTING);
    lr_mem_call_end(&m, &b);
    T_ASSERT(lr_mem_call_begin(&m, &c, on_ready) == false);
    lr_mem_call_end(&m, &c);
    lr_mem_settled(&m, 4 * MIB);
    lr_mem_release(&m, 5 * MIB);
    T_EQ_INT(m.used, 0);
    /* ending an idle call and a queued call */
    lr_mem_call_end(&m, &a);
    T_ASSERT(lr_mem_call_begin(&m, &a, on_ready));
    lr_mem_charge(&m, 2 * MIB);
    T_ASSERT(!lr_mem_call_begin(&m, &b, on_ready));
    lr_mem_call_end(&m, &b);
    T_EQ_INT(b.state, LR_MEM_CALL_IDLE);
    lr_mem_call_end(&m, &a);
    lr_mem_release(&m, 2 * MIB);
    T_EQ_INT(m.used, 0);

    /* no budget: everything fits */
    lr_mem_t none;
    uv_close((uv_handle_t *)&m.wake, NULL);
    lr_mem_init(&none, &loop, 0, NULL, NULL);
    lr_mem_charge(&none, 100u * 1024u * MIB);
    T_ASSERT(lr_mem_room(&none));
    T_ASSERT(lr_mem_call_begin(&none, &a, on_ready));
    T_ASSERT(lr_mem_call_begin(&none, &b, on_ready));
    T_ASSERT(lr_mem_call_grow(&none, &b, 500 * MIB));
    lr_mem_call_end(&none, &a);
    lr_mem_call_end(&none, &b);
    uv_close((uv_handle_t *)&none.wake, NULL);

    /* the default budget is derived from a limit, or none */
    (void)lr_mem_default_budget(&source);
    T_ASSERT(strcmp(source, "cgroup") == 0 || strcmp(source, "rlimit") == 0 || strcmp(source, "none") == 0);

    /* the loop closes with nothing left open */
    T_EQ_INT(uv_run(&loop, UV_RUN_DEFAULT), 0);
    T_EQ_INT(uv_loop_close(&loop), 0);
    printf("membudget: ok\n");
    return 0;
}
