/*
 * state.h - the versioned storage shape of the step log.
 *
 * Executors work on provider-neutral messages (provider.h).  What a step
 * stores in task_steps.messages is that array in the shape of a *state
 * version*, recorded in task_steps.state_version and, as the highest version
 * any of its steps uses, in tasks.state_version.  A worker reads every
 * version up to its own and writes its own; a task whose state is newer than
 * that is handed back (state_version_too_new), never misread.
 *
 *   version 1: the neutral messages as they are.
 *   version 2: tool results carry "output" instead of "content".  Not used in
 *              production: it exists so that the tests can run a worker
 *              "N+1" (LONGRUN_TEST_HOOKS=1 LONGRUN_TEST_STATE_VERSION=2)
 *              against state written by version N, with the data migration
 *              tests/fixtures/state_v2_migration.sql.  A real version 2 would
 *              replace it.
 */
#ifndef LR_STATE_H
#define LR_STATE_H

#include <cjson/cJSON.h>

#define LR_STATE_VERSION 1     /* what this build writes */
#define LR_STATE_VERSION_MAX 2 /* the highest shape this build has a codec for */

/* The version this process writes (and the highest it reads). */
int lr_state_version(void);

/* Test hook: write (and read up to) version v, 1..LR_STATE_VERSION_MAX.
 * Returns 0 or LR_EINVAL. */
int lr_state_set_version(int v);

/* Converts a step's stored messages of version v to neutral messages, in
 * place.  Returns 0, or LR_EINVAL for a version this process cannot read. */
int lr_state_decode(int v, cJSON *messages);

/* Converts neutral messages to the shape of lr_state_version(), in place. */
void lr_state_encode(cJSON *messages);

#endif
