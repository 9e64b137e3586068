# The two set-up commands. Both create .venv and install into it (CPU torch on a machine without an
# NVIDIA GPU, the CUDA build otherwise), then run.
.PHONY: run test lint

run:
	bash scripts/install.sh
	.venv/bin/flux2-bench

test:
	bash scripts/install.sh test
	.venv/bin/pytest -q

lint:
	.venv/bin/ruff format --check . && .venv/bin/ruff check .
