#!/usr/bin/env bash
# The prepared device check for issue 13 (one call on a lent H200): the losses on CUDA, the loss and step
# benches (bench/step_speed.py), and loss=jsd end to end. Wheels: bash ../shared/gpu/prepare_wheels.sh .whl
# plus pytest, pluggy, iniconfig (pip download --python-version 3.12); carry .whl. Results land in $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warning | tail -2
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"; } | tee $OUT/env.txt
echo "== 1. losses on CUDA"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/distill/test_losses.py -k "cuda or bf16 or chunked" 2>&1 | tail -4 | tee $OUT/tests.txt
echo "== 2. the loss alone"
timeout 170 python3 bench/step_speed.py --device cuda --part loss --dtype bf16 --tokens 8192 32768 --hidden 2048 \
  --impls chunked naive liger trl --chunk-bytes 0 2147483648 --out $OUT/loss.jsonl 2>&1 | grep -v "^{" | tee $OUT/loss.md
echo "== 3. a whole step"
timeout 150 python3 bench/step_speed.py --device cuda --part step --dtype bf16 --preset 0.6b 1.7b --batch 8 --seq 2048 \
  --out $OUT/step.jsonl 2>&1 | grep -v "^{" | tee $OUT/step.md
echo "== 4. the weight-gradient accumulation: 16-bit product then add, or one float32-output addmm"
timeout 40 python3 - <<'PY' 2>&1 | tee $OUT/accumulate.txt
import torch, time
g = torch.randn(1766, 151936, device="cuda", dtype=torch.bfloat16); h = torch.randn(1766, 2048, device="cuda", dtype=torch.bfloat16)
acc = torch.zeros(151936, 2048, device="cuda"); part = torch.empty(151936, 2048, device="cuda", dtype=torch.bfloat16)
def two(): acc.add_(torch.mm(g.T, h, out=part))
def one(): torch.addmm(acc, g.T, h, out_dtype=torch.float32, out=acc)
for name, f in (("bf16 product + float32 add", two), ("addmm out_dtype=float32", one)):
    try:
        f(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(10): f()
        torch.cuda.synchronize(); print(name, round((time.perf_counter() - t) / 10 * 1000, 2), "ms")
    except Exception as e: print(name, "failed:", str(e).splitlines()[0][:150])
PY
echo "== 5. loss=jsd end to end on CUDA (tiny config)"
timeout 100 python3 -m distill device=cuda loss=jsd pipeline.onpolicy.loss.divergence=jsd run_dir=/tmp/jsd cache_dir=/tmp/cache \
  logger=none threads=1 teacher.bootstrap.steps=40 +teacher.overrides.hidden_size=64 +teacher.overrides.head_dim=16 \
  +teacher.overrides.moe_intermediate_size=64 +teacher.overrides.num_hidden_layers=2 students.dense.architecture.hidden_size=64 \
  students.dense.architecture.head_dim=16 students.dense.architecture.num_hidden_layers=2 students.dense.teacher_layers=[1,0] \
  students.dense.steps=12 data.arithmetic.train_size=600 data.arithmetic.validation_size=20 data.arithmetic.test_size=40 \
  data.arithmetic.min_steps=2 data.arithmetic.max_steps=3 pipeline.offpolicy.prompts=48 pipeline.offpolicy.steps=12 \
  pipeline.offpolicy.batch_size=8 pipeline.offpolicy.max_new_tokens=48 pipeline.onpolicy.prompts=40 pipeline.onpolicy.steps=4 \
  pipeline.onpolicy.batch_size=8 pipeline.onpolicy.max_new_tokens=48 pipeline.eval.problems=24 pipeline.eval.max_new_tokens=48 \
  > $OUT/jsd.log 2>&1; echo "exit $?" | tee -a $OUT/jsd.log; grep -a "wall time\|error" $OUT/jsd.log | tail -3
