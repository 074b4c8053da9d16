// parallel_query() and pool_query() (SPEC section 5): thin backends over the pool manager.
//
// Arguments are read and the request encoded in C++; then PostgreSQL-style code (inside
// pg::Call, no C++ objects alive) submits it and turns the response stream into rows.
// Memory: pool_query streams rows into the tuplestore (spills past work_mem); parallel_query
// builds one jsonb per node, so it holds each node's result in memory -- use pool_query for
// large results.
#include <string>
#include <vector>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/protocol.hpp"
#include "pg_peerpool/shmem.hpp"
#include "pg_peerpool/sql/channel.hpp"

extern "C" {
#include "catalog/pg_type.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/tuplestore.h"
#include "access/htup_details.h"
}

namespace peerpool {

namespace {

// ---- reading response messages (PostgreSQL-style: palloc, ereport on malformed input) ----

struct Cursor {
    const char *p;
    const char *end;
};

void Malformed() { elog(ERROR, "malformed response from the pg_peerpool pool manager"); }

template <typename T> T Get(Cursor &c)
{
    T v;
    if (c.end - c.p < static_cast<long>(sizeof(v)))
        Malformed();
    memcpy(&v, c.p, sizeof(v));
    c.p += sizeof(v);
    return v;
}

uint32 GetU32(Cursor &c) { return Get<uint32>(c); }
uint8 GetU8(Cursor &c) { return Get<uint8>(c); }
double GetF64(Cursor &c) { return Get<double>(c); }

// A palloc'd NUL-terminated copy of a length-prefixed string.
char *GetStr(Cursor &c)
{
    uint32 len = GetU32(c);
    if (static_cast<uint32>(c.end - c.p) < len)
        Malformed();
    char *s = pnstrdup(c.p, len);
    c.p += len;
    return s;
}

// A field of a row: nullptr for NULL, else a palloc'd copy.
char *GetField(Cursor &c)
{
    int32 len = static_cast<int32>(GetU32(c));
    if (len < 0)
        return nullptr;
    if (c.end - c.p < len)
        Malformed();
    char *s = pnstrdup(c.p, static_cast<Size>(len));
    c.p += len;
    return s;
}

// Reads the next response message; returns its tag and points `c` at its body.
char NextMessage(Cursor &c)
{
    Size size = 0;
    const char *data = nullptr;
    channel::Receive(&size, &data);
    if (size == 0)
        Malformed();
    c = Cursor{data + 1, data + size};
    return data[0];
}

// The 'X' message: the request failed as a whole.
[[noreturn]] void RaiseRequestError(Cursor &c)
{
    char *state = GetStr(c);
    char *message = GetStr(c);
    char *detail = GetStr(c);
    char *hint = GetStr(c);
    channel::Finish();
    int code = strlen(state) == 5
                   ? MAKE_SQLSTATE(state[0], state[1], state[2], state[3], state[4])
                   : ERRCODE_INTERNAL_ERROR;
    ereport(ERROR, (errcode(code), errmsg_internal("%s", message),
                    detail[0] ? errdetail_internal("%s", detail) : 0,
                    hint[0] ? errhint("%s", hint) : 0));
    pg_unreachable();
}

int SqlStateCode(const char *state)
{
    if (strlen(state) != 5)
        return ERRCODE_INTERNAL_ERROR;
    return MAKE_SQLSTATE(state[0], state[1], state[2], state[3], state[4]);
}

// ---- JSON for parallel_query ------------------------------------------------------------

bool IsJsonNumber(const char *v)
{
    // PostgreSQL's numeric types print NaN and infinities as words: those stay strings.
    return !(strcmp(v, "NaN") == 0 || strcmp(v, "Infinity") == 0 || strcmp(v, "-Infinity") == 0 ||
             strcmp(v, "inf") == 0 || strcmp(v, "-inf") == 0);
}

void AppendJsonValue(StringInfo buf, Oid type, const char *value)
{
    if (value == nullptr) {
        appendStringInfoString(buf, "null");
        return;
    }
    switch (type) {
    case BOOLOID:
        appendStringInfoString(buf, value[0] == 't' ? "true" : "false");
        return;
    case INT2OID:
    case INT4OID:
    case INT8OID:
    case OIDOID:
    case FLOAT4OID:
    case FLOAT8OID:
    case NUMERICOID:
        if (IsJsonNumber(value)) {
            appendStringInfoString(buf, value);
            return;
        }
        break;
    case JSONOID:
    case JSONBOID:
        appendStringInfoString(buf, value); // embedded as JSON, not as a string
        return;
    default:
        break;
    }
    escape_json(buf, value);
}

struct NodeResult {
    char *name;
    int ncols;
    Oid *types;
    char **columns;
    StringInfoData json;
    int64 rows;
    bool done;
    bool success;
    char *error;
    double elapsed_ms;
};

void RunParallelQuery(FunctionCallInfo fcinfo, const char *message, Size len)
{
    InitMaterializedSRF(fcinfo, 0);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);

