/* TCP_NODELAY on the networked runner's own MQTT socket.
 *
 * Request/reply packets are small: with Nagle's algorithm on, a request written right after the PUBACK of
 * the previous reply waits for the broker's delayed ACK, about 40 ms per sample. Paho C never sets
 * TCP_NODELAY and exposes no socket, so this file, linked into the runner executable only, defines
 * connect(): the dynamic linker resolves Paho's call to it (an executable's symbols come first), it calls
 * the C library's connect() and sets TCP_NODELAY on every IPv4/IPv6 stream socket it connects, which in
 * this process are the broker connections. Setting it while a non-blocking connect is still in progress
 * is allowed; the result and errno of the real call are returned unchanged. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

typedef int (*connect_function)(int, const struct sockaddr *, socklen_t);

static connect_function real_connect;
static pthread_once_t found = PTHREAD_ONCE_INIT;

static void find_real_connect(void)
{
    /* POSIX lets a data pointer carry a function's address (dlsym's contract); ISO C does not say so. */
    void *symbol = dlsym(RTLD_NEXT, "connect");
    *(void **)&real_connect = symbol;
}

int connect(int fd, const struct sockaddr *address, socklen_t length)
{
    int rc, saved, type = 0, one = 1;
    socklen_t type_length = sizeof(type);
    pthread_once(&found, find_real_connect);
    if (real_connect == NULL) {
        errno = ENOSYS;
        return -1;
    }
    rc = real_connect(fd, address, length);
    saved = errno;
    if (address != NULL && (address->sa_family == AF_INET || address->sa_family == AF_INET6) &&
        getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &type_length) == 0 && type == SOCK_STREAM)
        (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    errno = saved;
    return rc;
}
