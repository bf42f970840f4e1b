#!/usr/bin/env bash
# The GPU figures of issue 21 in one call of a lent GPU machine, most important first. Each run's last
# JSON line is appended to $OUT/results.jsonl, its whole output to $OUT/session.log.
#
#   1b-ft8        the MFU benchmark of benchmarks/RESULTS.md: 1B Llama, finetune, micro-batch 8
#   7b-ft16-fb    a Vicuna-7B-shaped LLM at the presets' micro-batch 16 with checkpointing, 2048 tokens:
#                 forward + backward alone (a full finetune step's optimizer states do not fit one card)
#   7b-pt16       the same LLM, a whole pretrain step (the LLM frozen)
#   7b-ft16-fb-1024, 7b-pt16-768   shorter samples (1024 and 768 LLM tokens), for the projection
#   detect32      benchmarks/detect.py at the full-size presets' imgsz 640 and batch 32
#
# Usage: OUT=dir bash benchmarks/gpu_session.sh   (on the machine, from the repository root)
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 DS_BUILD_OPS=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

run() {  # run NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS log="$OUT/$name.log.tmp"
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  # the benchmark's JSON line (processes may log after it at exit)
  local result
  result=$(grep -E '^\{"benchmark"' "$log" | tail -n 1)
  echo "{\"run\": \"$name\", \"exit\": $rc, \"result\": ${result:-null}}" >>"$OUT/results.jsonl"
  { echo "===== $name (exit $rc)"; cat "$log"; } >>"$OUT/session.log"
  echo "== $name: exit $rc in $((SECONDS - started)) s"
  grep -E "samples/s \(|images/s|overhead|OutOfMemoryError|Error" "$log" | tail -n 3
  rm -f "$log"
}

train() {  # train NAME ARGS...: benchmarks/train_step_gpu.py
  local name=$1
  shift
  run "$name" 240 python3 benchmarks/train_step_gpu.py "$@"
}

seven_b=(--llm vicuna-7b --gradient-checkpointing --steps 4 --warmup 2 --micro-batch 16)
train 1b-ft8 --stage finetune --micro-batch 8
train 7b-ft16-fb "${seven_b[@]}" --stage finetune --forward-backward-only
train 7b-pt16 "${seven_b[@]}" --stage pretrain
train 7b-ft16-fb-1024 "${seven_b[@]}" --stage finetune --forward-backward-only --text-tokens 433  # 1024 LLM tokens
train 7b-pt16-768 "${seven_b[@]}" --stage pretrain --text-tokens 177  # 768 LLM tokens
run detect32 180 python3 benchmarks/detect.py --n 320 --imgsz 640 --batch 32 --repeat 2 --device 0
exit 0
