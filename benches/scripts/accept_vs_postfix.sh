#!/usr/bin/env bash
# Acceptance throughput, side by side in one run, on loopback:
#   postern (durable spool)  vs  Postfix relaying to smtp-sink (durable queue)  vs  smtp-sink
#   (stores nothing), all driven by Postfix's smtp-source: 50 sessions, 1 KiB messages, one
#   connection per session reused for every message (-d). Three rounds each (or the second
#   argument); medians printed.
# postern runs twice: on all cores (its default), relaying every message to the smtp-sink as
# Postfix does; and accepting only (--hold: durable spool, no delivery) with --cores 1, which
# leaves the other core to smtp-source as the single-process smtp-sink does. Each relaying
# server's queue is drained to the sink after its round, so no delivery backlog takes CPU
# from the next measurement.
# Needs root (installs and configures Postfix when missing). Usage:
#   bash benches/scripts/accept_vs_postfix.sh [messages-per-round [rounds]]
set -euo pipefail
# A failure inside $(...) (a run of smtp-source cut short) ends the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
MSGS=${1:-20000}
ROUNDS=${2:-3}
SESSIONS=50
SIZE=1024
SINK_PORT=25251; POSTFIX_PORT=25252; POSTERN_PORT=25253; POSTERN1_PORT=25254
METRICS_PORT=25263; METRICS1_PORT=25264
# Installed first, so that the configuration kept below is the one found after the install
# (a fresh machine's package files), not "absent", which cleanup would remove.
if ! command -v smtp-source >/dev/null || ! command -v postfix >/dev/null \
    || ! command -v curl >/dev/null || ! command -v python3 >/dev/null; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix curl python3 >/dev/null
fi
# The benchmark empties Postfix's queue: a machine whose Postfix holds mail is not one to
# run it on.
queued=$( { find /var/spool/postfix/incoming /var/spool/postfix/active \
  /var/spool/postfix/deferred /var/spool/postfix/hold /var/spool/postfix/maildrop \
  -type f 2>/dev/null || true; } | wc -l)
if [ "$queued" -gt 0 ]; then
  echo "Postfix's queue holds $queued messages, and this benchmark empties it: deliver or" \
    "move them first (or, left by an earlier benchmark, remove them: postsuper -d ALL)" >&2
  exit 1
fi
work=$(mktemp -d /var/tmp/postern-bench.XXXXXX)
# The machine's own Postfix configuration (and whether it ran) is kept first thing, and put
# back by cleanup, whatever ends the script; a file that was absent is removed then.
postfix_was_running=no
postfix status >/dev/null 2>&1 && postfix_was_running=yes
for f in /etc/postfix/main.cf /etc/postfix/master.cf /etc/mailname; do
  if [ -f "$f" ]; then cp "$f" "$work/saved.$(basename "$f")"; else touch "$work/absent.$(basename "$f")"; fi
