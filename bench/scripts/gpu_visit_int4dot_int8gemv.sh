python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:src
python3 bench/scripts/gpu_quant_kernels.py --sweep --only int4:16,int4:64 --no-bench --jobs 12 --budget-s 150 --reps 30 2>&1 | grep -v -i warn | tail -12
python3 bench/scripts/gpu_gemv_tune.py --fmt int8 --budget 25 --dequant 1 2>&1 | grep -v -i warn
