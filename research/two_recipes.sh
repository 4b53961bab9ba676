#!/usr/bin/env bash
# The synthetic operator table under both recipes, over dataset seeds (issue: the seed recipe).
#
#   bash research/two_recipes.sh pipelines 0 1 2    # LFB-head recipe: README command 1 per seed
#   bash research/two_recipes.sh sgd 0 1 2 [OPS]    # mmaction2's recipe on the same baselines/banks
#
# Seed 0 uses README command 1's folders (data/synthetic, runs/synthetic, experiment
# lfb_synthetic); seed N uses data/synthetic_sN, runs/synthetic_sN, lfb_synthetic_sN. The SGD runs
# go to the experiment <that>_sgd: the baseline's backbone fine-tuned end to end with SGD at
# train.base_lr x train.finetune_lr_scale for train.epochs (warm-up and step schedule as the
# baseline's, scaled to that budget), sigmoid BCE over all classes, no head warm-up; the control
# (operator none) is trained the same way without a bank. OPS defaults to nl,none,avg,max.
# The tables: python jobs/compare.py with one --config per seed (see docs/synthetic_study.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mode=$1; shift
ops=nl,none,avg,max
seeds=()
for a in "$@"; do
  if [[ $a =~ ^[0-9]+$ ]]; then seeds+=("$a"); else ops=$a; fi
done
for s in "${seeds[@]}"; do
  if [[ $s == 0 ]]; then d=data/synthetic; w=runs/synthetic; e=lfb_synthetic
  else d=data/synthetic_s$s; w=runs/synthetic_s$s; e=lfb_synthetic_s$s; fi
  set_=(workdir=$w data.root=$d tracking.experiment=$e)
  case $mode in
    pipelines)
      $PY jobs/make_synthetic_ava.py --out "$d" --seed "$s" --if-missing
      $PY jobs/pipeline.py --config configs/synthetic.yaml "${set_[@]}" ;;
    sgd)
      base=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['baseline']['result']['model'])" "$w/pipeline.json")
      $PY jobs/train.py --config configs/synthetic.yaml "${set_[@]}" tracking.experiment=${e}_sgd \
        bank.checkpoint="$base" \
        train.head_warmup_steps=0 train.finetune_epochs=-1 'model.exclusive_groups=[]' \
        --operators "$ops" --init-backbone "$base" ;;
    *) echo "usage: $0 pipelines|sgd SEED... [OPS]" >&2; exit 2 ;;
  esac
done
