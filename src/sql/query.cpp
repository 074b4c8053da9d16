// parallel_query(), parallel_query_rows() and pool_query() (SPEC section 5): thin backends
// over the pool manager.
//
// Arguments are read and the request encoded in C++; then PostgreSQL-style code (inside
// pg::Call, no C++ objects alive) submits it and turns the response stream into rows as the
// messages arrive. What a node sent is checked before it is used: text must be valid in this
// database's encoding (an SQL_ASCII peer converts nothing), and in parallel_query a value that
// jsonb cannot hold fails that node only.
// Memory: pool_query and parallel_query_rows stream rows into the tuplestore (spills past
// work_mem); parallel_query keeps each node's jsonb array (binary, built row by row) in memory
// -- use the other two for large results.
#include <string>
#include <vector>

#include "pg_peerpool/guc.hpp"
#include "pg_peerpool/pg/guard.hpp"
#include "pg_peerpool/pool/protocol.hpp"
#include "pg_peerpool/shmem.hpp"
#include "pg_peerpool/sql/channel.hpp"

extern "C" {
#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/tuptable.h"
#include "funcapi.h"
#include "lib/stringinfo.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/tuplestore.h"
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

// A field of a row, in place: valid until the next message is read. len < 0: NULL.
struct Field {
    const char *data;
    int32 len;
};

Field GetField(Cursor &c)
{
    int32 len = static_cast<int32>(GetU32(c));
    if (len < 0)
        return Field{nullptr, -1};
    if (c.end - c.p < len)
        Malformed();
    Field f{c.p, len};
    c.p += len;
    return f;
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

// ---- text in this database's encoding ----------------------------------------------------
//
// Pooled connections ask for this database's encoding (client_encoding), so a peer converts
// what it sends or fails the query (22P05). A peer in SQL_ASCII converts nothing: its bytes are
// checked here, like any text entering the database (pg_verifymbstr).

// nullptr if the bytes are valid text in this database's encoding (no NUL either); else the
// message PostgreSQL gives for them (report_invalid_encoding's wording), palloc'd.
char *InvalidText(const char *s, int len)
{
    if (pg_verifymbstr(s, len, true))
        return nullptr;
    int encoding = GetDatabaseEncoding();
    int valid = pg_encoding_verifymbstr(encoding, s, len);
    const char *bad = s + valid;
    int rest = len - valid;
    int mblen = pg_encoding_mblen(encoding, bad);
    StringInfoData bytes;
    initStringInfo(&bytes);
    for (int j = 0; j < mblen && j < rest; j++)
        appendStringInfo(&bytes, "%s0x%02x", j > 0 ? " " : "", static_cast<unsigned char>(bad[j]));
    return psprintf("invalid byte sequence for encoding \"%s\": %s", GetDatabaseEncodingName(),
                    bytes.data);
}

// `s` with every byte that is not valid text here replaced by '?': for what a node says about
// itself (error messages, column names in messages), which must not carry invalid bytes either.
char *SafeText(char *s)
{
    int len = static_cast<int>(strlen(s));
    if (pg_verifymbstr(s, len, true))
        return s;
    int encoding = GetDatabaseEncoding();
    StringInfoData out;
    initStringInfo(&out);
    while (len > 0) {
        int valid = pg_encoding_verifymbstr(encoding, s, len);
        appendBinaryStringInfo(&out, s, valid);
        s += valid;
        len -= valid;
        if (len > 0) {
            appendStringInfoChar(&out, '?');
            s++;
            len--;
        }
    }
    return out.data;
}

// A string from a node's message, made safe to show.
char *GetText(Cursor &c) { return SafeText(GetStr(c)); }

// The 'X' message: the request failed as a whole.
[[noreturn]] void RaiseRequestError(Cursor &c)
{
    char *state = GetStr(c);
    char *message = GetText(c);
    char *detail = GetText(c);
    char *hint = GetText(c);
    channel::Finish();
    int code = strlen(state) == 5 ? MAKE_SQLSTATE(state[0], state[1], state[2], state[3], state[4])
                                  : ERRCODE_INTERNAL_ERROR;
    ereport(ERROR,
            (errcode(code), errmsg_internal("%s", message),
             detail[0] ? errdetail_internal("%s", detail) : 0, hint[0] ? errhint("%s", hint) : 0));
    pg_unreachable();
}

int SqlStateCode(const char *state)
{
    if (strlen(state) != 5)
        return ERRCODE_INTERNAL_ERROR;
    return MAKE_SQLSTATE(state[0], state[1], state[2], state[3], state[4]);
}

// Errors that are not about a value (a cancel, a shutdown) must end the call, not a node.
bool IsInterrupt(const ErrorData *e)
{
    return e->sqlerrcode == ERRCODE_QUERY_CANCELED ||
           ERRCODE_TO_CATEGORY(e->sqlerrcode) == ERRCODE_OPERATOR_INTERVENTION;
}

// ---- jsonb for parallel_query -------------------------------------------------------------
//
// Each row becomes a jsonb object as soon as it arrives, and its binary form is appended to its
// node's array. The array is assembled at the end as convertJsonbArray() lays one out (header,
// one JEntry per row, each row's container padded to 4 bytes), so no JSON text is reparsed and
// no in-memory tree of a whole result is built.

bool IsJsonNumber(const char *v)
{
    // PostgreSQL's numeric types print NaN and infinities as words: those stay strings.
    return !(strcmp(v, "NaN") == 0 || strcmp(v, "Infinity") == 0 || strcmp(v, "-Infinity") == 0 ||
             strcmp(v, "inf") == 0 || strcmp(v, "-inf") == 0);
}

struct NameRef {
    const char *name;
    int index;
};

int CompareNameRefs(const void *a, const void *b)
{
    auto *x = static_cast<const NameRef *>(a);
    auto *y = static_cast<const NameRef *>(b);
    int c = strcmp(x->name, y->name);
    return c != 0 ? c : (x->index > y->index) - (x->index < y->index);
}

int CompareNameToRef(const void *key, const void *elem)
{
    return strcmp(static_cast<const char *>(key), static_cast<const NameRef *>(elem)->name);
}

// The object keys for a result's columns: every value is kept (SPEC section 5). The first
// column of a name keeps it; each later one gets name_N, N the smallest number >= 2, above the
// previous repeat's, such that name_N is not the name of a column of the result. Generated
// names never collide with each other: the text after the last '_' tells N, and so the name.
char **UniqueColumnNames(char **names, int n)
{
    char **out = static_cast<char **>(palloc(sizeof(char *) * (n + 1)));
    NameRef *refs = static_cast<NameRef *>(palloc(sizeof(NameRef) * (n + 1)));
    for (int i = 0; i < n; i++)
        refs[i] = NameRef{names[i], i};
    qsort(refs, n, sizeof(NameRef), CompareNameRefs);
    for (int g = 0; g < n;) {
        int end = g + 1;
        while (end < n && strcmp(refs[end].name, refs[g].name) == 0)
            end++;
        out[refs[g].index] = names[refs[g].index];
        int suffix = 1;
        for (int i = g + 1; i < end; i++) {
            char *candidate = nullptr;
            do {
                suffix++;
                candidate = psprintf("%s_%d", refs[g].name, suffix);
            } while (bsearch(candidate, refs, n, sizeof(NameRef), CompareNameToRef) != nullptr);
            out[refs[i].index] = candidate;
        }
        g = end;
    }
    pfree(refs);
    return out;
}

struct NodeResult {
    char *name;
    MemoryContext context; // owns this node's columns and rows; deleted when the node fails
    int ncols;
    Oid *types;
    char **keys; // unique object keys (UniqueColumnNames)
    JsonbValue *key_values;
    bool has_json;    // a json/jsonb column: rows are built with pushJsonbValue
    JsonbPair *pairs; // otherwise: the object's pairs, in jsonb's key order, keys set once
    int *sorted;      // the column of each pair
    // The rows' containers, each padded to int alignment, in one buffer that becomes the
    // node's array in place (FinishArray): a large result is copied once less, and fresh
    // pages (a page fault each) are what a large result costs most.
    char *data;
    Size data_len;
    Size data_capacity;
    uint32 *lens; // per row: its padding + container length
    int64 rows;
    int64 capacity;
    bool done;    // the pool manager reported the node's end
    bool success; // ... as a success
    bool failed;  // failed here (its text or json): its later rows are ignored
    char *error;
    double elapsed_ms;
};

// Appends a row object's container to its node's array.
void AppendRow(NodeResult &n, Jsonb *row)
{
    uint32 len = VARSIZE(row) - VARHDRSZ;
    // The data area starts 4-aligned (after the header and 4-byte JEntries), so padding to
    // INTALIGN here is padding to it in the final value.
    uint32 pad = static_cast<uint32>(INTALIGN(n.data_len) - n.data_len);
    if (n.data_len + pad + len > JENTRY_OFFLENMASK)
        ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
                        errmsg("total size of jsonb array elements exceeds the maximum of %u bytes",
                               JENTRY_OFFLENMASK),
                        errhint("Use parallel_query_rows or pool_query for large results.")));
    if (n.rows == n.capacity) {
        n.capacity *= 2;
        n.lens = static_cast<uint32 *>(repalloc(n.lens, sizeof(uint32) * n.capacity));
    }
    // Room for the header and the entries is made at the end, by one move of the data.
    if (n.data_capacity - n.data_len < pad + len) {
        Size capacity = Max(n.data_capacity * 2, n.data_len + pad + len);
        n.data = static_cast<char *>(repalloc(n.data, capacity));
        n.data_capacity = capacity;
    }
    char *out = n.data + n.data_len;
    memset(out, 0, pad);
    memcpy(out + pad, VARDATA(row), len);
    n.data_len += pad + len;
    n.lens[n.rows++] = pad + len;
}

