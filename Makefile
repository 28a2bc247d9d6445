# pg_store — build, test, demo and benchmarks. Run as root on Debian (PostgreSQL 15).
# Every target installs what it needs first (`make deps`), skipping what is there.

PG_CONFIG   ?= /usr/lib/postgresql/15/bin/pg_config
PGBIN       := $(shell dirname $(PG_CONFIG))
PGRX        := 0.18.1
CARGO       ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
APT_PKGS    := postgresql-15 postgresql-server-dev-15 postgresql-15-cron libclang-dev clang sudo time python3 pkg-config
DEMO_DIR    ?= /tmp/pg_store_demo
TEST_PGDATA ?= /tmp/pg_store_pgrx_test

.PHONY: help deps install demo demo-stop test test-engine test-pg test-integration bench bench-engine chaos fuzz clean

# List the targets.
help:
	@grep -B1 -E '^[a-z-]+:' Makefile | grep -E '^#' | sed 's/^# //'

# Install the system packages and cargo-pgrx $(PGRX) if missing (idempotent).
deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@if ! $(CARGO) pgrx --version 2>/dev/null | grep -q "$(PGRX)"; then \
		echo "installing cargo-pgrx $(PGRX) (about 4 minutes)"; $(CARGO) install cargo-pgrx --version $(PGRX) --locked --quiet; fi
	@grep -qs 'pg15' $(HOME)/.pgrx/config.toml || $(CARGO) pgrx init --pg15 $(PG_CONFIG) >/dev/null

# Build (release) and install the extension into the system PostgreSQL 15.
install: deps
	$(CARGO) pgrx install --release --pg-config $(PG_CONFIG)

# Fresh machine to a finished ingest: install, start a local cluster, ingest a sample directory, show store.status.
demo: install
	@bash tests/demo.sh $(DEMO_DIR)

# Stop the demo cluster.
demo-stop:
	@bash tests/demo.sh $(DEMO_DIR) stop

# Everything CI runs: engine tests, pgrx tests, then (release build installed) integration tests against real clusters.
test: deps test-engine test-pg install test-integration

# Engine and command tests: no database needed.
test-engine:
	$(CARGO) test --lib --bins --test store_dedup

# #[pg_test]s inside a pgrx-managed PostgreSQL, run as the postgres user.
test-pg: deps
	rm -rf $(TEST_PGDATA) && mkdir -p $(TEST_PGDATA) && chown postgres $(TEST_PGDATA)
	chmod a+rwx target 2>/dev/null || true
	$(CARGO) pgrx test pg15 tests:: --runas postgres --pgdata $(TEST_PGDATA)/data

# Integration tests: clusters the harness starts itself, with pg_store and pg_cron preloaded (needs `make install`).
test-integration:
	$(CARGO) test --test extension -- --test-threads=2

# The reliability campaign (tests/chaos.rs): faults, odd files, concurrency, load and hostile callers
# against a local cluster it starts itself; ends with one summary line, non-zero on any loss.
chaos: install
	PG_STORE_CHAOS=1 $(CARGO) test --release --test chaos

# Fuzz the reader and normaliser against the in-memory oracle (FUZZ_SECONDS, default 600; needs the nightly toolchain).
fuzz: deps
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked --quiet
	cd fuzz && $(CARGO) +nightly fuzz run read_normalize -- -max_total_time=$${FUZZ_SECONDS:-600} -max_len=4096

# store-dedup against sort -u on 1 GiB (make bench-engine SIZES="32M 128M 256M" for the scaling check).
bench-engine:
	@bash benches/engine.sh $(DATA)

clean:
	$(CARGO) clean

# pg_store against sort -u | COPY and COPY + INSERT ON CONFLICT on 1 GiB (DATA=dir to use other data; RUNS=3 for medians).
bench: install
	@bash benches/pg.sh $(DATA)
