/* migrations.h - the schema migrations compiled into every binary (generated
 * from migrations/NNNN_name.sql by common/CMakeLists.txt). */
#ifndef LR_MIGRATIONS_H
#define LR_MIGRATIONS_H

typedef struct lr_migration {
    int version;        /* NNNN */
    const char *name;   /* "0001_init" */
    const char *sha256; /* hex checksum of the file */
    const char *sql;
} lr_migration_t;

extern const lr_migration_t lr_migrations[];
extern const int lr_migrations_count;

/* The highest version this binary knows (0 when none). */
static inline int lr_schema_version_known(void) {
    return lr_migrations_count > 0 ? lr_migrations[lr_migrations_count - 1].version : 0;
}

#endif
