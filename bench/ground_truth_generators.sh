#!/bin/bash
# Usage: WORK=bench/work/gt-generators bash bench/ground_truth_generators.sh   (resumable; 5 passes, steps of 1,024 rows)
# The per-token warm-up on generators the default was not chosen on: an iid set (no pairs, equal firing
# probabilities) and a smaller, denser one (d 64, 512 features, 8 firing, alpha 1.0, more noise).
set -e
cd "$(dirname "$0")/.."
S=.venv/bin/saescope
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f ${WORK:-bench/work/gt-generators}/iid/synthetic.json ] || $S groundtruth make --out ${WORK:-bench/work/gt-generators}/iid --samples 500000 --correlated-pairs 0 --hierarchical-pairs 0 --alpha 0
[ -f ${WORK:-bench/work/gt-generators}/dense/synthetic.json ] || $S groundtruth make --out ${WORK:-bench/work/gt-generators}/dense --samples 500000 --d 64 --n-features 512 --mean-active 8 --alpha 1.0 --noise 0.05 --seed 3
for set in iid dense; do
  k=6; [ $set = dense ] && k=8
  for arch in topk batchtopk jumprelu matryoshka; do
    for w in 0 0.5; do
      [ $arch = topk ] && [ $w = 0 ] && continue
      out=${WORK:-bench/work/gt-generators}/$set-$arch-w$w
      [ -f $out/train_summary.json ] || $S train --activations ${WORK:-bench/work/gt-generators}/$set/activations.npy --arch $arch --k $k --expansion 16 --max-tokens 2500000 --batch-size 4 --per-token-warmup $w --out $out 2>&1 | grep trained
    done
  done
  $S groundtruth score --synthetic ${WORK:-bench/work/gt-generators}/$set $(for a in topk-w0.5 batchtopk-w0 batchtopk-w0.5 jumprelu-w0 jumprelu-w0.5 matryoshka-w0 matryoshka-w0.5; do echo --sae ${WORK:-bench/work/gt-generators}/$set-$a; done) --out ${WORK:-bench/work/gt-generators}/scores-$set.json | tail -10
done
