#!/usr/bin/env bash
# The device check: on a machine with a CUDA GPU, the tests that take a device (tests/test_device.py) on that
# device, then a short bench in bf16: this machine's verify and draft costs (eagle3 calibrate) and throughput
# at batch sizes (eagle3 bench --batch-size), on stories260K and on a random model of SmolLM2-135M's shape.
# Everything goes to one folder, with summary.md on top. A few minutes on a GPU.
#
#   bash scripts/device_check.sh [--device cuda] [--out runs/device-check] [--dry-run]
#
# --dry-run (the test suite runs it with --device cpu) keeps every step but makes each tiny.
# Needs a python with torch, transformers, safetensors and tokenizers ($PYTHON, default python3, or this
# checkout's .venv), and the shared data folder's stories260K and data/eval/mt_bench.jsonl ($EAGLE3_SHARED,
# else ../shared). The device machine reaches no network and gets no ../shared: see docs/device.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
OUT=runs/device-check
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
    --out) OUT=${2:?--out needs a value}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "error: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" EAGLE3_HOME="$OUT/home" PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
if [ "$DRY" = 1 ]; then
  LIMIT=2; TOKENS=8; SIZES=1,2; BIG_SIZES=""; TESTS=(-k logits)  # (the suite runs tests/test_device.py whole)
else
  LIMIT=16; TOKENS=64; SIZES=1,4,16; BIG_SIZES=1,8,32; TESTS=()
fi
FAILED=()

step() { printf '\n## %s\n\n```\n' "$1" >> "$SUMMARY"; }
# From a bench's batch.md: the tables of throughput, throughput over plain decoding, and tau.
throughput() { awk '/^### / {on = /^### (Throughput|tau)/} on' "$1"; }
end_step() { printf '```\n' >> "$SUMMARY"; }

{
  echo "# eagle3 device check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE$([ "$DRY" = 1 ] && echo ', dry run')"
} > "$SUMMARY"

step "machine"
"$PYTHON" - "$DEVICE" >> "$SUMMARY" 2>&1 <<'EOF'
import platform, sys, torch
device = torch.device(sys.argv[1])
print("python", platform.python_version(), "torch", torch.__version__)
if device.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA GPU")
    print(torch.cuda.get_device_name(device), "capability", torch.cuda.get_device_capability(device))
else:
    print(platform.processor() or platform.machine(), torch.get_num_threads(), "threads")
EOF
end_step

step "tests on $DEVICE (tests/test_device.py)"
EAGLE3_TEST_DEVICE="$DEVICE" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_device.py "${TESTS[@]}" \
  > "$OUT/tests.log" 2>&1 || FAILED+=("tests")
tail -3 "$OUT/tests.log" >> "$SUMMARY"
end_step

step "stories260K in bf16: costs (eagle3 calibrate)"
"$PYTHON" -m eagle3 draft-init "$OUT/draft" --target stories260k --overwrite > /dev/null 2>&1
"$PYTHON" -m eagle3 calibrate --target stories260k --draft "$OUT/draft" --dtype bfloat16 --device "$DEVICE" \
  2>&1 | tee "$OUT/calibration-stories.txt" >> "$SUMMARY"
end_step

step "stories260K in bf16: throughput at batch sizes $SIZES (untrained draft: tau near 1)"
"$PYTHON" -m eagle3 bench --target stories260k --draft "$OUT/draft" --dtype bfloat16 --device "$DEVICE" \
  --methods vanilla,eagle3 --tree auto 8,4,4 --batch-size "$SIZES" --suites mt_bench --limit "$LIMIT" \
  --max-new-tokens "$TOKENS" --out "$OUT/bench-stories" --overwrite > "$OUT/bench-stories.log" 2>&1
throughput "$OUT/bench-stories/batch.md" >> "$SUMMARY"
end_step

if [ -n "$BIG_SIZES" ]; then
  step "a random model of SmolLM2-135M's shape (vocabulary 512) in bf16: costs and throughput at $BIG_SIZES"
  "$PYTHON" - "$OUT/smollm2-shape" <<'EOF'
import shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from eagle3.paths import shared_path
torch.manual_seed(0)
config = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                     rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1])
tokenizer = shared_path("models/stories260K/hf")
for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
    shutil.copy(tokenizer / name, sys.argv[1])
EOF
  "$PYTHON" -m eagle3 draft-init "$OUT/draft-smollm2-shape" --target "$OUT/smollm2-shape" --overwrite > /dev/null 2>&1
  "$PYTHON" -m eagle3 calibrate --target "$OUT/smollm2-shape" --draft "$OUT/draft-smollm2-shape" --dtype bfloat16 \
    --device "$DEVICE" 2>&1 | tee "$OUT/calibration-smollm2-shape.txt" >> "$SUMMARY"
  "$PYTHON" -m eagle3 bench --target "$OUT/smollm2-shape" --draft "$OUT/draft-smollm2-shape" --dtype bfloat16 \
    --device "$DEVICE" --methods vanilla,eagle3 --tree auto --batch-size "$BIG_SIZES" --suites mt_bench \
    --limit "$LIMIT" --max-new-tokens "$TOKENS" --out "$OUT/bench-smollm2-shape" --overwrite \
    > "$OUT/bench-smollm2-shape.log" 2>&1
  throughput "$OUT/bench-smollm2-shape/batch.md" >> "$SUMMARY"
  end_step
fi

if [ ${#FAILED[@]} -gt 0 ]; then
  echo "device check: FAILED (${FAILED[*]}); see $SUMMARY" | tee -a "$SUMMARY" >&2
  exit 1
fi
echo "device check done: $SUMMARY"
