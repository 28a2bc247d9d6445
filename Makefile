# pg_store — build, test, demo and benchmarks. Run as root on Debian (PostgreSQL 15).
# Every target installs what it needs first (`make deps`), skipping what is there.

PG_CONFIG   ?= /usr/lib/postgresql/15/bin/pg_config
PGRX        := 0.18.1
CARGO       ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)
APT_PKGS    := postgresql-15 postgresql-server-dev-15 postgresql-15-cron libclang-dev clang sudo time python3 pkg-config
DEMO_DIR    ?= /tmp/pg_store_demo
TEST_PGDATA ?= /tmp/pg_store_pgrx_test
# Where `cargo pgrx package` stages the files `make install` copies into place.
STAGE       := target/release/pg_store-pg15

.PHONY: help deps lint install install-staged package demo demo-stop test test-engine test-pg test-integration test-citus test-package test-upgrade chaos fuzz fuzz-build bench bench-engine bench-mmap bench-scale bench-citus bench-versus clean

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

# Formatting and lints, as CI checks them: rustfmt.toml, clippy with warnings as errors, and sql/'s install-time SQL naming pg_catalog's operators and functions (tests/lint_sql.py, after its self-test).
lint: deps
	$(CARGO) fmt --all --check
	$(CARGO) fmt --check --manifest-path fuzz/Cargo.toml
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 tests/lint_sql.py --self-test
	python3 tests/lint_sql.py sql/*.sql

# Build (release) and install the extension into the system PostgreSQL 15, atomically:
# each file is written beside its old copy and renamed over it, so servers running the
# old library keep their mapping (overwriting it in place crashes them).
install: deps
	rm -rf $(STAGE)
	$(CARGO) pgrx package --pg-config $(PG_CONFIG) >/dev/null
	@$(MAKE) --no-print-directory install-staged

# The install step alone: copy the files `cargo pgrx package` staged in $(STAGE) into place.
install-staged:
	@test -f $(STAGE)$$($(PG_CONFIG) --pkglibdir)/pg_store.so || { echo "nothing staged in $(STAGE): run make install"; exit 1; }
	@cd $(STAGE) && find . -type f | while read -r f; do \
		dst=/$${f#./}; mkdir -p "$$(dirname "$$dst")"; \
		cp "$$f" "$$dst.new.$$$$" && chmod 644 "$$dst.new.$$$$" && mv -f "$$dst.new.$$$$" "$$dst"; \
	done
	@echo "installed pg_store into $$($(PG_CONFIG) --pkglibdir) and $$($(PG_CONFIG) --sharedir)/extension"

# A Debian package, target/debian/postgresql-15-pg-store_<version>-1_<arch>.deb (install with apt install ./…deb).
package: deps
	rm -rf $(STAGE)
	$(CARGO) pgrx package --pg-config $(PG_CONFIG) >/dev/null
	@bash tests/package.sh build

# Fresh machine to a finished ingest: install, start a local cluster, ingest a sample directory, show store.status.
demo: install
	@bash tests/demo.sh $(DEMO_DIR)

# Stop the demo cluster.
demo-stop:
	@bash tests/demo.sh $(DEMO_DIR) stop

# Everything CI runs: lints, engine tests, pgrx tests, then (release build installed) integration tests, the Citus tests, the chaos campaign, the Debian package, the upgrade from 0.1.0, and the fuzz build.
test: deps lint test-engine test-pg install test-integration test-citus chaos test-package test-upgrade fuzz-build

# Engine, test-kit and command tests: no database and no PostgreSQL headers needed.
test-engine:
	$(CARGO) test -p store-engine -p store-testkit -p store-cli

# #[pg_test]s (and the extension crate's unit tests) inside a pgrx-managed PostgreSQL, run as the postgres user.
test-pg: deps
	rm -rf $(TEST_PGDATA) && mkdir -p $(TEST_PGDATA) && chown postgres $(TEST_PGDATA)
	chmod a+rwx target 2>/dev/null || true
	$(CARGO) pgrx test pg15 tests:: --runas postgres --pgdata $(TEST_PGDATA)/data

# Integration tests: clusters the harness starts itself, with pg_store and pg_cron preloaded (needs `make install`), grouped by behaviour: ingest, recovery, ledger, security, targets, and operations (databases, retention, dump and restore, standbys).
test-integration:
	$(CARGO) test --test ingest --test recovery --test ledger --test security --test targets --test operations -- --test-threads=2

# The Debian package (built from the staged release build): apt install, a cluster, CREATE EXTENSION, an ingest, apt remove; then the build under test is installed again.
test-package: install
	@bash tests/package.sh

# ALTER EXTENSION pg_store UPDATE from 0.1.0 (built once from tests/fixtures/pg_store-0.1.0.tar.gz, commit fd2eb5c, into target/upgrade-0.1.0): a queued job runs, the ledger skips, the schema equals a fresh install's; and where a database owner planted operators and functions in public (tests/planted.sh), no pg_store object captures one and none runs.
test-upgrade: install
	@bash tests/upgrade.sh

# pg_store on a Citus cluster it starts itself (coordinator + 2 workers on 127.0.0.1). Uses an installed Citus 13.2, or
# builds it from the tarball CITUS_SRC names (or downloads the pinned release); without either it says how to get it, and
# skips — except under CI, where that fails.
test-citus:
	@bash tests/install-citus.sh || { rc=$$?; [ -z "$$CI" ] && [ $$rc = 2 ] && echo "SKIPPED: no Citus tests ran"; [ -z "$$CI" ] && [ $$rc = 2 ]; }
	@if [ -f "$$($(PG_CONFIG) --pkglibdir)/citus.so" ]; then $(CARGO) test --test citus -- --test-threads=1; fi

# The reliability campaign (tests/chaos/, a module per kind of fault): faults, odd files, concurrency, load and hostile callers
# against a local cluster it starts itself; ends with one summary line, non-zero on any loss.
chaos: install
	PG_STORE_CHAOS=1 $(CARGO) test --test chaos

# Build the fuzz target where a nightly toolchain is installed (CI checks it compiles); says so when skipped.
fuzz-build:
	@if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then \
		$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked --quiet; \
		cd fuzz && $(CARGO) +nightly fuzz build read_normalize; \
	else echo "SKIPPED: no nightly toolchain, the fuzz target was not built"; fi

# Fuzz the reader and normaliser against the in-memory oracle (FUZZ_SECONDS, default 600; needs the nightly toolchain).
fuzz: deps
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked --quiet
	cd fuzz && $(CARGO) +nightly fuzz run read_normalize -- -max_total_time=$${FUZZ_SECONDS:-600} -max_len=4096

# store-dedup against sort -u on 1 GiB (make bench-engine SIZES="32M 128M 256M" for the scaling check).
bench-engine:
	@bash benches/engine.sh $(DATA)

# The engine's input reading (4 MiB read calls) against a memory map of each file (memmap2), on the 1 GiB of bench-engine, from the page cache.
bench-mmap:
	@$(CARGO) build --release --quiet -p store-cli --bin store-readbench --bin store-gen
	@d=target/bench/engine-128M; [ -f $$d/.done ] || { rm -rf $$d; target/release/store-gen $$d --files 8 --size 128M --dup 0.3 --seed 7 >/dev/null && touch $$d/.done; }; \
	target/release/store-readbench $$d

clean:
	$(CARGO) clean

# pg_store against sort -u | COPY and COPY + INSERT ON CONFLICT on 1 GiB (DATA=dir to use other data; RUNS=3 for medians).
bench: install
	@bash benches/pg.sh $(DATA)

# An older build (OLD=prefix, see the script's header) against the installed one, alternating runs on 1 GiB.
bench-versus: install
	@bash benches/versus.sh $(DATA)

# pg_store at scale against sort -u | COPY and the DBA pipeline: 10 GiB into an empty table, 1 GiB of new files into it, a kill -9 at 90 % (about 40 minutes, 60 GB of disk; SIZE_G=10).
bench-scale: install
	@bash benches/scale.sh

# pg_store against COPY into the same Citus distributed table (a 3-node cluster on this machine), side by side; about 20 minutes.
bench-citus: install
	@bash tests/install-citus.sh
	@bash benches/citus.sh
