#!/usr/bin/env bash
# A cluster of K "hosts" on this machine, to measure what a network does to training.
#
#   scripts/local_cluster.sh K MBIT COMMAND
#
# Each host is a network namespace with one interface, eth0 (10.251.0.N/24), plugged into a
# bridge that lives in a namespace of its own (the "switch"); each host's link is limited to
# MBIT megabits per second in each direction with tc's token bucket. Every host runs its own
# sshd, so COMMAND, run on host 1, launches ranks as on real nodes:
#
#   scripts/local_cluster.sh 2 1000 'horovodrun -np 2 -H $CLUSTER_HOSTS --network-interface eth0 \
#       .venv/bin/python -m lm1b_hvd.bench --preset small'
#
# COMMAND is run by bash on host 1, in this directory, with $CLUSTER_HOSTS set to
# "10.251.0.1:1,...,10.251.0.K:1" and an `ssh` first in PATH that knows the cluster's keys.
# The cluster's keys, configuration and logs live in a temporary folder; the namespaces, the
# daemons and that folder are removed when the command ends, fails or is interrupted. Nothing
# is configured outside the namespaces it makes: the addresses exist only inside them, and no
# traffic leaves them. Needs root, iproute2 (ip, tc) and openssh-server (bash install.sh
# --with-test-tools installs them). The exit status is COMMAND's.
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
}
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  usage
  exit 0
