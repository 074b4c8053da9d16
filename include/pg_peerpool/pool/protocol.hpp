// The messages between a backend and the pool manager over a request slot's shm_mq pair.
//
// Request (backend -> pool manager), one message:
//   kind u8 | timeout_ms i32 | acquire_timeout_ms i32 | target str | has_nodes u8 |
//   n u32 | node names str... | sql str | encoding str
// Response (pool manager -> backend), a stream of messages, each starting with a tag byte:
//   'N' nodes:   n u32, names str...          (the targets, in result order)
//   'C' columns: node u32, ncols u32, (type_oid u32, name str)...
//   'R' row:     node u32, ncols u32, (len i32 (-1 = NULL), bytes)...
//   'D' done:    node u32, success u8, elapsed_ms f64, sqlstate str, message str, detail str,
//                hint str
//   'X' failed:  sqlstate str, message str, detail str, hint str   (the whole request)
//   'E' end
// str = u32 length + bytes. Both ends run on one machine, so integers are native-endian.
// Pure C++: no PostgreSQL calls, so either side may use it.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace peerpool::protocol {

enum RequestKind : uint8_t {
    REQUEST_KIND_PARALLEL = 1, // parallel_query
    REQUEST_KIND_POOL = 2,     // pool_query
};

struct Request {
    RequestKind kind = REQUEST_KIND_PARALLEL;
    int32_t timeout_ms = 0;         // 0 = none
    int32_t acquire_timeout_ms = 0; // 0 = wait without limit (the call's own deadline still holds)
    std::string target;             // pool_query
    bool has_nodes = false;         // parallel_query: false = every enabled node
    std::vector<std::string> nodes;
    std::string sql;
    std::string encoding; // the caller's database encoding (its name): rows come back in it
};

class Writer {
public:
    explicit Writer(char tag = 0)
    {
        if (tag != 0)
            buf_.push_back(tag);
    }
    Writer &U8(uint8_t v) { return Raw(&v, sizeof(v)); }
    Writer &U32(uint32_t v) { return Raw(&v, sizeof(v)); }
    Writer &I32(int32_t v) { return Raw(&v, sizeof(v)); }
    Writer &F64(double v) { return Raw(&v, sizeof(v)); }
    Writer &Str(const std::string &s) { return Str(s.data(), s.size()); }
    Writer &Str(const char *data, size_t len)
    {
        U32(static_cast<uint32_t>(len));
        buf_.append(data, len);
        return *this;
    }
    Writer &Raw(const void *p, size_t n)
    {
        buf_.append(static_cast<const char *>(p), n);
        return *this;
    }
    std::string &buffer() { return buf_; }

private:
    std::string buf_;
};

// Reads a message; any read past the end sets failed() and yields zeros.
class Reader {
public:
    Reader(const char *data, size_t len) : p_(data), end_(data + len) {}
    uint8_t U8() { return Get<uint8_t>(); }
    uint32_t U32() { return Get<uint32_t>(); }
    int32_t I32() { return Get<int32_t>(); }
    double F64() { return Get<double>(); }
    std::string Str()
    {
        uint32_t len = U32();
        if (failed_ || static_cast<size_t>(end_ - p_) < len) {
            failed_ = true;
            return {};
        }
        std::string s(p_, len);
        p_ += len;
        return s;
    }
    // A length-prefixed field without copying: nullptr for length -1 (NULL).
    const char *Field(int32_t &len)
    {
        len = I32();
        if (len < 0)
            return nullptr;
        if (failed_ || end_ - p_ < len) {
            failed_ = true;
            len = -1;
            return nullptr;
        }
        const char *out = p_;
        p_ += len;
        return out;
    }
    bool failed() const { return failed_; }
    bool at_end() const { return p_ == end_; }

private:
    template <typename T> T Get()
    {
        T v{};
        if (failed_ || static_cast<size_t>(end_ - p_) < sizeof(T)) {
            failed_ = true;
            return v;
        }
        memcpy(&v, p_, sizeof(T));
        p_ += sizeof(T);
        return v;
    }
    const char *p_;
    const char *end_;
    bool failed_ = false;
};

std::string EncodeRequest(const Request &r);
// The kind and timeout_ms at the head of an encoded request (false if it is too short), so
// the backend can keep its own deadline without decoding the whole message.
inline bool PeekRequestHeader(const char *data, size_t len, RequestKind &kind, int32_t &timeout_ms)
{
    if (len < 1 + sizeof(int32_t))
        return false;
    kind = static_cast<RequestKind>(static_cast<uint8_t>(data[0]));
    memcpy(&timeout_ms, data + 1, sizeof(timeout_ms));
    return true;
}
// Returns false if the message is malformed.
bool DecodeRequest(const char *data, size_t len, Request &out);

} // namespace peerpool::protocol