    channel::Submit(message, len);
    NodeResult *nodes = nullptr;
    uint32 nnodes = 0;
    for (;;) {
        Cursor c{nullptr, nullptr};
        char tag = NextMessage(c);
        if (tag == 'E')
            break;
        switch (tag) {
        case 'X':
            RaiseRequestError(c);
        case 'N':
            nnodes = GetU32(c);
            nodes = static_cast<NodeResult *>(palloc0(sizeof(NodeResult) * (nnodes + 1)));
            for (uint32 i = 0; i < nnodes; i++) {
                nodes[i].name = GetStr(c);
                initStringInfo(&nodes[i].json);
                appendStringInfoChar(&nodes[i].json, '[');
            }
            break;
        case 'C': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            NodeResult &n = nodes[i];
            n.ncols = static_cast<int>(GetU32(c));
            n.types = static_cast<Oid *>(palloc(sizeof(Oid) * (n.ncols + 1)));
            n.columns = static_cast<char **>(palloc(sizeof(char *) * (n.ncols + 1)));
            for (int k = 0; k < n.ncols; k++) {
                n.types[k] = GetU32(c);
                n.columns[k] = GetStr(c);
            }
            break;
        }
        case 'R': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            NodeResult &n = nodes[i];
            int ncols = static_cast<int>(GetU32(c));
            if (ncols != n.ncols)
                Malformed();
            appendStringInfoString(&n.json, n.rows == 0 ? "{" : ", {");
            for (int k = 0; k < ncols; k++) {
                char *value = GetField(c);
                if (k > 0)
                    appendStringInfoString(&n.json, ", ");
                escape_json(&n.json, n.columns[k]);
                appendStringInfoString(&n.json, ": ");
                AppendJsonValue(&n.json, n.types[k], value);
                if (value != nullptr)
                    pfree(value);
            }
            appendStringInfoChar(&n.json, '}');
            n.rows++;
            break;
        }
        case 'D': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            NodeResult &n = nodes[i];
            n.done = true;
            n.success = GetU8(c) != 0;
            n.elapsed_ms = GetF64(c);
            char *state = GetStr(c);
            char *error = GetStr(c);
            char *detail = GetStr(c);
            if (!n.success) {
                StringInfoData e;
                initStringInfo(&e);
                appendStringInfoString(&e, error);
                if (detail[0] != '\0')
                    appendStringInfo(&e, " (%s)", detail);
                if (state[0] != '\0')
                    appendStringInfo(&e, " [SQLSTATE %s]", state);
                n.error = e.data;
                pfree(n.json.data); // the partial result of a failed node is not returned
                n.json.data = nullptr;
            }
            break;
        }
        default:
            Malformed();
        }
    }
    channel::Finish();

    for (uint32 i = 0; i < nnodes; i++) {
        NodeResult &n = nodes[i];
        Datum values[5];
        bool nulls[5] = {false, false, false, false, false};
        values[0] = CStringGetTextDatum(n.name);
        values[1] = BoolGetDatum(n.done && n.success);
        if (n.done && n.success) {
            appendStringInfoChar(&n.json, ']');
            values[2] = DirectFunctionCall1(jsonb_in, CStringGetDatum(n.json.data));
            pfree(n.json.data);
            nulls[3] = true;
        } else {
            nulls[2] = true;
            values[3] = CStringGetTextDatum(n.error ? n.error : "no result");
        }
        values[4] = Float8GetDatum(n.elapsed_ms);
        nulls[4] = !n.done;
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
    }
}

