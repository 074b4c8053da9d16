# pg_peerpool -- PGXS build.
#
#   make              build the extension (needs the PostgreSQL server headers)
#   make install      install into the server found by PG_CONFIG
#   make test         install missing dependencies, build, install, run every test
#   make test-full    make test + the whole TAP suite on the ASan+UBSan build + opt-in profiles
#   make demo         same bootstrap, then a throwaway local fleet on loopback
#   make SANITIZE=1   ASan + UBSan build (scripts/sanitize_check.sh runs the regression suite on it)
#   make CXX=clang++  build with clang instead of g++ (docs/compatibility.md)
#   make format-check .clang-format / .editorconfig check (scripts/format_check.sh)
#
# `test` and `demo` work before the server headers exist: they live outside the PGXS include.

.DEFAULT_GOAL := all

EXTENSION = pg_peerpool
DATA = sql/pg_peerpool--0.1.0.sql sql/pg_peerpool--0.2.0.sql sql/pg_peerpool--0.1.0--0.2.0.sql
MODULE_big = pg_peerpool

SRCS = src/pg_peerpool.cpp \
       src/guc.cpp \
       src/shmem.cpp \
       src/pg/guard.cpp \
       src/pool/conninfo.cpp \
       src/pool/node_config.cpp \
       src/pool/connection.cpp \
       src/pool/events.cpp \
       src/pool/node.cpp \
       src/pool/protocol.cpp \
       src/pool/resolver.cpp \
       src/pool/canceller.cpp \
       src/pool/routing.cpp \
       src/worker/pool_manager.cpp \
       src/worker/registry_sync.cpp \
       src/worker/request.cpp \
       src/worker/heartbeat.cpp \
       src/sql/install.cpp \
       src/sql/registry.cpp \
       src/sql/health.cpp \
       src/sql/stats.cpp \
       src/sql/channel.cpp \
       src/sql/query.cpp \
       src/sql/selftest.cpp \
       src/sql/pool_manager_status.cpp
ifeq ($(SANITIZE),1)
SRCS += src/sanitizer_options.cpp
endif
OBJS = $(SRCS:.cpp=.o)

REGRESS = install registry pool query boundary privileges fidelity isolation
REGRESS_OPTS = --temp-config=$(srcdir)/test/regress.conf --temp-instance=tmp_check_regress \
               --use-existing
# The pool manager lives in peerpool.database (postgres): the tests run there too.
override CONTRIB_TESTDB = postgres
TAP_TESTS = 1

ifneq ($(wildcard /usr/lib/postgresql/15/bin/pg_config),)
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
else
PG_CONFIG ?= pg_config
endif
PGXS := $(shell $(PG_CONFIG) --pgxs 2>/dev/null)

.PHONY: test test-full demo bench deps sanitize-check installcheck-sanitize format-check

test:
	bash scripts/test.sh

test-full:
	bash scripts/test_full.sh

demo:
	bash scripts/demo.sh

bench:
	bash scripts/bench.sh

deps:
	bash scripts/deps.sh

sanitize-check:
	bash scripts/sanitize_check.sh

format-check:
	bash scripts/format_check.sh

ifneq ($(wildcard $(PGXS)),)

# Our code: C++17, strict warnings, header dependency tracking.
PG_CXXFLAGS = -std=c++17 -Wall -Wextra -Werror -Wno-missing-field-initializers \
              -fno-omit-frame-pointer -MMD -MP
SHLIB_LINK_INTERNAL = $(libpq)
SHLIB_LINK = -lstdc++

ifeq ($(SANITIZE),1)
PG_CXXFLAGS += -fsanitize=address,undefined -fno-sanitize-recover=undefined -O1
SHLIB_LINK += -fsanitize=address,undefined
endif

# The server was built with LLVM; C++ bitcode for JIT inlining buys nothing here.
override with_llvm = no

include $(PGXS)

# CXXFLAGS come from pg_config, i.e. from the compiler PostgreSQL was built with (gcc on
# Debian). clang rejects gcc's `-Wimplicit-fallthrough=N` spelling and would fail -Werror on
# it, so with clang (`make CXX=clang++`) it becomes clang's `-Wimplicit-fallthrough`, and
# options clang does not know are dropped.
CXX_IS_CLANG := $(shell $(CXX) --version 2>/dev/null | grep -q clang && echo yes)
ifeq ($(CXX_IS_CLANG),yes)
GCC_ONLY_CXXFLAGS = -Wformat-truncation% -Wno-format-truncation -Wstringop-truncation% \
                    -Wno-stringop-truncation -fexcess-precision=%
override CXXFLAGS := $(patsubst -Wimplicit-fallthrough=%,-Wimplicit-fallthrough,\
                     $(filter-out $(GCC_ONLY_CXXFLAGS),$(CXXFLAGS)))
endif

# PostgreSQL's headers are system headers for us, so their warnings do not fail -Werror.
override CPPFLAGS := -I$(srcdir)/include -isystem $(includedir_server) \
                     -isystem $(includedir_internal) -isystem $(libpq_srcdir) \
                     $(filter-out -I$(includedir_server) -I$(includedir_internal),$(CPPFLAGS))

-include $(OBJS:.o=.d)

# TAP tests find their fleet helper (t/PeerpoolFleet.pm) without extra flags.
PG_PROVE_FLAGS += -I ./t

# pg_regress alone (the sanitizer run preloads libasan into the server through the environment).
installcheck-sanitize:
	$(pg_regress_installcheck) $(REGRESS_OPTS) $(REGRESS)

EXTRA_CLEAN = $(OBJS:.o=.d) tmp_check_regress

else

all install installcheck installcheck-regress:
	@echo "PostgreSQL server headers (PGXS) not found via $(PG_CONFIG)."
	@echo "Run 'make deps' (or 'make test' / 'make demo', which install them) first."
	@exit 1

endif
