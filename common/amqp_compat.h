/* amqp_compat.h - rabbitmq-c 0.11 (Debian 12) installs <amqp.h>, 0.12+
 * installs <rabbitmq-c/amqp.h>: include the right one in one place.
 *
 * 0.11's <amqp.h> has the same name as our common/amqp.h, and common/ is on
 * the include path, so a plain #include <amqp.h> (here, and inside 0.11's own
 * amqp_ssl_socket.h) finds *our* header.  #include_next skips past common/ to
 * the library's header; the library's later #include <amqp.h> lines then hit
 * our include guard harmlessly.  #include_next continues the search after the
 * directory this file was found in, so amqp.h must include this file as
 * <amqp_compat.h> (found through the include path), not "amqp_compat.h". */
#ifndef LR_AMQP_COMPAT_H
#define LR_AMQP_COMPAT_H
#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/ssl_socket.h>
#include <rabbitmq-c/tcp_socket.h>
#define LR_AMQP_COMPAT_DONE 1
#endif
#endif
#ifndef LR_AMQP_COMPAT_DONE
#include_next <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif
#endif