// The node's jsonb array, laid out as convertJsonbArray() does, made in place from its rows'
// buffer: the data moves up to make room for the header and one entry per row.
Datum FinishArray(NodeResult &n)
{
    Size head = VARHDRSZ + sizeof(uint32) + sizeof(JEntry) * n.rows;
    Size total = head + n.data_len;
    char *buffer = static_cast<char *>(repalloc(n.data, total));
    memmove(buffer + head, buffer, n.data_len);
    n.data = nullptr; // the array owns it now (still in the node's context)
    Jsonb *out = reinterpret_cast<Jsonb *>(buffer);
    SET_VARSIZE(out, total);
    out->root.header = static_cast<uint32>(n.rows) | JB_FARRAY;
    uint32 offset = 0;
    for (int64 i = 0; i < n.rows; i++) {
        offset += n.lens[i];
        // Every JB_OFFSET_STRIDE'th entry holds the end offset instead of the length.
        out->root.children[i] = (i % JB_OFFSET_STRIDE) == 0
                                    ? (JENTRY_ISCONTAINER | JENTRY_HAS_OFF | offset)
                                    : (JENTRY_ISCONTAINER | n.lens[i]);
    }
    return JsonbPGetDatum(out);
}

// jsonb's order of object keys: shorter first, then bytewise (lengthCompareJsonbStringValue).
int CompareKeys(const void *a, const void *b)
{
    auto *x = static_cast<const JsonbPair *>(a);
    auto *y = static_cast<const JsonbPair *>(b);
    int xl = x->key.val.string.len, yl = y->key.val.string.len;
    if (xl != yl)
        return xl < yl ? -1 : 1;
    return memcmp(x->key.val.string.val, y->key.val.string.val, xl);
}

