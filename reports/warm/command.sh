#!/bin/sh
# The WARM report's runs (from the repository root, raft installed): 4 members of all-MiniLM-L6-v2 on 320 IMDB
# review pairs, the same 300 clean held-out pairs; clean training labels, then 25% of them flipped. 1 thread.
set -e
for noise in 0 0.25; do
    python reports/warm/imdb_pairs.py /tmp/warm/pairs-$noise 320 300 $noise 40
    rm -rf /tmp/warm/rm-$noise
    OMP_NUM_THREADS=1 raft train-rm data=/tmp/warm/pairs-$noise/train.jsonl eval_data=/tmp/warm/pairs-$noise/heldout.jsonl \
        out=/tmp/warm/rm-$noise members=4 max_length=64 learning_rate=1e-4 batch_size=16 epochs=1 input=response seed=0
    mkdir -p reports/warm/noise-$noise
    cp /tmp/warm/rm-$noise/warm.json reports/warm/noise-$noise/warm.json
    python reports/warm/plot.py reports/warm/noise-$noise/warm.json reports/warm/noise-$noise
done
