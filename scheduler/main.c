/* main.c - longrun-scheduler: options, configuration, then lr_scheduler_run
 * (the shared part is lr_daemon_main, common/daemon.h). */
#include "daemon.h"
#include "scheduler.h"

static int run(const lr_config_t *cfg, void *arg) {
    (void)arg;
    return lr_scheduler_run(cfg);
}

int main(int argc, char **argv) {
    static const lr_daemon_main_t m = {
        .prog = "longrun-scheduler",
        .synopsis = "[options]",
        .about = "Resumes suspended and retry_wait tasks when due, republishes tasks whose worker\n"
                 "died (expired lease) or whose dispatch was never confirmed (outbox), dead-letters\n"
                 "tasks past their deadline, records the longrun.dead queue in PostgreSQL and deletes\n"
                 "finished tasks past retention.  Run two or more: one leads (PostgreSQL advisory\n"
                 "lock), the others stand by and take over within seconds.\n",
        .run = run,
    };
    return lr_daemon_main(&m, argc, argv);
}
