# Two commands on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SIM    := data/simulated
RUNS   := runs

.PHONY: run test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job: the paper's simulated data (made once), conf/paper.yaml, an embedded local Dask cluster.
run: $(STAMP)
	@test -f $(SIM)/_SUCCESS || $(BIN)/mfsim simulate conf/paper.yaml --out $(SIM)
	$(BIN)/mfsim run conf/paper.yaml --input $(SIM) --output $(RUNS)

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(RUNS) data/simulated
