#!/usr/bin/env bash
# README command 1: install what is needed, then train the tiny GPT-MoE on 2 CPU processes
# with its 8 experts split over them (expert parallelism 2), from scratch.
#   bash tools/quickstart.sh [-o key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_env.sh
if ! "$PY" -c "import visualdl" >/dev/null 2>&1; then
  echo "== installing visualdl (training dashboards)"
  "$PY" -m pip install -q "visualdl>=2.5"
fi

OUT=outputs/quickstart
rm -rf "$OUT"   # the demo always starts fresh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # 2 processes on 2 cores
echo "== training configs/gpt_moe_tiny.yaml on 2 processes (EP=2); logs: $OUT/launch/workerlog.*"
"$PY" -m paddle.distributed.launch --nproc_per_node 2 --log_dir "$OUT/launch" \
  tools/train.py -c configs/gpt_moe_tiny.yaml -o train.output_dir="$OUT" --threads 1 "$@"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r.get("kind") == "train"]
val = [r for r in rows if r.get("kind") == "val"]
base = val[-1]["unigram_baseline"]
print(f"\n== result: train loss {train[0]['lm_loss']:.3f} (step {train[0]['step']}) -> {train[-1]['lm_loss']:.3f} "
      f"(step {train[-1]['step']}); held-out loss {val[-1]['loss']:.3f} vs unigram baseline {base:.3f} nats/token")
latest = (out / "checkpoints" / "latest").read_text().strip()
print(f"   checkpoint: {out / 'checkpoints' / latest}")
print(f"   metrics:    {out / 'metrics.jsonl'}")
print(f"   VisualDL:   visualdl --logdir {out / 'vdl'}   (then open http://localhost:8040)")
if not val[-1]["loss"] < base:
    sys.exit("error: the held-out loss did not fall below the unigram baseline")
PYEOF
