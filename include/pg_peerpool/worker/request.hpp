// One caller's parallel_query or pool_query, as the pool manager runs it: read the request
// from the caller's slot, fan out one task per target node, stream rows back through the
// response queue with backpressure, enforce deadlines, and clean up when the caller leaves.
#pragma once

#include <deque>
#include <string>
#include <vector>

#include "pg_peerpool/pool/node.hpp"
#include "pg_peerpool/pool/protocol.hpp"

extern "C" {
#include "postgres.h"
#include "storage/shm_mq.h"
#include "utils/palloc.h"
}

namespace peerpool {

// What a request needs from the pool manager.
class RequestHost {
public:
    virtual ~RequestHost() = default;
    virtual Node *FindNode(const std::string &name) = 0;
    virtual std::vector<Node *> NodesByName() = 0;
    virtual uint64 &RoundRobin() = 0;
};

class Request {
public:
    Request(RequestHost &host, int slot, uint64 key, TimestampTz now);
    ~Request(); // detaches the queues and frees the slot
    Request(const Request &) = delete;
    Request &operator=(const Request &) = delete;

    uint64 key() const { return key_; }
    int slot() const { return slot_; }

    // Advances everything that does not wait for a socket: reading the request, deadlines,
    // resuming paused tasks, flushing the response queue.
    void Step(TimestampTz now);
    bool Finished() const { return finished_; }
    // The caller is gone (error, cancel, exit): cancel remote work, send nothing more.
    void Abandon(TimestampTz now);
    TimestampTz NextWake() const;
    // An error escaped while serving this request (out of memory, a failed queue operation):
    // fail it alone, cancel its remote work, and leave the pool manager running.
    void FailInternal(const std::string &message);
    // Answers with an error without reading or running the request (shutdown drain).
    void Refuse(int sqlerrcode, const std::string &message, const std::string &hint);
    bool refused() const { return refused_; }

    // Lease callbacks (from the nodes, through the pool manager).
    bool OnGrant(int task, Node &node, Connection &conn, TimestampTz now);
    void OnReady(int task, Node &node, Connection &conn, TimestampTz now);
    void OnLost(int task, const std::string &error, TimestampTz now);
    void OnWaitFailed(int task, int sqlerrcode, const std::string &error, TimestampTz now);

private:
    enum TaskState { TASK_WAITING, TASK_RUNNING, TASK_DONE };
    struct Task {
        std::string node;
        TaskState state = TASK_WAITING;
        uint64 conn_id = 0;
        bool columns_sent = false;
        bool paused = false;
        bool failed = false;
        bool copy = false;    // the query started COPY: the connection must be discarded
        bool too_big = false; // a row exceeded kMaxMessageBytes: stop and cancel the query
        std::string sqlstate, message, detail, hint;
    };

    void Launch(TimestampTz now);
    void Fail(int sqlerrcode, const std::string &message, const std::string &detail,
              const std::string &hint = "");
    void FinishTask(int index, bool success, const std::string &sqlstate,
                    const std::string &message, TimestampTz now);
    void Pump(int index, Node &node, Connection &conn, bool read_socket, TimestampTz now);
    bool HandleResult(int index, PGresult *res);
    void QueueEndIfDone();
    void DropQueuedRows(int index);
    void Queue(std::string message, bool flush);
    void Flush();
    size_t outbox_bytes() const { return outbox_bytes_; }

    RequestHost &host_;
    int slot_;
    uint64 key_;
    TimestampTz started_;
    TimestampTz deadline_ = 0;         // timeout_ms
    TimestampTz acquire_deadline_ = 0; // acquire_timeout
    MemoryContext context_ = nullptr;  // owns the queue handles
    shm_mq_handle *in_ = nullptr;
    shm_mq_handle *out_ = nullptr;
    bool launched_ = false;
    bool abandoned_ = false;
    bool end_queued_ = false;
    bool finished_ = false;
    bool timed_out_ = false; // deadline_ passed and was handled
    bool refused_ = false;
    protocol::Request request_;
    std::vector<Task> tasks_;
    std::deque<std::pair<std::string, bool>> outbox_; // message, force flush
    size_t outbox_bytes_ = 0;
};

} // namespace peerpool