// ---- pool_query -------------------------------------------------------------------------

struct ConversionContext {
    const char *node;
    int column;
    const char *name;
};

void ConversionErrorContext(void *arg)
{
    auto *ctx = static_cast<ConversionContext *>(arg);
    if (ctx->column > 0)
        errcontext("pool_query: column %d (\"%s\") of the result from node \"%s\"", ctx->column,
                   ctx->name, ctx->node);
}

void RunPoolQuery(FunctionCallInfo fcinfo, const char *message, Size len)
{
    InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
    TupleDesc desc = rsinfo->setDesc;
    AttInMetadata *meta = TupleDescGetAttInMetadata(desc);
    int natts = desc->natts;
    MemoryContext row_context = AllocSetContextCreate(CurrentMemoryContext, "pool_query row",
                                                      ALLOCSET_SMALL_SIZES);

    channel::Submit(message, len);
    char *node = pstrdup("?");
    char **column_names = nullptr;
    ConversionContext conversion{node, 0, ""};
    ErrorContextCallback callback;
    callback.callback = ConversionErrorContext;
    callback.arg = &conversion;
    callback.previous = error_context_stack;
    error_context_stack = &callback;

    for (;;) {
        Cursor c{nullptr, nullptr};
        char tag = NextMessage(c);
        if (tag == 'E')
            break;
        switch (tag) {
        case 'X':
            RaiseRequestError(c);
        case 'N':
            if (GetU32(c) != 1)
                Malformed();
            node = GetStr(c);
            conversion.node = node;
            break;
        case 'C': {
            (void)GetU32(c); // node index: always 0 here
            int ncols = static_cast<int>(GetU32(c));
            if (ncols != natts)
                ereport(ERROR, (errcode(ERRCODE_DATATYPE_MISMATCH),
                                errmsg("remote query result rowtype does not match the specified "
                                       "FROM clause rowtype"),
                                errdetail("Node \"%s\" returned %d column%s; the column "
                                          "definition list has %d.",
                                          node, ncols, ncols == 1 ? "" : "s", natts)));
            column_names = static_cast<char **>(palloc(sizeof(char *) * (ncols + 1)));
            for (int k = 0; k < ncols; k++) {
                (void)GetU32(c); // remote type: values are converted by the local input functions
                column_names[k] = GetStr(c);
            }
            break;
        }
        case 'R': {
            (void)GetU32(c);
            int ncols = static_cast<int>(GetU32(c));
            if (ncols != natts || column_names == nullptr)
                Malformed();
            MemoryContext old = MemoryContextSwitchTo(row_context);
            char **values = static_cast<char **>(palloc(sizeof(char *) * (ncols + 1)));
            for (int k = 0; k < ncols; k++)
                values[k] = GetField(c);
            // Each value goes through its column's input function; errors name the column.
            Datum *datums = static_cast<Datum *>(palloc(sizeof(Datum) * (ncols + 1)));
            bool *isnull = static_cast<bool *>(palloc(sizeof(bool) * (ncols + 1)));
            for (int k = 0; k < ncols; k++) {
                conversion.column = k + 1;
                conversion.name = column_names[k];
                isnull[k] = values[k] == nullptr;
                datums[k] = InputFunctionCall(&meta->attinfuncs[k], values[k],
                                              meta->attioparams[k], meta->atttypmods[k]);
            }
            conversion.column = 0;
            HeapTuple tuple = heap_form_tuple(desc, datums, isnull);
            MemoryContextSwitchTo(old);
            tuplestore_puttuple(rsinfo->setResult, tuple);
            MemoryContextReset(row_context);
            break;
        }
        case 'D': {
            (void)GetU32(c);
            bool success = GetU8(c) != 0;
            (void)GetF64(c);
            char *state = GetStr(c);
            char *error = GetStr(c);
            char *detail = GetStr(c);
            char *hint = GetStr(c);
            if (!success) {
                channel::Finish();
                // The remote error, as the node raised it, with the node named (once: our own
                // messages about the node already name it).
                char *prefix = psprintf("node \"%s\"", node);
                bool named = strstr(error, prefix) != nullptr;
                ereport(ERROR, (errcode(SqlStateCode(state)),
                                named ? errmsg_internal("%s", error)
                                      : errmsg_internal("node \"%s\": %s", node, error),
                                detail[0] ? errdetail_internal("%s", detail) : 0,
                                hint[0] ? errhint("%s", hint) : 0));
            }
            break;
        }
        default:
            Malformed();
        }
    }
    error_context_stack = callback.previous;
    channel::Finish();
    MemoryContextDelete(row_context);
}