// A row's object is built straight from pairs in key order (its keys are unique and the same
// for every row), without pushJsonbValue's per-row sort; that needs no json column, whose
// value must be unpacked into the tree by pushJsonbValue.
void PrepareColumns(NodeResult &n)
{
    n.has_json = false;
    for (int k = 0; k < n.ncols; k++)
        n.has_json = n.has_json || n.types[k] == JSONOID || n.types[k] == JSONBOID;
    n.pairs = static_cast<JsonbPair *>(palloc0(sizeof(JsonbPair) * (n.ncols + 1)));
    n.sorted = static_cast<int *>(palloc(sizeof(int) * (n.ncols + 1)));
    for (int k = 0; k < n.ncols; k++) {
        n.pairs[k].key = n.key_values[k];
        n.pairs[k].order = static_cast<uint32>(k);
    }
    qsort(n.pairs, n.ncols, sizeof(JsonbPair), CompareKeys);
    for (int i = 0; i < n.ncols; i++) {
        n.sorted[i] = static_cast<int>(n.pairs[i].order);
        n.pairs[i].order = static_cast<uint32>(i);
    }
}

struct JsonRow {
    NodeResult *node;
    const Field *fields;
    MemoryContext row_context;
    int column; // the column being converted, or -1
};

// The JSON value of column k's field.
void FieldValue(const NodeResult &n, int k, const Field &f, JsonbValue &v)
{
    v.type = jbvString;
    v.val.string.val = const_cast<char *>(f.data);
    v.val.string.len = f.len;
    if (f.len < 0) {
        v.type = jbvNull;
        return;
    }
    switch (n.types[k]) {
    case BOOLOID:
        v.type = jbvBool;
        v.val.boolean = f.len > 0 && f.data[0] == 't';
        break;
    case INT2OID:
    case INT4OID:
    case INT8OID:
    case OIDOID: {
        // Up to 18 digits cannot overflow: skip numeric_in's parser (same value, same bytes).
        const char *p = f.data + (f.len > 0 && f.data[0] == '-' ? 1 : 0);
        int digits = static_cast<int>(f.data + f.len - p);
        int64 value = 0;
        bool plain = digits > 0 && digits <= 18;
        for (int i = 0; plain && i < digits; i++) {
            plain = p[i] >= '0' && p[i] <= '9';
            value = value * 10 + (p[i] - '0');
        }
        if (plain) {
            v.type = jbvNumeric;
            v.val.numeric = int64_to_numeric(p == f.data ? value : -value);
            break;
        }
        [[fallthrough]];
    }
    case FLOAT4OID:
    case FLOAT8OID:
    case NUMERICOID: {
        char *text = pnstrdup(f.data, f.len);
        if (IsJsonNumber(text)) {
            v.type = jbvNumeric;
            v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(text),
                                                                ObjectIdGetDatum(InvalidOid),
                                                                Int32GetDatum(-1)));
        }
        break;
    }
    case JSONOID:
    case JSONBOID: {
        // Embedded as JSON, not as a string; \u0000 or a lone surrogate fails here.
        Jsonb *value = DatumGetJsonbP(
            DirectFunctionCall1(jsonb_in, CStringGetDatum(pnstrdup(f.data, f.len))));
        v.type = jbvBinary;
        v.val.binary.data = &value->root;
        v.val.binary.len = VARSIZE(value) - VARHDRSZ;
        break;
    }
    default:
        break; // text, already checked to be valid here
    }
}

