#!/usr/bin/env bash
# The GPU checks of docs/performance.md, prepared for one short lease of a GPU machine
# whose Python already has torch, transformers, pluggy, attrs and pytest but cannot reach
# a package index: the CUDA test suite and the throughput table, each part under its own
# time limit, logs written to $OUT (default ./gpu-out).
#
# Here, once (a machine with pip and network to the package index), fetch the two
# run-time dependencies that such images lack (and the attrs and typing-extensions that
# cattrs needs, newer than an image may hold), as wheels for the GPU machine's Python:
#     bash benchmarks/gpu_session.sh wheels          # -> .whl/
# There (carry .whl), parts that fit one call's 10 minutes together (the limits below):
#     bash benchmarks/gpu_session.sh env tests       # versions, the CUDA suite (xdist): <= 6 min
#     bash benchmarks/gpu_session.sh bench           # the GPT-2 124M table: <= 5 min
#     bash benchmarks/gpu_session.sh o2 350m         # megatron_amp_O2 rows, 350M: <= 10 min
#     bash benchmarks/gpu_session.sh chunk           # the chunked loss at batch 32: <= 4 min
#     bash benchmarks/gpu_session.sh bert txl        # BERT-large seq 128 vs HF, TXL-base (WT103 shape): <= 8 min
set -u
OUT=${OUT:-gpu-out}
py=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}

install() {  # mega and the carried wheels into $SITE, once per machine
  if [ ! -e $SITE/.mega-installed ]; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl \
      && $py -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target $SITE . \
      && touch $SITE/.mega-installed || { echo "install failed" | tee -a "$OUT/summary.txt"; exit 1; }
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1
}

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, one summary line
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log"
}

PARTS="wheels env tests bench o2 350m chunk bert txl"
for what in "$@"; do  # every part known before any runs: a typo must not cost a lease's minutes
  case " $PARTS " in *" $what "*) ;; *) echo "unknown part $what ($PARTS)" >&2; exit 2 ;; esac
done

mkdir -p "$OUT"
for what in "$@"; do
  case $what in
    wheels)
      mkdir -p .whl
      for pkg in cattrs==26.2.1 tomli-w==1.2.0 attrs==26.1.0 typing-extensions==4.16.0; do
        $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux2014_x86_64 --platform any -d .whl "$pkg" || exit 1
      done
      ls .whl ;;
    env)
      install
      part env 60 $py -c "import torch, mega.plugins, importlib.metadata as m; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else ''); print('mega', m.version('mega-lm'), sorted(e.name for e in m.entry_points(group='mega.plugins'))[:5], '...')" ;;
    tests)
      install
      nvidia-smi -L | tee -a "$OUT/summary.txt"
      part tests 300 $py -m pytest tests contrib -q -n 8 --dist loadfile -p no:cacheprovider --timeout 240 -rfE ;;
    bench)
      install
      part bench124m 300 $py benchmarks/bench_gpu.py --reps 3 --steps 10 ;;
    o2)
      install
      part bench124m-o2 280 $py benchmarks/bench_gpu.py --layout o2 --reps 3 --steps 10 ;;
    350m)
      install
      part bench350m 280 $py benchmarks/bench_gpu.py --layers 24 --hidden 1024 --heads 16 --reps 3 --steps 10 --no-run ;;
    chunk)
      install
      part bench124m-chunk 240 $py benchmarks/bench_gpu.py --batch 32 --loss-chunk-size 4096 --reps 3 --steps 10 --no-run ;;
    bert)
      install
      part bert-large 240 $py benchmarks/bench_bert_vs_hf.py --device cuda --dtype bf16 --layers 24 --hidden 1024 --heads 16 \
        --seq 128 --batch 64 --vocab 30592 --dropout 0.1 --reps 3 --steps 10 ;;
    txl)
      install
      part txl-base 200 $py benchmarks/bench_txl.py --device cuda --full --batch 32 --dtype bf16 --steps 20 --warmup 5 ;;
  esac
done
