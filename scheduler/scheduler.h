/* scheduler.h - longrun-scheduler's entry point (see scheduler.c). */
#ifndef LR_SCHEDULER_H
#define LR_SCHEDULER_H

#include "config.h"

/* Runs until SIGTERM/SIGINT.  Returns the process exit code. */
int lr_scheduler_run(const lr_config_t *cfg);

#endif