// One row as an object (run under pg::RunCatchingErrors: an error fails the node only).
void ConvertJsonRow(void *arg)
{
    auto *row = static_cast<JsonRow *>(arg);
    NodeResult &n = *row->node;
    MemoryContext old = MemoryContextSwitchTo(row->row_context);
    JsonbValue *object = nullptr;
    if (!n.has_json) {
        for (int i = 0; i < n.ncols; i++) {
            row->column = n.sorted[i];
            FieldValue(n, row->column, row->fields[row->column], n.pairs[i].value);
        }
        JsonbValue value;
        value.type = jbvObject;
        value.val.object.nPairs = n.ncols;
        value.val.object.pairs = n.pairs;
        object = &value;
        row->column = -1;
        AppendRow(n, JsonbValueToJsonb(object));
    } else {
        JsonbParseState *state = nullptr;
        pushJsonbValue(&state, WJB_BEGIN_OBJECT, nullptr);
        for (int k = 0; k < n.ncols; k++) {
            row->column = k;
            JsonbValue v;
            FieldValue(n, k, row->fields[k], v);
            pushJsonbValue(&state, WJB_KEY, &n.key_values[k]);
            pushJsonbValue(&state, WJB_VALUE, &v);
        }
        row->column = -1;
        object = pushJsonbValue(&state, WJB_END_OBJECT, nullptr);
        AppendRow(n, JsonbValueToJsonb(object));
    }
    MemoryContextSwitchTo(old);
}

// The node failed here: its error names it (and the column), its rows are dropped.
void FailNode(NodeResult &n, int sqlerrcode, const char *column, const char *message,
              const char *detail)
{
    StringInfoData e;
    initStringInfo(&e);
    appendStringInfo(&e, "node \"%s\": ", n.name);
    if (column != nullptr)
        appendStringInfo(&e, "column \"%s\": ", column);
    appendStringInfoString(&e, message);
    if (detail != nullptr && detail[0] != '\0')
        appendStringInfo(&e, " (%s)", detail);
    appendStringInfo(&e, " [SQLSTATE %s]", unpack_sql_state(sqlerrcode));
    n.failed = true;
    n.error = e.data;
    if (n.context != nullptr)
        MemoryContextDelete(n.context);
    n.context = nullptr;
    n.keys = nullptr;
    n.key_values = nullptr;
    n.types = nullptr;
    n.lens = nullptr;
    n.pairs = nullptr;
    n.sorted = nullptr;
    n.data = nullptr;
    n.data_len = n.data_capacity = 0;
}

