#!/usr/bin/env bash
# `make run`'s first step: make sure the default dataset (Fashion-MNIST in data.root "data") is here
# or can be had, BEFORE minutes go into installing the environment and starting the stages.
#
#   scripts/ensure_data.sh [params.yaml]
#
# Found in data/FashionMNIST/raw or the Debian package's folder: nothing to do. Otherwise, as root on
# Debian: apt-get install dataset-fashion-mnist. Otherwise, online: torchvision downloads it on the
# first run. Otherwise: one message with the ways to get it, exit 1. Any other data.name or data.root
# is left to the pipeline, which checks it itself. No project environment is needed: params.yaml is
# read with awk. ENSURE_DATA_SYSTEM_DIR, ENSURE_DATA_UID and ENSURE_DATA_PROBE_URL override the
# system folder, the user id and the download address (the tests use them).
set -uo pipefail

params=${1:-params.yaml}
system_dir=${ENSURE_DATA_SYSTEM_DIR:-/usr/share/datasets/fashion-mnist}
uid=${ENSURE_DATA_UID:-$(id -u)}
probe_url=${ENSURE_DATA_PROBE_URL:-http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz}
package=dataset-fashion-mnist
files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

[ -f "$params" ] || exit 0   # the pipeline names a missing params file itself

# data.name / data.root / data.download from the block-style `data:` section; a flow-style
# section (`data: {...}`) is not parsed here and is left to the pipeline.
settings=$(awk '
  /^[^[:space:]#]/ { section = $0; sub(/:.*/, "", section); flow = ($0 ~ /^data:[[:space:]]*[^[:space:]#]/) }
  section == "data" && flow { print "flow=1" }
  section == "data" && /^  [a-z_]+:/ {
    line = $0; sub(/[[:space:]]+#.*$/, "", line)
    key = line; sub(/^  /, "", key); sub(/:.*/, "", key)
    value = line; sub(/^[^:]*:[[:space:]]*/, "", value); gsub(/^["'\'']|["'\'']$/, "", value)
    if (key == "name" || key == "root" || key == "download") print key "=" value
  }' "$params")
value() { local v; v=$(printf '%s\n' "$settings" | sed -n "s/^$1=//p" | tail -1); printf '%s' "${v:-$2}"; }
[ -n "$(value flow '')" ] && exit 0
name=$(value name fashion_mnist)
root=$(value root data)
download=$(value download true)
[ "$name" = fashion_mnist ] && [ "$root" = data ] || exit 0

has_files() {
  local f
  for f in "${files[@]}"; do [ -f "$1/$f.gz" ] || [ -f "$1/$f" ] || return 1; done
}
describe() {
  if [ ! -d "$1" ]; then echo "folder does not exist"; else echo "incomplete or empty"; fi
}
has_files data/FashionMNIST/raw && exit 0
has_files "$system_dir" && exit 0

tried=("data.root: data/FashionMNIST/raw ($(describe data/FashionMNIST/raw))"
       "system folder: $system_dir ($(describe "$system_dir"))")

if [ "$uid" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Fashion-MNIST is not installed: apt-get install $package (Debian's package, about 30 MB)..."
  log=$(mktemp)
  if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package"; } >"$log" 2>&1 \
      && has_files "$system_dir"; then
    rm -f "$log"
    exit 0
  fi
  tried+=("apt-get install $package: failed ($(grep -v '^[[:space:]]*$' "$log" | tail -1 | cut -c1-200))")
  rm -f "$log"
elif [ "$uid" != 0 ]; then
  tried+=("apt-get install $package: skipped (needs root; this is user id $uid)")
else
  tried+=("apt-get install $package: skipped (no apt-get: not a Debian-like system)")
fi

if [ "$download" = true ]; then
  # The address torchvision downloads from; urllib honours the same proxy settings torchvision does.
  reason=$(python3 - "$probe_url" 2>&1 <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(urllib.request.Request(sys.argv[1], method="HEAD"), timeout=5).close()
except Exception as e:  # noqa: BLE001 - offline, DNS, HTTP: all mean no download
    print(" ".join(f"{type(e).__name__}: {e}".split())[:200])
    sys.exit(1)
EOF
  ) && { echo "Fashion-MNIST is not installed here; torchvision will download it into data/ on the first run."; exit 0; }
  tried+=("download from $probe_url: not reachable (${reason:-python3 missing})")
else
  tried+=("download: skipped (data.download is false)")
fi

{
  echo "error: fashion_mnist: no copy of the dataset was found and none can be had on this machine. Tried, in order:"
  for i in "${!tried[@]}"; do echo "  $((i + 1)). ${tried[$i]}"; done
  echo "Ways to get it:"
  echo "  - on Debian/Ubuntu, as root: apt-get install $package (installs $system_dir)"
  echo "  - copy train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and"
  echo "    t10k-labels-idx1-ubyte.gz into data/FashionMNIST/raw/"
  echo "  - with internet access: rerun; torchvision downloads it (needs data.download: true)"
  echo "  - or set data.name: synthetic in params.yaml to try the pipeline without any download"
} >&2
exit 1
