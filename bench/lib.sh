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
# CPU=1 (bench/incoming.sh): each process's CPU time per request during a run, user and system
# time apart, from each thread's /proc stat before and after it, summed by thread name; the load
# generator's (gone by then) from `times` in the shell that ran it. Exported like `profiled`.
cpu_snapshot() { # FILE
  [ -n "${CPU:-}" ] || return 0
  cat /proc/[0-9]*/task/[0-9]*/stat > "$1" 2>/dev/null || true
}
cpu_report() { # NAME BEFORE REQUESTS CLIENT_NAME CLIENT_TIMES: prints to stderr
  [ -n "${CPU:-}" ] || return 0
  { cat /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null || true; } | awk -v name="$1" -v requests="$3" \
    -v hz="$(getconf CLK_TCK)" -v client="$4" -v client_times="$(sed -n 2p "$5")" '
    # A stat line: "TID (COMM) STATE ..." where COMM may hold spaces and parentheses.
    function parse(line,   from, to, f) {
      from = index(line, "("); to = length(line)
      while (substr(line, to, 1) != ")") to--
      comm = substr(line, from + 1, to - from - 1)
      split(substr(line, to + 2), f, " ")
      tid = substr(line, 1, from - 2); user = f[12]; sys = f[13]
    }
    function seconds(t,   m) { split(t, m, "m"); return m[1] * 60 + m[2] }
    FNR == NR { parse($0); before_user[tid] = user; before_sys[tid] = sys; next }
    { parse($0); u[comm] += user - before_user[tid]; s[comm] += sys - before_sys[tid] }
    END {
      split(client_times, c, " ")
      u[client] = seconds(c[1]) * hz; s[client] = seconds(c[2]) * hz
      for (comm in u) {
        total = (u[comm] + s[comm]) * 1e6 / hz / requests
        if (total >= 0.5) printf "  %-22s %-16s %6.1f us of CPU per request (user %.1f)\n", name ":", comm, total, u[comm] * 1e6 / hz / requests
      }
    }' "$2" - | sort -k3,3 -rn >&2
}
export -f cpu_snapshot cpu_report
# With PROFILE: the top symbols of mirrord and its agent in each RUN's profile.
profile_report() { # RUN...
  [ -n "${PROFILE:-}" ] || return 0
  for run in "$@"; do
    echo "top symbols of mirrord and its agent, $run (perf, cpu-clock, % of all samples):"
    perf report -i "$PROFILE/$run.data" --comm mirrord,mirrord-net,mirrord-agent,agent-net --no-children --sort comm,sym \
      --percent-limit 0.5 --stdio 2>/dev/null | grep -E "^ +[0-9]" | head -12
  done
}