void RunParallelQuery(FunctionCallInfo fcinfo, const char *message, Size len)
{
    InitMaterializedSRF(fcinfo, 0);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
    MemoryContext call_context = CurrentMemoryContext;
    MemoryContext row_context = AllocSetContextCreate(call_context, "parallel_query row",
                                                      ALLOCSET_DEFAULT_SIZES);

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
                NodeResult &n = nodes[i];
                n.name = GetStr(c);
                n.context = AllocSetContextCreate(call_context, "parallel_query node",
                                                  ALLOCSET_DEFAULT_SIZES);
                MemoryContext old = MemoryContextSwitchTo(n.context);
                n.capacity = 64;
                n.lens = static_cast<uint32 *>(palloc(sizeof(uint32) * n.capacity));
                n.data_capacity = 8192;
                n.data = static_cast<char *>(palloc(n.data_capacity));
                MemoryContextSwitchTo(old);
            }
            break;
        case 'C': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            NodeResult &n = nodes[i];
            if (n.failed)
                break;
            int ncols = static_cast<int>(GetU32(c));
            MemoryContext old = MemoryContextSwitchTo(n.context);
            Oid *types = static_cast<Oid *>(palloc(sizeof(Oid) * (ncols + 1)));
            char **names = static_cast<char **>(palloc(sizeof(char *) * (ncols + 1)));
            char *bad = nullptr;
            for (int k = 0; k < ncols; k++) {
                types[k] = GetU32(c);
                names[k] = GetStr(c);
                if (bad == nullptr && (bad = InvalidText(names[k], strlen(names[k]))) != nullptr)
                    bad = psprintf("name of column %d: %s", k + 1, bad);
            }
            MemoryContextSwitchTo(old);
            if (bad != nullptr) {
                bad = pstrdup(bad); // out of the node's context, which FailNode deletes
                FailNode(n, ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, nullptr, bad, nullptr);
                break;
            }
            old = MemoryContextSwitchTo(n.context);
            n.ncols = ncols;
            n.types = types;
            n.keys = UniqueColumnNames(names, ncols);
            n.key_values = static_cast<JsonbValue *>(palloc(sizeof(JsonbValue) * (ncols + 1)));
            for (int k = 0; k < ncols; k++) {
                n.key_values[k].type = jbvString;
                n.key_values[k].val.string.val = n.keys[k];
                n.key_values[k].val.string.len = static_cast<int>(strlen(n.keys[k]));
            }
            PrepareColumns(n);
            MemoryContextSwitchTo(old);
            break;
        }
        case 'R': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            NodeResult &n = nodes[i];
            if (n.failed)
                break;
            int ncols = static_cast<int>(GetU32(c));
            if (ncols != n.ncols || n.keys == nullptr)
                Malformed();
            Field *fields = static_cast<Field *>(
                MemoryContextAlloc(row_context, sizeof(Field) * (ncols + 1)));
            for (int k = 0; k < ncols; k++)
                fields[k] = GetField(c);
            for (int k = 0; k < ncols && !n.failed; k++)
                if (fields[k].len >= 0)
                    if (char *bad = InvalidText(fields[k].data, fields[k].len))
                        FailNode(n, ERRCODE_CHARACTER_NOT_IN_REPERTOIRE, n.keys[k], bad, nullptr);
            if (!n.failed) {
                JsonRow row{&n, fields, row_context, -1};
                if (ErrorData *e = pg::RunCatchingErrors(ConvertJsonRow, &row)) {
                    if (IsInterrupt(e))
                        ReThrowError(e);
                    FailNode(n, e->sqlerrcode, row.column >= 0 ? n.keys[row.column] : nullptr,
                             e->message, e->detail);
                    FreeErrorData(e);
                }
            }
            MemoryContextReset(row_context);
            break;
        }
        case 'D': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            NodeResult &n = nodes[i];
            n.done = true;
            bool success = GetU8(c) != 0;
            n.elapsed_ms = GetF64(c);
            char *state = GetText(c);
            char *error = GetText(c);
            char *detail = GetText(c);
            if (n.failed)
                break; // the failure found here stands
            n.success = success;
            if (!success) {
                StringInfoData e;
                initStringInfo(&e);
                appendStringInfoString(&e, error);
                if (detail[0] != '\0')
                    appendStringInfo(&e, " (%s)", detail);
                if (state[0] != '\0')
                    appendStringInfo(&e, " [SQLSTATE %s]", state);
                n.error = e.data;
                MemoryContextDelete(n.context); // the partial result of a failed node is dropped
                n.context = nullptr;
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
        bool success = n.done && n.success && !n.failed;
        Datum values[5];
        bool nulls[5] = {false, false, false, false, false};
        values[0] = CStringGetTextDatum(n.name);
        values[1] = BoolGetDatum(success);
        if (success) {
            values[2] = FinishArray(n);
            nulls[3] = true;
        } else {
            nulls[2] = true;
            values[3] = CStringGetTextDatum(n.error ? n.error : "no result");
        }
        values[4] = Float8GetDatum(n.elapsed_ms);
        nulls[4] = !n.done;
        tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
        // Its array is copied into the tuplestore: free it before the next node's copy, which
        // may reuse the memory.
        if (n.context != nullptr)
            MemoryContextDelete(n.context);
        n.context = nullptr;
    }
    MemoryContextDelete(row_context);
}

// ---- typed rows: pool_query and parallel_query_rows ---------------------------------------
//
// Rows of the remote result become tuples of the caller's column definition list through each
// column's input function, as dblink does. The first `skip` columns of the list are not the
// query's (parallel_query_rows: the node name).

struct ConversionContext {
    const char *function;
    const char *node;
    int column;
    const char *name;
};

void ConversionErrorContext(void *arg)
{
    auto *ctx = static_cast<ConversionContext *>(arg);
    if (ctx->column > 0)
        errcontext("%s: column %d (\"%s\") of the result from node \"%s\"", ctx->function,
                   ctx->column, ctx->name, ctx->node);
}

struct TypedRows {
    TupleDesc desc;
    AttInMetadata *meta;
    int skip;
    MemoryContext row_context;
    ConversionContext conversion;
    ErrorContextCallback callback;
};

// `t` must stay where it is until TypedRowsEnd: it is on the error context stack.
void TypedRowsBegin(TypedRows &t, ReturnSetInfo *rsinfo, int skip, const char *function)
{
    t.desc = rsinfo->setDesc;
    t.meta = TupleDescGetAttInMetadata(t.desc);
    t.skip = skip;
    t.row_context = AllocSetContextCreate(CurrentMemoryContext, "pg_peerpool typed row",
                                          ALLOCSET_SMALL_SIZES);
    t.conversion = ConversionContext{function, "?", 0, ""};
    t.callback.callback = ConversionErrorContext;
    t.callback.arg = &t.conversion;
    t.callback.previous = error_context_stack;
    error_context_stack = &t.callback;
}

