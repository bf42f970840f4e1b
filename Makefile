# Set-up and entry points. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# nothing may reach a hub: weights and data come from local paths or are generated
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export YOLO_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# Prefect's state lives with mgllava's (as `mgllava` sets it for every command), never in ~/.prefect
export PREFECT_HOME ?= $(or $(MGLLAVA_HOME),$(HOME)/.mgllava)/prefect
export DS_ACCELERATOR ?= cpu

.PHONY: install demo down test lint clean

install: $(VENV)/.installed

# constraints.txt: the exact tested set; pyproject.toml holds the ranges and pins torch==2.14.1 /
# torchvision==0.29.1 (see the README's install notes)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --progress-bar off -c constraints.txt -e '.[dev]'
	@echo "compiling DeepSpeed's CPU communication op (once per environment; else the first training stage does)"
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		get_accelerator().create_op_builder('ShareMemCommBuilder').load(verbose=False)"
	touch $@

# The main job on the embedded default (tiny preset, shapes world), as users run it:
# the local Prefect server + worker, then the full-train deployment, then the scores from DuckDB.
demo: install
	$(BIN)/mgllava up
	PREFECT_API_URL=$$($(BIN)/python -c "import mgllava.services as s; print(s.status()['api_url'])") \
		$(BIN)/prefect deployment run mgllava/full-train --watch --watch-timeout 7200
	$(BIN)/mgllava results

test: install
	$(BIN)/python -m pytest -q

down: install
	$(BIN)/mgllava down

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache

# The Prefect UI in a headless Chromium (apt-get install chromium): the newest finished flow run on the
# server `mgllava up` started must show the project's log lines and its pictures; screenshots of the run
# page, its Artifacts tab and each picture under $MGLLAVA_HOME/ui-check (scripts/ui_check.py).
.PHONY: ui-check
ui-check: install
	$(BIN)/python scripts/ui_check.py