fi
if [ $# -lt 3 ]; then
  echo "local_cluster.sh: expected K MBIT COMMAND (see --help)" >&2
  exit 2
fi
hosts=$1
mbit=$2
shift 2
command_text="$*"
if ! [[ "$hosts" =~ ^[0-9]+$ ]] || [ "$hosts" -lt 1 ] || [ "$hosts" -gt 16 ]; then
  echo "local_cluster.sh: K must be a number of hosts from 1 to 16, got '$hosts'" >&2
  exit 2
fi
if ! [[ "$mbit" =~ ^[0-9]+$ ]] || [ "$mbit" -lt 1 ]; then
  echo "local_cluster.sh: MBIT must be a whole number of megabits per second >= 1, got '$mbit'" >&2
  exit 2
fi
for tool in ip tc /usr/sbin/sshd ssh ssh-keygen; do
  if ! command -v "$tool" >/dev/null; then
    echo "local_cluster.sh: '$tool' not found; install iproute2 and openssh-server (bash install.sh --with-test-tools)" >&2
    exit 2
  fi
done
if [ "$(id -u)" -ne 0 ]; then
  echo "local_cluster.sh: network namespaces need root" >&2
  exit 2
fi

prefix="lmc$$"            # names of this cluster's namespaces and links (a link name is at most 15 characters)
subnet="10.251.0"
work=$(mktemp -d)
switch="${prefix}sw"
made_namespaces=()

teardown() {
  local status=$?
  trap - EXIT INT TERM HUP
  for pidfile in "$work"/sshd-*.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  # Deleting a namespace deletes the links in it, and with them their peers.
  for namespace in "${made_namespaces[@]}"; do
    ip netns pids "$namespace" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$namespace" 2>/dev/null || true
  done
  rm -rf "$work"
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

say() { echo "local_cluster: $*"; }

# Runs a command on host N: in its network namespace, under a host name of its own (a UTS
# namespace: what MPI and Horovod take a node to be), with its own /etc/hosts (bind-mounted in a
# mount namespace of its own; the file on disk is not touched) that resolves that name to the
# host's address, as a node's name resolves on a real cluster. Horovod 0.28's Gloo process sets
# find their address by the host name, not by HOROVOD_GLOO_IFACE.
on_host() {
  local n=$1
  shift
  ip netns exec "${prefix}h$n" unshare --mount --uts sh -c 'hostname "$1" && mount --bind "$0" /etc/hosts && shift && exec "$@"' \
    "$work/hosts-$n" "$(host_name "$n")" "$@"
}

host_name() { echo "${prefix}-host$1"; }

add_namespace() {
  ip netns add "$1"
  made_namespaces+=("$1")
  ip -n "$1" link set lo up
}

# tc's token bucket on one side of a link: MBIT megabits per second, a burst of 4 ms of traffic
# (at least 64 KiB, so that a full-size segment always fits) and up to 100 ms of queue.
limit_rate() {
  local namespace=$1 device=$2
  local burst=$((mbit * 1000000 / 8 / 250))
  [ "$burst" -lt 65536 ] && burst=65536
  ip netns exec "$namespace" tc qdisc add dev "$device" root tbf rate "${mbit}mbit" burst "$burst" latency 100ms
}

# --- the switch, the hosts and their links
add_namespace "$switch"
ip -n "$switch" link add br0 type bridge
ip -n "$switch" link set br0 up
host_list=()
for n in $(seq 1 "$hosts"); do
  host="${prefix}h$n"
  add_namespace "$host"
  ip link add "${prefix}a$n" netns "$host" type veth peer name "${prefix}b$n" netns "$switch"
  ip -n "$host" link set "${prefix}a$n" name eth0      # the same interface name on every host, as Horovod expects
  ip -n "$host" addr add "$subnet.$n/24" dev eth0
  ip -n "$host" link set eth0 up
  ip -n "$switch" link set "${prefix}b$n" master br0 up
  limit_rate "$host" eth0                 # what host n sends
  limit_rate "$switch" "${prefix}b$n"     # what host n receives
  host_list+=("$subnet.$n:1")
  printf '127.0.0.1 localhost\n%s %s\n' "$subnet.$n" "$(host_name "$n")" >"$work/hosts-$n"
done

# --- ssh: one key for the cluster, one sshd per host listening on its own address only
ssh-keygen -q -t ed25519 -N "" -f "$work/host_key"
ssh-keygen -q -t ed25519 -N "" -f "$work/id"
cp "$work/id.pub" "$work/authorized_keys"
mkdir -p /run/sshd   # sshd's privilege-separation folder, which its service would make
cat >"$work/ssh_config" <<EOF
Host $subnet.*
  IdentityFile $work/id
  UserKnownHostsFile $work/known_hosts
  StrictHostKeyChecking no
  BatchMode yes
  ConnectTimeout 10
  LogLevel ERROR
EOF
mkdir "$work/bin"
printf '#!/bin/sh\nexec /usr/bin/ssh -F %s "$@"\n' "$work/ssh_config" >"$work/bin/ssh"
chmod +x "$work/bin/ssh"
for n in $(seq 1 "$hosts"); do
  cat >"$work/sshd-$n.conf" <<EOF
ListenAddress $subnet.$n
HostKey $work/host_key
PidFile $work/sshd-$n.pid
AuthorizedKeysFile $work/authorized_keys
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
EOF
  on_host "$n" /usr/sbin/sshd -f "$work/sshd-$n.conf" -E "$work/sshd-$n.log"
done

# --- wait until host 1 reaches every host's sshd (at most 20 s). Each probe and pause runs in
# the background and is waited for, so that a signal meanwhile runs the teardown at once.
for n in $(seq 1 "$hosts"); do
  for attempt in $(seq 1 40); do
    on_host 1 "$work/bin/ssh" -o ConnectTimeout=1 "$subnet.$n" true 2>/dev/null &
    if wait $!; then
      break
    fi
    if [ "$attempt" -eq 40 ]; then
      echo "local_cluster.sh: host $n's sshd did not answer within 20 s:" >&2
      tail -n 5 "$work/sshd-$n.log" >&2 || true
      exit 1
    fi
    sleep 0.5 &
    wait $!
  done
done

cluster_hosts=$(IFS=,; echo "${host_list[*]}")
say "$hosts host(s) $cluster_hosts, each link ${mbit} Mbit/s each way; running on host 1: $command_text"
# In the background, so that a signal to this script runs its teardown at once (bash runs a
# trap only after the foreground command ends, but interrupts a `wait`).
on_host 1 env PATH="$work/bin:$PATH" CLUSTER_HOSTS="$cluster_hosts" HOROVOD_GLOO_IFACE=eth0 \
  bash -c "$command_text" &
set +e
wait $!
status=$?
set -e
say "done (exit $status); the cluster is torn down"
exit "$status"
