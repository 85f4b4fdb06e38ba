#!/usr/bin/env bash
# The elastic story of ufo_example/README.md on 2 CPU cores, on the digits images:
#   1. 4 processes, costs profiled, load-aware plan; stop after step 150 (checkpoint)
#   2. resize to 2 processes: resume, re-plan, reshard; stop after step 300
#   3. back to 4 processes under the restart launcher; rank 1 is SIGKILLed from outside once
#      a checkpoint past step 300 exists... (there is none before the end: it dies mid-way,
#      the job restarts from step 300 and finishes at 400)
#   bash ufo_example/demo_elastic.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 GLOG_minloglevel=2
OUT=${1:-outputs/ufo_demo}
CFG=ufo_example/configs/ufo_tiny_cpu.yaml
rm -rf "$OUT"
echo "== 1. four processes, steps 0-150"
python -m paddle.distributed.launch --nproc_per_node 4 --log_dir "$OUT/log_a" ufo_example/train.py -c $CFG \
    --threads 1 -o train.output_dir="$OUT" -o train.stop_after=150 -o train.save_every=50
echo "== 2. resize to two processes, steps 150-300"
python -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$OUT/log_b" ufo_example/train.py -c $CFG \
    --threads 1 -o train.output_dir="$OUT" -o train.stop_after=300 -o train.save_every=50
echo "== 3. back to four processes, steps 300-400, restart launcher; rank 1 killed at step ~330"
python -m paddle_semoe.elastic.launch --max_restart 1 --nproc_per_node 4 --log_dir "$OUT/log_c" \
    ufo_example/train.py -c $CFG --threads 1 -o train.output_dir="$OUT" -o train.save_every=50 &
LAUNCHER=$!
python - "$OUT" <<'PY'
import json, os, signal, sys, time
out = sys.argv[1]
deadline = time.time() + 600
while time.time() < deadline:
    try:
        steps = [json.loads(l)["step"] for l in open(f"{out}/metrics.jsonl") if '"kind": "train"' in l]
    except FileNotFoundError:
        steps = []
    if steps and max(steps) >= 330:
        pid = int(open(f"{out}/pids/rank1.pid").read())
        os.kill(pid, signal.SIGKILL)
        print(f"== killed rank 1 (pid {pid}) after step {max(steps)}", flush=True)
        break
    time.sleep(0.2)
PY
wait $LAUNCHER
echo "== events"
python - "$OUT" <<'PY'
import json, sys
for line in open(f"{sys.argv[1]}/events.jsonl"):
    e = json.loads(line)
    hosted = {}
    for s in e.get("plan", {}).get("shards", []):
        hosted.setdefault(s["rank"], []).append(e["plan"]["tasks"][s["task"]]["name"] + f"({s['count']})")
    extra = {k: e[k] for k in ("param_sha256", "checkpoint_sha256", "from_world_size", "restart") if k in e}
    extra = {k: (v[:16] if isinstance(v, str) else v) for k, v in extra.items()}
    print(f"{e['event']:<8} step {e['step']:>4} world {e.get('world_size')} {extra} ranks {hosted}")
PY
