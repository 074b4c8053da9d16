/*
 * LD_PRELOAD shim for TAP tests: a name server that is slow for one name.
 *
 * getaddrinfo("slow.peerpool.test") sleeps SLOW_DNS_SECONDS (default 3) and then answers
 * 127.0.0.1; "fast.peerpool.test" answers 127.0.0.1 at once; every other name goes to the
 * real getaddrinfo. Lets a test see whether a slow resolver stalls anything but the node
 * that needs it, without touching /etc/hosts or a real DNS server.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

int
getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
			struct addrinfo **res)
{
	gai_fn real = (gai_fn) dlsym(RTLD_NEXT, "getaddrinfo");

	if (node != NULL && strcmp(node, "slow.peerpool.test") == 0)
	{
		const char *s = getenv("SLOW_DNS_SECONDS");

		sleep(s ? (unsigned) atoi(s) : 3);
		node = "127.0.0.1";
	}
	else if (node != NULL && strcmp(node, "fast.peerpool.test") == 0)
		node = "127.0.0.1";
	return real(node, service, hints, res);
}
