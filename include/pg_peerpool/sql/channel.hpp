// The backend end of the request channel: submit a request to the pool manager through this
// backend's request slot and read the response stream. PostgreSQL-style code: these raise
// ERROR (no C++ objects may be alive in the calling frames; call them inside pg::Call).
// If the caller's transaction or subtransaction aborts, or the backend exits, the request is
// abandoned: the pool manager cancels its remote queries.
#pragma once

extern "C" {
#include "postgres.h"
}

namespace peerpool::channel {

void Submit(const char *message, Size len);
// The next response message; valid until the next call.
void Receive(Size *len, const char **data);
// The response was read to its end.
void Finish();

} // namespace peerpool::channel
