/* test_list.c - the intrusive list (common/list.h). */
#include <stdio.h>
#include <stdlib.h>

#include "list.h"
#include "testutil.h"

typedef struct item {
    lr_list_t link;
    int n;
} item_t;

static int values(lr_list_t *head, int *out, int max) {
    int k = 0;
    lr_list_foreach(it, head) {
        if (k < max) {
            out[k] = lr_list_entry(it, item_t, link)->n;
        }
        k++;
    }
    return k;
}

int main(void) {
    lr_list_t a, b;
    item_t it[6];
    int v[8];

    lr_list_init(&a);
    lr_list_init(&b);
    T_ASSERT(lr_list_empty(&a));
    T_ASSERT(lr_list_first(&a) == NULL);
    T_ASSERT(lr_list_pop_front(&a) == NULL);
    for (int i = 0; i < 6; i++) {
        it[i].n = i;
        lr_list_init(&it[i].link);
        T_ASSERT(!lr_list_linked(&it[i].link));
    }
    lr_list_push_back(&a, &it[1].link);
    lr_list_push_back(&a, &it[2].link);
    lr_list_push_front(&a, &it[0].link);
    T_EQ_INT(values(&a, v, 8), 3);
    T_EQ_INT(v[0], 0);
    T_EQ_INT(v[1], 1);
    T_EQ_INT(v[2], 2);
    T_ASSERT(lr_list_linked(&it[1].link));

    /* removing while iterating, and removing twice */
    lr_list_foreach_safe(n, nx, &a) {
        if (lr_list_entry(n, item_t, link)->n == 1) {
            lr_list_remove(n);
        }
    }
    lr_list_remove(&it[1].link);
    T_ASSERT(!lr_list_linked(&it[1].link));
    T_EQ_INT(values(&a, v, 8), 2);
    T_EQ_INT(v[1], 2);

    /* splice */
    lr_list_push_back(&b, &it[3].link);
    lr_list_push_back(&b, &it[4].link);
    lr_list_splice_back(&a, &b);
    T_ASSERT(lr_list_empty(&b));
    T_EQ_INT(values(&a, v, 8), 4);
    T_EQ_INT(v[0], 0);
    T_EQ_INT(v[2], 3);
    T_EQ_INT(v[3], 4);
    lr_list_splice_back(&a, &b); /* empty: no change */
    T_EQ_INT(values(&a, v, 8), 4);

    /* pop drains in order */
    for (int i = 0; i < 4; i++) {
        lr_list_t *n = lr_list_pop_front(&a);
        T_ASSERT(n != NULL);
        T_ASSERT(!lr_list_linked(n));
        T_EQ_INT(lr_list_entry(n, item_t, link)->n, i == 0 ? 0 : i == 1 ? 2 : i + 1);
    }
    T_ASSERT(lr_list_empty(&a));
    printf("test_list: ok\n");
    return 0;
}
