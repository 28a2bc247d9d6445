#!/usr/bin/env bash
# make bench-engine: store-dedup against `LC_ALL=C sort -u` on the same data, in one run.
#
#   benches/engine.sh [DATA_DIR]      (default: 1 GiB generated under target/bench/engine-1g)
#   RUNS=3 MEM=256M THREADS=2 SIZES="128M"  change the defaults
#
# Prints wall seconds and peak RSS (median of RUNS, stdout to /dev/null), their ratio,
# and checks once that both outputs hash the same. Exits non-zero only if they differ.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}; MEM=${MEM:-256M}; THREADS=${THREADS:-2}
BIN=target/release/store-dedup GEN=target/release/store-gen
cargo build --release --quiet -p store-cli --bin store-dedup --bin store-gen
TMP=target/bench/tmp; mkdir -p "$TMP"

data_for() { # size per file -> directory of 8 files
  local d=target/bench/engine-$1
  if [ ! -f "$d/.done" ]; then
    rm -rf "$d"; "$GEN" "$d" --files 8 --size "$1" --dup 0.3 --seed 7 >/dev/null; touch "$d/.done"
  fi
  echo "$d"
}

# median of numbers on stdin
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# measure NAME CMD...: RUNS timed runs, prints "wall rss_mib"
measure() {
  local walls=() rsss=()
  for _ in $(seq "$RUNS"); do
    /usr/bin/time -f "%e %M" -o "$TMP/time" "$@" >/dev/null 2>"$TMP/stderr" || { cat "$TMP/stderr" >&2; exit 1; }
    read -r w r < "$TMP/time"; walls+=("$w"); rsss+=("$r")
  done
  echo "$(printf '%s\n' "${walls[@]}" | median) $(printf '%s\n' "${rsss[@]}" | median | awk '{printf "%.0f", $1/1024}')"
}

bench_dir() {
  local dir=$1 bytes records
  bytes=$(find "$dir" -type f ! -name '.*' -printf '%s\n' | awk '{s+=$1} END {printf "%d", s}')
  sd=$(measure "$BIN" --memory-limit "$MEM" --threads "$THREADS" --temp-dir "$TMP" "$dir")
  records=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])["records"])' "$TMP/stderr" 2>/dev/null || echo "?")
  so=$(measure env LC_ALL=C sort -u -S "$MEM" --parallel="$THREADS" -T "$TMP" $(find "$dir" -type f ! -name '.*' | sort))
  read -r sdw sdr <<<"$sd"; read -r sow sor <<<"$so"
  h1=$("$BIN" --memory-limit "$MEM" --threads "$THREADS" --temp-dir "$TMP" "$dir" 2>/dev/null | sha256sum | cut -c1-16)
  h2=$(LC_ALL=C sort -u -S "$MEM" --parallel="$THREADS" -T "$TMP" $(find "$dir" -type f ! -name '.*' | sort) | sha256sum | cut -c1-16)
  printf '%-10s %10s %12s | %-12s %8s s %7s MiB | %-8s %8s s %7s MiB | %6s %6s | %s\n' \
    "$(basename "$dir")" "$((bytes/1048576))MiB" "$records" store-dedup "$sdw" "$sdr" "sort -u" "$sow" "$sor" \
    "$(awk -v a="$sdw" -v b="$sow" 'BEGIN{printf "%.2f", a/b}')" "$(awk -v a="$sdr" -v b="$sor" 'BEGIN{printf "%.2f", a/b}')" \
    "$([ "$h1" = "$h2" ] && echo "same output $h1" || echo "OUTPUT DIFFERS $h1 $h2")"
  [ "$h1" = "$h2" ]
}

echo "# $(date -u +%F) $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM; memory $MEM, threads $THREADS, median of $RUNS"
echo "# data       input      records | contender    wall         peak RSS  | contender wall         peak RSS  | wall   RSS    | check"
echo "#                                                                                                         ratio  ratio"
if [ $# -gt 0 ]; then
  bench_dir "$1"
else
  for s in ${SIZES:-128M}; do bench_dir "$(data_for "$s")"; done
fi
