# Sourced by the GPU visit scripts: $OUT, the carried wheels (gguf) installed into /tmp/site,
# PYTHONPATH, the card's name, and P: pytest with the same paths.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:src
nvidia-smi --query-gpu=name --format=csv,noheader
P=(python3 -m pytest -q -o "pythonpath=/tmp/site src" -p no:cacheprovider)
