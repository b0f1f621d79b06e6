/* test_run.c - a run's life (worker/run.c) on a bare worker struct: the
 * state setter refuses (and logs) a move the table does not have and makes
 * the ones it has; an outcome the table does not allow from the state is
 * logged; a run is freed exactly when it is DONE and its last I/O ended
 * (counted through the on_run_freed hook); lr_run_free_all frees the rest.
 *
 * The log goes to stdout: each check points stdout at a temporary file and
 * reads back what the call logged. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>

#include "core.h"
#include "testutil.h"

static int freed;

static void on_freed(lr_worker_t *w) {
    (void)w;
    freed++;
}

static char logpath[] = "/tmp/test_run_log_XXXXXX";
static int saved_stdout = -1;

/* Starts capturing the log (stdout) into logpath. */
static void capture(void) {
    int fd;
    fflush(stdout);
    saved_stdout = dup(STDOUT_FILENO);
    fd = open(logpath, O_WRONLY | O_TRUNC);
    T_ASSERT(saved_stdout >= 0 && fd >= 0);
    T_ASSERT(dup2(fd, STDOUT_FILENO) == STDOUT_FILENO);
    close(fd);
}

/* Stops capturing; returns what was logged (static buffer). */
static const char *captured(void) {
    static char buf[8192];
    FILE *f;
    size_t n;
    fflush(stdout);
    T_ASSERT(dup2(saved_stdout, STDOUT_FILENO) == STDOUT_FILENO);
    close(saved_stdout);
    f = fopen(logpath, "r");
    T_ASSERT(f != NULL);
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static lr_run_t *new_run(lr_worker_t *w, const char *id) {
    lr_run_t *r = lr_run_new(w, NULL);
    T_ASSERT(r != NULL);
    snprintf(r->id, sizeof(r->id), "%s", id);
    r->log.task_id = r->id;
    return r;
}

int main(void) {
    lr_worker_t *w = calloc(1, sizeof(*w));
    lr_run_t *r;
    const char *log;
    int fd = mkstemp(logpath);
    T_ASSERT(fd >= 0);
    close(fd);
    T_ASSERT(w != NULL);
    w->loop = uv_default_loop();
    lr_list_init(&w->runs);
    lr_list_init(&w->deferred);
    w->on_run_freed = on_freed;
    lr_log_init("worker", "test", LR_LOG_DEBUG, 1);

    /* a refused move: logged, not made */
    r = new_run(w, "00000000-0000-0000-0000-000000000001");
    T_EQ_INT(r->state, LR_RUN_NEW);
    T_EQ_INT(w->nruns, 1);
    capture();
    T_ASSERT(!lr_run_set_state(r, LR_RUN_CHECKPOINTING));
    log = captured();
    T_ASSERT(strstr(log, "\"event\":\"task.bad_state\"") != NULL);
    T_ASSERT(strstr(log, "new -> checkpointing") != NULL);
    T_ASSERT(strstr(log, "00000000-0000-0000-0000-000000000001") != NULL);
    T_EQ_INT(r->state, LR_RUN_NEW);

    /* legal moves are made and traced (debug) */
    capture();
    T_ASSERT(lr_run_set_state(r, LR_RUN_CLAIMING));
    T_ASSERT(lr_run_set_state(r, LR_RUN_CLAIMING)); /* claiming again */
    T_ASSERT(lr_run_set_state(r, LR_RUN_STEPPING));
    T_ASSERT(lr_run_set_state(r, LR_RUN_CHECKPOINTING));
    log = captured();
    T_ASSERT(strstr(log, "task.bad_state") == NULL);
    T_ASSERT(strstr(log, "claiming -> stepping") != NULL);
    T_EQ_INT(r->state, LR_RUN_CHECKPOINTING);

    /* DONE with I/O outstanding: not freed until the I/O ends */
    lr_run_io_begin(r, LR_IO_DB);
    capture();
    lr_run_finish(r, LR_RUN_OUT_FENCED, true);
    log = captured();
    T_ASSERT(strstr(log, "task.bad_outcome") == NULL);
    T_EQ_INT(r->state, LR_RUN_DONE);
    T_EQ_INT(r->outcome, LR_RUN_OUT_FENCED);
    T_EQ_INT(freed, 0);
    T_EQ_INT(w->nruns, 1);
    T_ASSERT(!lr_run_set_state(r, LR_RUN_STEPPING)); /* DONE is final */
    lr_run_io_end(r, LR_IO_DB);
    T_EQ_INT(freed, 0);   /* ending the I/O alone frees nothing... */
    lr_run_maybe_free(r); /* ...the I/O's completion path asks */
    T_EQ_INT(freed, 1);
    T_EQ_INT(w->nruns, 0);

    /* an outcome not allowed from the state is logged (the run still ends) */
    r = new_run(w, "00000000-0000-0000-0000-000000000002");
    T_ASSERT(lr_run_set_state(r, LR_RUN_CLAIMING));
    capture();
    lr_run_finish(r, LR_RUN_OUT_SUCCEEDED, true);
    log = captured();
    T_ASSERT(strstr(log, "\"event\":\"task.bad_outcome\"") != NULL);
    T_ASSERT(strstr(log, "succeeded from state claiming") != NULL);
    T_EQ_INT(freed, 2);

    /* starting the same kind of I/O twice is a bug, logged */
    r = new_run(w, "00000000-0000-0000-0000-000000000003");
    lr_run_io_begin(r, LR_IO_PUBLISH);
    capture();
    lr_run_io_begin(r, LR_IO_PUBLISH);
    log = captured();
    T_ASSERT(strstr(log, "\"event\":\"task.bad_io\"") != NULL);
    lr_run_io_end(r, LR_IO_PUBLISH);

    /* at exit, whatever is left is freed (ASan checks nothing leaks) */
    (void)new_run(w, "00000000-0000-0000-0000-000000000004");
    T_EQ_INT(w->nruns, 2);
    lr_run_free_all(w);
    T_EQ_INT(w->nruns, 0);
    T_ASSERT(lr_list_empty(&w->runs));
    T_EQ_INT(freed, 2); /* free_all does not call the hook */

    unlink(logpath);
    free(w);
    fprintf(stderr, "ok: run life checks passed\n");
    return 0;
}
