export PYTHONUNBUFFERED=1 PYTHONPATH=. XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
for L in 8192 4096; do timeout 100 python3 experiments/probe_tile_bandwidth.py --gates-only --gate-mixers se --length $L --candidate se:num_stages_bwd=4 --candidate se:num_stages_bwd=5 --candidate se:num_stages_bwd=6 --candidate se:num_stages_bwd=8 --candidate se:num_stages_bwd=4,num_segments_bwd=4 --out $OUT/probe_se_stages_$L.md 2>&1 | grep "^|"; done
B="--ops floor,se,mha --headline --no-xla --lengths 4096,8192 --rounds 3"
for bs in "" "--block-sizes se:num_stages_bwd=4"; do
timeout 100 python3 -m sh2_jax.cli bench ops $B $bs --out $OUT/ops_$(echo $bs | tr -c 'a-z0-9' _).md 2>&1 | grep -A4 "^| ratio"; done
