#!/usr/bin/env bash
# lmforge serve vs transformers serve under the same streaming load (benchmarks/serve_load.py), one server at a time.
#
#   bash benchmarks/serve_compare.sh                         # the demo chat model and SmolLM2-135M-Instruct
#   SFT=runs/demo/sft SMOL=models/smollm2 OUT=/tmp/serve_bench DURATION=20 bash benchmarks/serve_compare.sh
#   MODELS=sft ROUNDS=2 LEVELS=1,16 bash benchmarks/serve_compare.sh  # one model, two rounds
#
# Rounds alternate which server goes first (the machine's speed drifts: compare within a round).
# SFT and SMOL are lmforge runs or checkpoints; each is exported to Hugging Face format (`lmforge export`)
# for transformers serve (needs `pip install "transformers[serving]"`), which runs with --continuous-batching
# on the CPU. Results: $OUT/{lmforge,transformers}-{sft,smol}-r{round}.json and the servers' logs next to them;
# the tables (and lmforge / transformers ratios) are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

SFT=${SFT:-/tmp/demo-run/sft}
SMOL=${SMOL:-/tmp/smol}
OUT=${OUT:-/tmp/serve_bench}
DURATION=${DURATION:-30}
LEVELS=${LEVELS:-1,4,16,64}
ROUNDS=${ROUNDS:-1}
LEVEL_ROUNDS=${LEVEL_ROUNDS:-1}  # serve_load.py --rounds: the levels in turn, this many times
MODELS=${MODELS:-sft smol}
PORT=${PORT:-8101}
mkdir -p "$OUT"

run() {  # NAME SERVER_COMMAND
    python benchmarks/serve_load.py --launch "$2" --url "http://127.0.0.1:$PORT" --label "${1%%-*}" \
        --concurrency "$LEVELS" --duration "$DURATION" --rounds "$LEVEL_ROUNDS" --max-tokens 64 --temperature 0 \
        --server-log "$OUT/$1.log" --json "$OUT/$1.json"
}

for round in $(seq 1 "$ROUNDS"); do
    for pair in "sft:$SFT:" "smol:$SMOL:--max-context 1024"; do
        IFS=: read -r name model extra <<<"$pair"
        [[ " $MODELS " == *" $name "* ]] || continue
        [ -f "$OUT/hf-$name/config.json" ] || lmforge export "$model" --out "$OUT/hf-$name"
        lm="lmforge serve $model --name $name --port $PORT --max-batch 64 $extra"
        tf="transformers serve --continuous-batching --device cpu --host 127.0.0.1 --port $PORT --log-level info \
$OUT/hf-$name"
        if (( round % 2 )); then
            run "lmforge-$name-r$round" "$lm" && run "transformers-$name-r$round" "$tf"
        else
            run "transformers-$name-r$round" "$tf" && run "lmforge-$name-r$round" "$lm"
        fi
    done
done

for round in $(seq 1 "$ROUNDS"); do
    for name in $MODELS; do
        python benchmarks/serve_load.py --report "$OUT/lmforge-$name-r$round.json" "$OUT/transformers-$name-r$round.json"
    done
done