done
cleanup() {
  [ -n "${sink_pid:-}" ] && kill "$sink_pid" 2>/dev/null || true
  [ -n "${postern_pid:-}" ] && kill "$postern_pid" 2>/dev/null || true
  [ -n "${postern1_pid:-}" ] && kill "$postern1_pid" 2>/dev/null || true
  # Ended before their spools are removed with $work.
  for pid in "${sink_pid:-}" "${postern_pid:-}" "${postern1_pid:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  postfix stop >/dev/null 2>&1 || true
  # The machine's own Postfix configuration back, and Postfix started again if it ran.
  for f in /etc/postfix/main.cf /etc/postfix/master.cf /etc/mailname; do
    b=$(basename "$f")
    if [ -f "$work/saved.$b" ]; then cp "$work/saved.$b" "$f"
    elif [ -f "$work/absent.$b" ]; then rm -f "$f"; fi
  done
  if [ "$postfix_was_running" = yes ]; then postfix start >/dev/null 2>&1 || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -q --bin postern

# Postfix: loopback only, relays everything to the sink, queue on the same disk. The
# machine's own configuration was kept above and is put back at the end (see cleanup).
postfix stop >/dev/null 2>&1 || true
[ -f /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf
postconf -e "inet_interfaces = loopback-only" "inet_protocols = ipv4" "mydestination =" \
  "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:$SINK_PORT" "default_process_limit = 200" \
  "smtpd_client_connection_count_limit = 0" "smtpd_client_connection_rate_limit = 0" \
  "anvil_rate_time_unit = 60s" "maillog_file = /var/log/postfix-bench.log" "compatibility_level = 3.6" \
  "in_flow_delay = 1s"
postconf -M# smtp/inet >/dev/null 2>&1 || true
postconf -Me "127.0.0.1:$POSTFIX_PORT/inet = 127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
[ -s /etc/mailname ] || hostname > /etc/mailname
postfix check && postfix start >/dev/null

smtp-sink -u nobody -c "127.0.0.1:$SINK_PORT" 1000 >"$work/sink.log" 2>&1 &
sink_pid=$!
# postern relays to the same next hop as Postfix (never to MX hosts).
./target/release/postern serve --listen "127.0.0.1:$POSTERN_PORT" --spool "$work/spool" \
  --hostname bench.test --relay-host "127.0.0.1:$SINK_PORT" \
  --metrics "127.0.0.1:$METRICS_PORT" >"$work/postern.log" 2>&1 &
postern_pid=$!
./target/release/postern serve --listen "127.0.0.1:$POSTERN1_PORT" --spool "$work/spool1" \
  --hostname bench.test --relay-host "127.0.0.1:$SINK_PORT" --cores 1 --hold \
  --metrics "127.0.0.1:$METRICS1_PORT" >"$work/postern1.log" 2>&1 &
postern1_pid=$!
for port in $SINK_PORT $POSTFIX_PORT $POSTERN_PORT $POSTERN1_PORT; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

rate() { # port -> messages per second of one round
  local start end
  start=$(date +%s.%N)
  # smtp-source gives up at the first refusal or broken connection: such a round sent fewer
  # than $MSGS messages and has no rate.
  if ! smtp-source -d -s $SESSIONS -m "$MSGS" -l $SIZE -f bench@origin.test -t rcpt@dest.test \
    "127.0.0.1:$1" >/dev/null 2>"$work/source.err"; then
    echo "smtp-source against 127.0.0.1:$1 failed: $(tail -n 1 "$work/source.err")" >&2
    return 1
  fi
  end=$(date +%s.%N)
  python3 -c "print(round($MSGS / ($end - $start)))"
}
# (Of an even count, the mean of the two middle values.)
median() { python3 -c 'import statistics, sys; print(round(statistics.median(map(float, sys.argv[1:]))))' "$@"; }
drain_postfix() { # let Postfix hand its queue to the sink before the next measurement
  local listing
  for _ in $(seq 1 600); do
    # A listing that fails says nothing about the queue: only a good, empty one ends the wait.
    listing=$(postqueue -j 2>/dev/null) || { sleep 0.2; continue; }
    [ -z "$listing" ] && return
    sleep 0.2
  done
  echo "warning: Postfix queue not empty (or not listed) after 120 s" >&2
}

drain_postern() { # metrics port: wait until every accepted message has been delivered
  for _ in $(seq 1 1500); do
    # A scrape that fails is looked at again, not the end of the script (set -e).
    depth=$(curl -s "http://127.0.0.1:$1/metrics" | awk '$1 == "postern_queue_depth" {print $2}') \
      || { sleep 0.2; continue; }
    [ "$depth" = 0 ] && return
    sleep 0.2
  done
  echo "warning: postern queue not empty after 300 s" >&2
}

declare -A result
targets=(postern postern1 postfix sink)
# Postfix's queue is emptied of anything left from before, so no old delivery runs meanwhile.
postsuper -d ALL >/dev/null 2>&1 || true
for round in $(seq 1 "$ROUNDS"); do
  # Each round starts with the next receiver, so none is always first (or always after a
  # drain).
  order=("${targets[@]:$(( (round - 1) % 4 ))}" "${targets[@]:0:$(( (round - 1) % 4 ))}")
  for target in "${order[@]}"; do
    case $target in
      postern) p=$POSTERN_PORT;; postern1) p=$POSTERN1_PORT;;
      postfix) p=$POSTFIX_PORT;; sink) p=$SINK_PORT;;
    esac
    result[$target]+="$(rate $p) "
    case $target in
      # postern1 holds what it accepts (--hold): nothing to drain.
      postern) drain_postern $METRICS_PORT;;
      postfix) drain_postfix;;
    esac
  done
done
pm=$(median ${result[postern]}); p1=$(median ${result[postern1]})
fm=$(median ${result[postfix]}); sm=$(median ${result[sink]})
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo "| receiver (smtp-source -d -s $SESSIONS -m $MSGS -l $SIZE) | rounds (msg/s) | median msg/s | postern (all cores) / this | postern --cores 1 --hold / this |"
echo "| --- | --- | --- | --- | --- |"
echo "| postern, durable spool, relaying, all cores | ${result[postern]}| $pm | 1.00 | $(ratio $p1 $pm) |"
echo "| postern, durable spool, accepting only (--hold), --cores 1 | ${result[postern1]}| $p1 | $(ratio $pm $p1) | 1.00 |"
echo "| Postfix relay, durable queue | ${result[postfix]}| $fm | $(ratio $pm $fm) | $(ratio $p1 $fm) |"
echo "| Postfix smtp-sink, stores nothing | ${result[sink]}| $sm | $(ratio $pm $sm) | $(ratio $p1 $sm) |"
