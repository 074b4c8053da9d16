-- CREATE EXTENSION and the objects it makes (SPEC sections 1, 4, 8).
CREATE EXTENSION pg_peerpool;

SELECT extname, extversion, extrelocatable, n.nspname
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE extname = 'pg_peerpool';

-- Every object the extension owns.
SELECT pg_describe_object(classid, objid, 0) AS object
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_peerpool')
   AND deptype = 'e'
 ORDER BY 1;

-- The registry table is dumped by pg_dump.
SELECT extconfig::regclass[] FROM pg_extension WHERE extname = 'pg_peerpool';

-- Every GUC of SPEC section 6, with its default, unit and context (boot_val: test/regress.conf
-- changes some settings of the test instance).
SELECT name, boot_val AS default, unit, context, vartype
  FROM pg_settings WHERE name LIKE 'peerpool.%' ORDER BY name;

-- The prefix is reserved: a misspelt GUC is refused.
SET peerpool.no_such_setting = 1;

-- Second installation in the same database is refused by PostgreSQL itself.
CREATE EXTENSION pg_peerpool;

-- The pool manager runs in this database.
SELECT backend_type, datname FROM pg_stat_activity
 WHERE backend_type = 'pg_peerpool pool manager';
