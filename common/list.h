/*
 * list.h - the one intrusive doubly linked list of the project.
 *
 * In the style of libuv's QUEUE and the Linux kernel's list_head: a list is a
 * circular ring of lr_list_t nodes with a sentinel head, and an object that
 * can be on a list embeds an lr_list_t and is recovered from it with
 * lr_list_entry().  Nothing here allocates; the list owns nothing: whoever
 * owns the objects unlinks them before freeing them.  Not thread safe (each
 * list lives on one thread, usually the loop thread).
 *
 *     typedef struct job { lr_list_t link; int n; } job_t;
 *     lr_list_t jobs;
 *     lr_list_init(&jobs);
 *     lr_list_push_back(&jobs, &j->link);
 *     lr_list_foreach_safe(it, next, &jobs) {
 *         job_t *j = lr_list_entry(it, job_t, link);
 *         lr_list_remove(&j->link);   (safe while iterating with _safe)
 *     }
 *
 * A node that is on no list points at itself (lr_list_init on the node, or
 * lr_list_remove), so lr_list_linked() tells whether it is on one and
 * removing twice is harmless.
 */
#ifndef LR_LIST_H
#define LR_LIST_H

#include <stdbool.h>
#include <stddef.h>

typedef struct lr_list {
    struct lr_list *next, *prev;
} lr_list_t;

/* The object of type `type` whose member `member` is the node `node`. */
#define lr_list_entry(node, type, member) ((type *)(void *)((char *)(node)-offsetof(type, member)))

/* Iterates over the nodes of `head`; the loop body must not remove `it`. */
#define lr_list_foreach(it, head) for (lr_list_t *it = (head)->next; it != (head); it = it->next)

/* Iterates over the nodes of `head`; the body may remove (and free) `it`. */
#define lr_list_foreach_safe(it, nx, head) \
    for (lr_list_t *it = (head)->next, *nx = it->next; it != (head); it = nx, nx = it->next)

/* Makes `l` an empty list (or an unlinked node). */
static inline void lr_list_init(lr_list_t *l) { l->next = l->prev = l; }

static inline bool lr_list_empty(const lr_list_t *head) { return head->next == head; }

/* Whether the node is on a list (nodes must have been lr_list_init'ed). */
static inline bool lr_list_linked(const lr_list_t *node) { return node->next != node; }

static inline void lr_list_insert_between(lr_list_t *n, lr_list_t *prev, lr_list_t *next) {
    n->prev = prev;
    n->next = next;
    prev->next = n;
    next->prev = n;
}

static inline void lr_list_push_front(lr_list_t *head, lr_list_t *n) { lr_list_insert_between(n, head, head->next); }

static inline void lr_list_push_back(lr_list_t *head, lr_list_t *n) { lr_list_insert_between(n, head->prev, head); }

/* Unlinks the node and leaves it unlinked (pointing at itself). */
static inline void lr_list_remove(lr_list_t *n) {
    n->prev->next = n->next;
    n->next->prev = n->prev;
    n->next = n->prev = n;
}

/* The first node, or NULL when the list is empty. */
static inline lr_list_t *lr_list_first(const lr_list_t *head) { return head->next == head ? NULL : head->next; }

/* Removes and returns the first node, or NULL when the list is empty. */
static inline lr_list_t *lr_list_pop_front(lr_list_t *head) {
    lr_list_t *n = lr_list_first(head);
    if (n != NULL) {
        lr_list_remove(n);
    }
    return n;
}

/* Moves every node of `from` to the end of `to`; `from` is left empty. */
static inline void lr_list_splice_back(lr_list_t *to, lr_list_t *from) {
    if (lr_list_empty(from)) {
        return;
    }
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    lr_list_init(from);
}

#endif
