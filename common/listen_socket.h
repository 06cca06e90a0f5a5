// A TCP socket bound to one address of this host (not every interface), for servers that must
// listen only where they were told to: the worker's gang rendezvous store (--gang-host). No
// torch here.
//
// Threading: free functions, thread-safe.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace mq {

// A listening TCP socket (SO_REUSEADDR, close-on-exec) bound to `host`:`port`, `host` being an
// IPv4 or IPv6 literal or a name resolved to one of this host's addresses (the first one that
// binds); `port` 0 picks a free port. Returns the descriptor, owned by the caller. INVALID_ARGUMENT
// naming the host when it does not resolve or is a wildcard (0.0.0.0, ::); UNAVAILABLE naming
// host and port when no resolved address can be bound (not one of this host's, or in use).
absl::StatusOr<int> ListenOn(const std::string& host, int port);

// The port a socket is bound to (getsockname); INTERNAL when it cannot be read.
absl::StatusOr<int> BoundPort(int fd);

}  // namespace mq
