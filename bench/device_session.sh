#!/usr/bin/env bash
# The GPU measurements of a device-tool session, step by step, each under its own time
# limit, each writing its log (and tables) under $OUT as it goes: a step killed at its
# limit still leaves what it printed and the rows it finished.
#
#   bash bench/device_session.sh setup tests:150 choices:180 aot:330
#
# STEP[:SECONDS] (default 300). Carry `.whl` (the wheels the machine lacks: diffusers,
# av, websockets, pytest and their needs) and `.gpucheck` (the tiny UNet config; the
# ../shared folder does not travel). Steps: setup; tests (TESTS_K: a -k expression);
# doctor (bench/aoti_doctor.py; DOCTOR_CASES, DOCTOR_RECIPES); parts, compiled
# (bench/unet_parts.py; COMPILED_VARIANTS, COMPILED_SECTIONS, PARTS_BATCH); choices,
# aot, tune, compile (bench/latentsync_bench.py; COMPILE_FLAGS, e.g. --compile-renderer);
# first (bench/first_frame.py; FIRST_RUNNERS); vae (bench/vae_decode.py); serve-aot (bench/gpu_serve.py). A pytest
# step's summary comes last: give it room.
set -u
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor
CONFIG=media/latentsync/configs/stage2.json
BENCH="python3 bench/latentsync_bench.py --config $CONFIG"

step() {  # step NAME LIMIT COMMAND...: run it, log to $OUT/NAME.log, show the log's end
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s) from $(date +%T)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? at $(date +%T)"
    grep -v -i -e warn -e "^  " "$OUT/$name.log" | tail -n 30
}

for arg in "$@"; do
    name=${arg%%:*}
    limit=${arg#*:}
    [ "$limit" = "$arg" ] && limit=300
    case $name in
    setup)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site .whl/*.whl || exit 1
        mkdir -p ../shared/fixtures && cp .gpucheck/* ../shared/fixtures/
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
        ;;
    tests)  # TESTS_K: a pytest -k expression
        step tests "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider -rs \
            ${TESTS_K:+-k "$TESTS_K"} tests
        ;;
    doctor)
        step doctor "$limit" python3 bench/aoti_doctor.py --config .gpucheck/tiny_unet_config.json \
            --cases "${DOCTOR_CASES:-small-weightless,small-so,small-cpu}" \
            ${DOCTOR_RECIPES:+--recipes "$DOCTOR_RECIPES"} --out "$OUT/aoti_doctor.json"
        ;;
    choices)
        step choices "$limit" $BENCH --sections choices --tune-batch 8 \
            --budget-s $((limit - 60)) --out "$OUT/choices.md"
        ;;
    parts)
        step parts "$limit" python3 bench/unet_parts.py --config $CONFIG --batch 8 \
            --sections parts,whole --budget-s $((limit - 40)) --out "$OUT/parts.md"
        ;;
    compiled)
        step compiled "$limit" python3 bench/unet_parts.py --config $CONFIG --batch ${PARTS_BATCH:-8} \
            --sections ${COMPILED_SECTIONS:-compiled} --compiled-variants "${COMPILED_VARIANTS:-default,cl+math,cl}" \
            --budget-s $((limit - 140)) --out "$OUT/compiled.md"
        ;;
    aot)
        step aot "$limit" $BENCH --sections aot --aot-batch 8 --aot-dir /tmp/aoti \
            --out "$OUT/aot.md"
        ;;
    tune)
        step tune "$limit" $BENCH --sections tune --tune-batch 8 --tune-variants default,tuned \
            --budget-s $((limit - 240)) --out "$OUT/tune.md"
        ;;
    compile)
        step compile "$limit" $BENCH --sections compile --compile-dynamic ${COMPILE_FLAGS:-} \
            --compile-batches 1,8 --budget-s $((limit - 150)) --out "$OUT/compile.md"
        ;;
    first)  # a turn's first chunk through the renderer (FIRST_RUNNERS: graphs,compiled; FIRST_REPS; FIRST_FLAGS, e.g. --profile)
        step first "$limit" python3 -m bench.first_frame --runners "${FIRST_RUNNERS:-graphs,compiled}" --reps "${FIRST_REPS:-5}" ${FIRST_FLAGS:-} \
            --out "$OUT"
        ;;
    vae)  # the VAE decode by layout and execution (VAE_VARIANTS, VAE_FRAMES)
        step vae "$limit" python3 -m bench.vae_decode ${VAE_VARIANTS:+--variants "$VAE_VARIANTS"} \
            ${VAE_FRAMES:+--frames "$VAE_FRAMES"} --out "$OUT"
        ;;
    serve-aot)
        step serve-aot "$limit" python3 -m bench.gpu_serve --aot /tmp/aoti-serve \
            --configs exact --users-exact 1,3 --budget-s $((limit - 60)) --out "$OUT/serve"
        ;;
    *)
        echo "unknown step $name (setup, tests, doctor, parts, compiled, choices, aot, tune, compile, first, vae, serve-aot)" >&2
        exit 2
        ;;
    esac
done
