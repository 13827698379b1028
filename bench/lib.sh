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
