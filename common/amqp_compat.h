/* amqp_compat.h - rabbitmq-c 0.11 (Debian 12) installs <amqp.h>, 0.12+
 * installs <rabbitmq-c/amqp.h>: include the right one in one place. */
#ifndef LR_AMQP_COMPAT_H
#define LR_AMQP_COMPAT_H
#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/ssl_socket.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif
#else
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#endif
#endif