void TypedRowsEnd(TypedRows &t)
{
    error_context_stack = t.callback.previous;
    MemoryContextDelete(t.row_context);
}

// The remote result's column count against the column definition list.
void CheckColumnCount(const TypedRows &t, const char *node, int ncols)
{
    int expected = t.desc->natts - t.skip;
    if (ncols == expected)
        return;
    ereport(ERROR,
            (errcode(ERRCODE_DATATYPE_MISMATCH),
             errmsg("remote query result rowtype does not match the specified FROM clause "
                    "rowtype"),
             t.skip == 0
                 ? errdetail("Node \"%s\" returned %d column%s; the column definition list has "
                             "%d.",
                             node, ncols, ncols == 1 ? "" : "s", expected)
                 : errdetail("Node \"%s\" returned %d column%s; the column definition list has "
                             "%d after the node name.",
                             node, ncols, ncols == 1 ? "" : "s", expected)));
}

// Converts the rest of an 'R' message (after the node index) and stores the tuple, with
// `leading` as its first `skip` values. Returns nullptr; or, when a value is not valid text in
// this database's encoding, stores nothing and returns the message (palloc'd), with the
// column (1-based) in *bad_column.
char *PutTypedRow(TypedRows &t, Tuplestorestate *store, Cursor &c, const char *node,
                  char **column_names, const Datum *leading, int *bad_column)
{
    int natts = t.desc->natts;
    int ncols = static_cast<int>(GetU32(c));
    if (ncols != natts - t.skip || column_names == nullptr)
        Malformed();
    MemoryContext old = MemoryContextSwitchTo(t.row_context);
    char **values = static_cast<char **>(palloc(sizeof(char *) * (ncols + 1)));
    for (int k = 0; k < ncols; k++) {
        Field f = GetField(c);
        values[k] = nullptr;
        if (f.len < 0)
            continue;
        if (char *bad = InvalidText(f.data, f.len)) {
            char *message = MemoryContextStrdup(old, bad);
            MemoryContextSwitchTo(old);
            MemoryContextReset(t.row_context);
            *bad_column = k + 1;
            return message;
        }
        values[k] = pnstrdup(f.data, f.len);
    }
    Datum *datums = static_cast<Datum *>(palloc(sizeof(Datum) * (natts + 1)));
    bool *isnull = static_cast<bool *>(palloc(sizeof(bool) * (natts + 1)));
    for (int a = 0; a < t.skip; a++) {
        datums[a] = leading[a];
        isnull[a] = false;
    }
    // Each value goes through its column's input function; errors name the column.
    t.conversion.node = node;
    for (int k = 0; k < ncols; k++) {
        int a = k + t.skip;
        t.conversion.column = k + 1;
        t.conversion.name = column_names[k];
        isnull[a] = values[k] == nullptr;
        datums[a] = InputFunctionCall(&t.meta->attinfuncs[a], values[k], t.meta->attioparams[a],
                                      t.meta->atttypmods[a]);
    }
    t.conversion.column = 0;
    tuplestore_putvalues(store, t.desc, datums, isnull);
    MemoryContextSwitchTo(old);
    MemoryContextReset(t.row_context);
    return nullptr;
}

// A node's column names ('C' after the node index), for messages.
char **GetColumnNames(Cursor &c, int ncols)
{
    char **names = static_cast<char **>(palloc(sizeof(char *) * (ncols + 1)));
    for (int k = 0; k < ncols; k++) {
        (void)GetU32(c); // remote type: values are converted by the local input functions
        names[k] = GetText(c);
    }
    return names;
}

// A node's failure as pool_query raises it: the remote SQLSTATE, message, detail and hint,
// with the node named (once: our own messages about a node already name it).
void ReportNodeError(int elevel, const char *node, const char *state, const char *error,
                     const char *detail, const char *hint, bool with_state)
{
    char *prefix = psprintf("node \"%s\"", node);
    bool named = strstr(error, prefix) != nullptr;
    char *message = named ? pstrdup(error) : psprintf("node \"%s\": %s", node, error);
    if (with_state)
        message = psprintf("%s [SQLSTATE %s]", message, state);
    ereport(elevel,
            (errcode(SqlStateCode(state)), errmsg_internal("%s", message),
             detail[0] ? errdetail_internal("%s", detail) : 0, hint[0] ? errhint("%s", hint) : 0));
}

