# The two set-up commands of the README: `make quickstart` and `make test`.
# Everything installs into .venv; torch is installed first from the pinned CPU wheel so that no
# later step can pull a CUDA build, and every other package is pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CORPORA := examples/corpora
QS := data/quickstart
QSRUNS := runs/quickstart

.PHONY: install system-deps quickstart test test-fast bench bench-convert bench-loader bench-train bench-eval \
	bench-report clean-quickstart

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet --upgrade "pip==25.3"
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -c "import torch, sys; sys.exit('a CUDA torch build was installed; expected the CPU wheel' if torch.version.cuda else 0)"
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(VENV)/bin/xsam data list-corpora
	$(VENV)/bin/xsam data make-examples --corpora $(CORPORA) --out data/examples
	$(VENV)/bin/xsam pipeline plan pipelines/quickstart.yaml
	$(VENV)/bin/xsam pipeline run pipelines/quickstart.yaml
	$(VENV)/bin/xsam data info $(QS)/*/
	$(VENV)/bin/xsam data mix examples/mixtures/stage3-quickstart.yaml
	$(VENV)/bin/xsam data stream examples/mixtures/stage3-quickstart.yaml --world-size 2 --rank 0 --workers 2 --limit 8
	$(VENV)/bin/xsam model summary --config configs/model/xsam-paper.yaml
	test -d $(QSRUNS)/tiny-init || $(VENV)/bin/xsam model init --config configs/model/tiny.yaml --random --out $(QSRUNS)/tiny-init
	$(VENV)/bin/xsam predict --model configs/model/tiny.yaml --checkpoint $(QSRUNS)/tiny-init \
		--image $(CORPORA)/coco_panoptic/val2017/000000439180.jpg --task refseg \
		--prompt "the horse on the left" --out $(QSRUNS)/predict-horse.png
	$(VENV)/bin/xsam runs compare --experiment xsam-quickstart --metric refcoco-val --metric coco-panoptic-val
	@echo "look at the runs: $(VENV)/bin/xsam ui   (then open http://127.0.0.1:5000, experiment xsam-quickstart)"

# The test fixtures start a PostgreSQL-backed MLflow server, GCG's METEOR (pycocoevalcap) runs a Java jar and the
# UI check drives a headless Chromium: install what is missing (and fail loudly when that is impossible).
system-deps:
	@missing=""; \
	if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; else missing="$$missing postgresql"; fi; \
	if command -v java >/dev/null; then :; else missing="$$missing default-jre-headless"; fi; \
	if command -v chromium >/dev/null; then :; else missing="$$missing chromium"; fi; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (the tests' MLflow store / METEOR's Java runtime / the UI check's browser)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null \
			|| { echo "could not install$$missing: install them with your package manager" >&2; exit 1; }; \
		command -v java >/dev/null || { echo "java is still missing after installing default-jre-headless" >&2; exit 1; }; \
	fi

test: install system-deps
	$(VENV)/bin/pytest

test-fast: install system-deps
	$(VENV)/bin/pytest -m "not slow"

# Benchmarks (docs/benchmarks.md): each script replaces its results block and writes its JSON; report.py then
# draws the plots and the summary from the JSON there. One after the other (never in parallel: they measure).
# BENCH_ARGS goes to every script (`make bench BENCH_ARGS=--quick`: reduced sizes, a check that they run);
# XSAM_BENCH_DOCS=DIR/benchmarks.md writes a copy of the page, and its plots, under DIR instead of docs/.
BENCH_ARGS ?=
BENCH_RESULTS ?= benchmarks/out/results
bench_run = mkdir -p $(BENCH_RESULTS) && $(PY) benchmarks/$(1).py --write-docs --json $(BENCH_RESULTS)/$(1).json $(BENCH_ARGS)
bench_report = $(PY) benchmarks/report.py --results $(BENCH_RESULTS) --write-docs

bench: install
	$(call bench_run,convert)
	$(call bench_run,loader)
	$(call bench_run,train)
	$(call bench_run,eval)
	$(bench_report)

bench-convert bench-loader bench-train bench-eval: bench-%: install
	$(call bench_run,$*)
	$(bench_report)

bench-report:
	$(bench_report)

clean-quickstart:
	rm -rf $(QS) $(QSRUNS) xsam-runs/pipelines/quickstart xsam-runs/quickstart-*
