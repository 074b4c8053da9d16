// Encoding of the request message (see include/pg_peerpool/pool/protocol.hpp).
#include "pg_peerpool/pool/protocol.hpp"

namespace peerpool::protocol {

std::string EncodeRequest(const Request &r)
{
    Writer w;
    w.U8(r.kind).I32(r.timeout_ms).I32(r.acquire_timeout_ms).Str(r.target);
    w.U8(r.has_nodes ? 1 : 0).U32(static_cast<uint32_t>(r.nodes.size()));
    for (const std::string &n : r.nodes)
        w.Str(n);
    w.Str(r.sql).Str(r.encoding);
    return std::move(w.buffer());
}

bool DecodeRequest(const char *data, size_t len, Request &out)
{
    Reader r(data, len);
    uint8_t kind = r.U8();
    if (kind != REQUEST_KIND_PARALLEL && kind != REQUEST_KIND_POOL)
        return false;
    out.kind = static_cast<RequestKind>(kind);
    out.timeout_ms = r.I32();
    out.acquire_timeout_ms = r.I32();
    out.target = r.Str();
    out.has_nodes = r.U8() != 0;
    uint32_t n = r.U32();
    if (r.failed() || n > 100000)
        return false;
    out.nodes.clear();
    for (uint32_t i = 0; i < n && !r.failed(); i++)
        out.nodes.push_back(r.Str());
    out.sql = r.Str();
    out.encoding = r.Str();
    return !r.failed() && r.at_end();
}

} // namespace peerpool::protocol