void RunPoolQuery(FunctionCallInfo fcinfo, const char *message, Size len)
{
    InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
    TypedRows t;
    TypedRowsBegin(t, rsinfo, 0, "pool_query");

    channel::Submit(message, len);
    char *node = pstrdup("?");
    char **column_names = nullptr;
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
            break;
        case 'C': {
            (void)GetU32(c); // node index: always 0 here
            int ncols = static_cast<int>(GetU32(c));
            CheckColumnCount(t, node, ncols);
            column_names = GetColumnNames(c, ncols);
            break;
        }
        case 'R': {
            (void)GetU32(c);
            int bad_column = 0;
            if (char *bad = PutTypedRow(t, rsinfo->setResult, c, node, column_names, nullptr,
                                        &bad_column)) {
                t.conversion.node = node;
                t.conversion.column = bad_column;
                t.conversion.name = column_names[bad_column - 1];
                ereport(ERROR, (errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
                                errmsg_internal("node \"%s\": %s", node, bad)));
            }
            break;
        }
        case 'D': {
            (void)GetU32(c);
            bool success = GetU8(c) != 0;
            (void)GetF64(c);
            char *state = GetStr(c);
            char *error = GetText(c);
            char *detail = GetText(c);
            char *hint = GetText(c);
            if (!success) {
                channel::Finish();
                ReportNodeError(ERROR, node, state, error, detail, hint, false);
            }
            break;
        }
        default:
            Malformed();
        }
    }
    TypedRowsEnd(t);
    channel::Finish();
}

// ---- parallel_query_rows ------------------------------------------------------------------

enum OnError { ON_ERROR_WARNING, ON_ERROR_ERROR, ON_ERROR_IGNORE };

struct RowsNode {
    char *name;
    Datum name_value; // the first column's value
    char **columns;   // names, for messages
    int64 rows;       // rows stored
    bool failed;
};

// Rows are stored as they arrive, a node's at a time in runs; a node that fails after some of
// its rows were stored has them filtered out at the end (rare: an error after rows).
struct Run {
    uint32 node;
    int64 rows;
};

void NodeFailedRows(RowsNode &n, int on_error, const char *state, const char *error,
                    const char *detail, const char *hint)
{
    n.failed = true;
    if (on_error == ON_ERROR_ERROR) // the request is abandoned: the other nodes are cancelled
        ReportNodeError(ERROR, n.name, state, error, detail, hint, false);
    if (on_error == ON_ERROR_WARNING)
        ReportNodeError(WARNING, n.name, state, error, detail, hint, true);
}

void RunParallelRows(FunctionCallInfo fcinfo, const char *message, Size len, int on_error)
{
    InitMaterializedSRF(fcinfo, MAT_SRF_USE_EXPECTED_DESC);
    ReturnSetInfo *rsinfo = reinterpret_cast<ReturnSetInfo *>(fcinfo->resultinfo);
    TypedRows t;
    TypedRowsBegin(t, rsinfo, 1, "parallel_query_rows");

    channel::Submit(message, len);
    RowsNode *nodes = nullptr;
    uint32 nnodes = 0;
    int64 nruns = 0, runs_capacity = 64;
    Run *runs = static_cast<Run *>(palloc(sizeof(Run) * runs_capacity));
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
            nodes = static_cast<RowsNode *>(palloc0(sizeof(RowsNode) * (nnodes + 1)));
            for (uint32 i = 0; i < nnodes; i++) {
                nodes[i].name = GetStr(c);
                nodes[i].name_value = InputFunctionCall(&t.meta->attinfuncs[0], nodes[i].name,
                                                        t.meta->attioparams[0],
                                                        t.meta->atttypmods[0]);
            }
            break;
        case 'C': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            RowsNode &n = nodes[i];
            if (n.failed)
                break;
            int ncols = static_cast<int>(GetU32(c));
            CheckColumnCount(t, n.name, ncols);
            n.columns = GetColumnNames(c, ncols);
            break;
        }
        case 'R': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            RowsNode &n = nodes[i];
            if (n.failed)
                break;
            int bad_column = 0;
            if (char *bad = PutTypedRow(t, rsinfo->setResult, c, n.name, n.columns, &n.name_value,
                                        &bad_column)) {
                char *error = psprintf("column %d (\"%s\"): %s", bad_column,
                                       n.columns[bad_column - 1], bad);
                NodeFailedRows(n, on_error, "22021", error, "", "");
                break;
            }
            n.rows++;
            if (nruns > 0 && runs[nruns - 1].node == i) {
                runs[nruns - 1].rows++;
            } else {
                if (nruns == runs_capacity) {
                    runs_capacity *= 2;
                    runs = static_cast<Run *>(repalloc(runs, sizeof(Run) * runs_capacity));
                }
                runs[nruns++] = Run{i, 1};
            }
            break;
        }
        case 'D': {
            uint32 i = GetU32(c);
            if (i >= nnodes)
                Malformed();
            RowsNode &n = nodes[i];
            bool success = GetU8(c) != 0;
            (void)GetF64(c);
            char *state = GetStr(c);
            char *error = GetText(c);
            char *detail = GetText(c);
            char *hint = GetText(c);
            if (!success && !n.failed)
                NodeFailedRows(n, on_error, state, error, detail, hint);
            break;
        }
        default:
            Malformed();
        }
    }
    TypedRowsEnd(t);
    channel::Finish();

    bool filter = false;
    for (uint32 i = 0; i < nnodes; i++)
        filter = filter || (nodes[i].failed && nodes[i].rows > 0);
    if (!filter)
        return;
    MemoryContext old = MemoryContextSwitchTo(rsinfo->econtext->ecxt_per_query_memory);
    Tuplestorestate *kept = tuplestore_begin_heap((rsinfo->allowedModes &
                                                   SFRM_Materialize_Random) != 0,
                                                  false, work_mem);
    MemoryContextSwitchTo(old);
    TupleTableSlot *slot = MakeSingleTupleTableSlot(rsinfo->setDesc, &TTSOpsMinimalTuple);
    tuplestore_rescan(rsinfo->setResult);
    for (int64 r = 0; r < nruns; r++) {
        for (int64 j = 0; j < runs[r].rows; j++) {
            if (!tuplestore_gettupleslot(rsinfo->setResult, true, false, slot))
                elog(ERROR, "parallel_query_rows lost a row");
            if (!nodes[runs[r].node].failed)
                tuplestore_puttupleslot(kept, slot);
        }
    }
    ExecDropSingleTupleTableSlot(slot);
    tuplestore_end(rsinfo->setResult);
    rsinfo->setResult = kept;
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

