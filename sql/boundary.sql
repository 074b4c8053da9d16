-- The C/C++ boundary (STYLE.md): errors cross it with their SQLSTATE, message, detail and hint,
-- and every C++ destructor runs first (the live-object counter returns to zero).
\set VERBOSITY default
\set SHOW_CONTEXT never

SELECT peerpool._boundary_selftest('ok') AS ok;
SELECT peerpool._boundary_selftest('live_objects') AS live_after_ok;

-- A PostgreSQL ERROR raised inside C++ code that owns heap objects.
SELECT peerpool._boundary_selftest('pg_error');
SELECT peerpool._boundary_selftest('live_objects') AS live_after_pg_error;

-- A real error from the executor, reached through SPI from C++.
SELECT peerpool._boundary_selftest('spi_error');
SELECT peerpool._boundary_selftest('live_objects') AS live_after_spi_error;

-- C++ exceptions of every kind.
SELECT peerpool._boundary_selftest('peerpool_error');
SELECT peerpool._boundary_selftest('cpp_exception');
SELECT peerpool._boundary_selftest('bad_alloc');
SELECT peerpool._boundary_selftest('unknown_exception');
SELECT peerpool._boundary_selftest('no such mode');
SELECT peerpool._boundary_selftest('live_objects') AS live_after_exceptions;

-- The SQLSTATEs, checked by code rather than by text.
DO $$
DECLARE
    m text;
    state text;
BEGIN
    FOREACH m IN ARRAY ARRAY['pg_error', 'spi_error', 'peerpool_error', 'cpp_exception',
                             'bad_alloc', 'unknown_exception'] LOOP
        BEGIN
            PERFORM peerpool._boundary_selftest(m);
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE;
            RAISE NOTICE '% -> %', m, state;
        END;
    END LOOP;
END $$;

-- The session is healthy after all of that: a subtransaction-heavy loop still works and the
-- counter is still zero.
SELECT count(*) AS survived FROM generate_series(1, 3);
SELECT peerpool._boundary_selftest('live_objects') AS live_at_end;
