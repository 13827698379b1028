# Sourced by every benchmark, first thing: it runs from the repository's root, as root, with
# the mirrord under test in $MIRRORD (exported, so the private namespaces' shells see it).
# MIRRORD=PATH runs that mirrord binary (and the mirrord-agent beside it) instead of
# target/release/mirrord, e.g. to compare a saved build with the current one in one session:
#   cp target/release/mirrord{,-agent} /tmp/before/ && ... && MIRRORD=/tmp/before/mirrord bench/dns.sh
# The bench's own name is $BENCH, for its messages.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BENCH=bench/$(basename "$0")
[ "$(id -u)" = 0 ] || { echo "$BENCH: needs root (it makes namespaces of its own)" >&2; exit 1; }
MIRRORD=$(realpath -m "${MIRRORD:-target/release/mirrord}")
[ -x "$MIRRORD" ] || { echo "$BENCH: build first: cargo build --release --workspace --bins" >&2; exit 1; }
export MIRRORD

# PROFILE=DIR, for the benches that take it (network, incoming): DIR is made, and its path made
# absolute; it must lie outside /tmp, which the benches replace with their own.
profile_setup() {
  [ -n "${PROFILE:-}" ] || return 0
  mkdir -p "$PROFILE"; PROFILE=$(realpath "$PROFILE")
  command -v perf >/dev/null || { echo "$BENCH: PROFILE needs perf" >&2; exit 1; }
}
# Runs COMMAND, under a system-wide perf record into $PROFILE/NAME.data when PROFILE is set and
# NAME is not empty. Exported, so the benches' inner shells (bash -c in a private namespace)
# have it too.
profiled() { # NAME COMMAND...
  if [ -n "${PROFILE:-}" ] && [ -n "$1" ]; then
    perf record -q -e cpu-clock -g -a -o "$PROFILE/$1.data" -- "${@:2}" 2>/dev/null
  else
    "${@:2}"
  fi
}
export -f profiled
# With PROFILE: the top symbols of mirrord and its agent in each RUN's profile.
profile_report() { # RUN...
  [ -n "${PROFILE:-}" ] || return 0
  for run in "$@"; do
    echo "top symbols of mirrord and its agent, $run (perf, cpu-clock, % of all samples):"
    perf report -i "$PROFILE/$run.data" --comm mirrord,mirrord-net,mirrord-agent,agent-net --no-children --sort comm,sym \
      --percent-limit 0.5 --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -12
  done
}