// The `nodes` argument (NULL: every enabled node).
void NodesArg(FunctionCallInfo fcinfo, int n, protocol::Request &request)
{
    if (PG_ARGISNULL(n))
        return;
    request.has_nodes = true;
    ArrayItems items = pg::Call([&] {
        ArrayItems out{0, nullptr, nullptr};
        ArrayType *array = PG_GETARG_ARRAYTYPE_P(n);
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

// Fields every request carries.
void CommonFields(FunctionCallInfo fcinfo, protocol::Request &request, int timeout_arg)
{
    request.timeout_ms = TimeoutArg(fcinfo, timeout_arg);
    request.acquire_timeout_ms = peerpool_acquire_timeout;
    // Rows come back in this database's encoding. GetDatabaseEncodingName cannot error.
    request.encoding = GetDatabaseEncodingName();
}

} // namespace

static Datum ParallelQuery(FunctionCallInfo fcinfo)
{
    RequireShared();
    protocol::Request request;
    request.kind = protocol::REQUEST_KIND_PARALLEL;
    request.sql = TextArg(fcinfo, 0, "sql");
    NodesArg(fcinfo, 1, request);
    CommonFields(fcinfo, request, 2);
    std::string message = protocol::EncodeRequest(request);
    const char *data = message.data();
    Size size = message.size();
    pg::Call([&] { RunParallelQuery(fcinfo, data, size); });
    return (Datum)0;
}

static Datum ParallelQueryRows(FunctionCallInfo fcinfo)
{
    RequireShared();
    protocol::Request request;
    request.kind = protocol::REQUEST_KIND_PARALLEL; // the same fan-out; only the rows differ
    request.sql = TextArg(fcinfo, 0, "sql");
    NodesArg(fcinfo, 1, request);
    CommonFields(fcinfo, request, 2);
    std::string mode = TextArg(fcinfo, 3, "on_error");
    int on_error = ON_ERROR_WARNING;
    if (mode == "warning")
        on_error = ON_ERROR_WARNING;
    else if (mode == "error")
        on_error = ON_ERROR_ERROR;
    else if (mode == "ignore")
        on_error = ON_ERROR_IGNORE;
    else
        throw Error(ERRCODE_INVALID_PARAMETER_VALUE,
                    Format("invalid value for on_error: \"%s\"", mode.c_str()), "",
                    "Valid values are \"warning\", \"error\" and \"ignore\".");
    std::string message = protocol::EncodeRequest(request);
    const char *data = message.data();
    Size size = message.size();
    pg::Call([&] { RunParallelRows(fcinfo, data, size, on_error); });
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
    CommonFields(fcinfo, request, 2);
    std::string message = protocol::EncodeRequest(request);
    const char *data = message.data();
    Size size = message.size();
    pg::Call([&] { RunPoolQuery(fcinfo, data, size); });
    return (Datum)0;
}

} // namespace peerpool

PEERPOOL_SQL_FUNCTION(parallel_query, peerpool::ParallelQuery)
PEERPOOL_SQL_FUNCTION(parallel_query_rows, peerpool::ParallelQueryRows)
PEERPOOL_SQL_FUNCTION(pool_query, peerpool::PoolQuery)
