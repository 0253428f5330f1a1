# issue 3's cases, forward+backward and forward+JVP through flash_attention (Mosaic), this session's code
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
timeout 400 python3 benchmarks/attention.py --bench --backend mosaic --sizes 15600,16384,18720 --modes fb,jvp \
  --tf-cases 5:1,6:3 --skip-decode --out /tmp/b > $OUT/fb_jvp.log 2>&1
grep -E " (fb|jvp) " $OUT/fb_jvp.log | grep -E "mosaic |cudnn |xla " | cut -c1-140