// ---- arguments ----------------------------------------------------------------------------

std::string TextArg(FunctionCallInfo fcinfo, int n, const char *what)
{
    if (PG_ARGISNULL(n))
        throw Error(ERRCODE_NULL_VALUE_NOT_ALLOWED, Format("%s must not be NULL", what));
    return pg::Call([&] { return text_to_cstring(PG_GETARG_TEXT_PP(n)); });
}

int TimeoutArg(FunctionCallInfo fcinfo, int n)
{
    if (PG_ARGISNULL(n))
        return AllowedQueryTimeout(peerpool_query_timeout, false);
    int v = PG_GETARG_INT32(n);
    if (v < 0)
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "timeout_ms must not be negative",
                    Format("timeout_ms is %d; 0 means no timeout.", v));
    return AllowedQueryTimeout(v, true);
}

struct ArrayItems {
    int count;
    Datum *values;
    bool *nulls;
};

} // namespace

static Datum ParallelQuery(FunctionCallInfo fcinfo)
{
    RequireShared();
    protocol::Request request;
    request.kind = protocol::REQUEST_KIND_PARALLEL;
    request.sql = TextArg(fcinfo, 0, "sql");
    if (!PG_ARGISNULL(1)) {
        request.has_nodes = true;
        ArrayItems items = pg::Call([&] {
            ArrayItems out{0, nullptr, nullptr};
            ArrayType *array = PG_GETARG_ARRAYTYPE_P(1);
            if (ARR_NDIM(array) > 1)
                ereport(ERROR, (errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
                                errmsg("nodes must be a one-dimensional array")));
            deconstruct_array(array, TEXTOID, -1, false, TYPALIGN_INT, &out.values, &out.nulls,
                              &out.count);
            return out;
        });
        for (int i = 0; i < items.count; i++) {
            if (items.nulls[i])
                throw Error(ERRCODE_NULL_VALUE_NOT_ALLOWED, "nodes must not contain NULL");
            Datum d = items.values[i];
            request.nodes.push_back(pg::Call([&] { return TextDatumGetCString(d); }));
        }
    }
    request.timeout_ms = TimeoutArg(fcinfo, 2);
    request.acquire_timeout_ms = peerpool_acquire_timeout;
    std::string message = protocol::EncodeRequest(request);
    const char *data = message.data();
    Size size = message.size();
    pg::Call([&] { RunParallelQuery(fcinfo, data, size); });
    return (Datum)0;
}

static Datum PoolQuery(FunctionCallInfo fcinfo)
{
    RequireShared();
    protocol::Request request;
    request.kind = protocol::REQUEST_KIND_POOL;
    request.sql = TextArg(fcinfo, 0, "sql");
    request.target = TextArg(fcinfo, 1, "target");
    if (request.target.empty())
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE, "target must not be empty",
                    "The target is \"read\", \"write\", \"standby\" or a node name.");
    request.timeout_ms = TimeoutArg(fcinfo, 2);
    request.acquire_timeout_ms = peerpool_acquire_timeout;
    std::string message = protocol::EncodeRequest(request);
    const char *data = message.data();
    Size size = message.size();
    pg::Call([&] { RunPoolQuery(fcinfo, data, size); });
    return (Datum)0;
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(parallel_query, peerpool::ParallelQuery)
PEERPOOL_SQL_FUNCTION(pool_query, peerpool::PoolQuery)
