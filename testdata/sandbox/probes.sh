#!/bin/bash
# Escape probes: an attacker inside a stage tries each door and prints `door NAME open|shut`.
# The test that runs this (bins/tests/sandbox.rs) passes what to aim at in the environment:
#   PROBE_SECRET_FILE, PROBE_SECRET  a host file outside the workspace (under /root) and its content
#   PROBE_KEY_FILE                   the node's key file (the server key, which opens credentials)
#   PROBE_MARKER                     a value only the host pond process's environment holds
#   PROBE_HOST_PORT                  a service on the host's 127.0.0.1 (pond's API)
#   PROBE_LAN                        ip:port of an HTTP service on the host's network address
#   PROBE_OUTSIDE                    a host path outside the workspace to create
say() { echo "door $1 $2"; }
try() { if "${@:2}" >/dev/null 2>&1; then say "$1" open; else say "$1" shut; fi; }

try read_root grep -qs "$PROBE_SECRET" "$PROBE_SECRET_FILE"
try read_key_file test -s "$PROBE_KEY_FILE" -a -r "$PROBE_KEY_FILE"
try host_environ sh -c 'cat /proc/[0-9]*/environ 2>/dev/null | tr "\0" "\n" | grep -q "^OPENAI_API_KEY=$PROBE_MARKER"'
echo pwned > "$PROBE_OUTSIDE" 2>/dev/null
try write_system sh -c 'echo pwned > /usr/pond-pwned && rm -f /usr/pond-pwned'
try host_loopback timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PROBE_HOST_PORT"
try lan_direct timeout 3 bash -c "exec 3<>/dev/tcp/${PROBE_LAN%:*}/${PROBE_LAN#*:}"
try lan_http curl -sf --max-time 5 "http://$PROBE_LAN/"
try dns timeout 5 getent hosts registry.npmjs.org
try unshare_user unshare -U true
# AF_VSOCK (40): on a VM, a path to the hypervisor host outside the egress allowlist.
try vsock perl -e 'socket(my $s, 40, 1, 0) or exit 1'
# AF_PACKET (17), SOCK_RAW: raw frames off the host's interfaces.
try packet_socket perl -e 'socket(my $s, 17, 3, 0) or exit 1'
try mount unshare -m sh -c 'mount -t tmpfs probe /mnt'
sleep 30 & victim=$!
try ptrace perl -e 'exit(syscall(101, 16, $ARGV[0] + 0, 0, 0) == 0 ? 0 : 1)' "$victim"
kill -9 "$victim" 2>/dev/null
# A fork bomb, bounded here so that the `none` run does not take the host down: 300 processes.
forks=$(perl -e 'my @kids; for (1..300) { my $p = fork(); last unless defined $p; if ($p == 0) { sleep 20; exit 0 } push @kids, $p } print scalar(@kids); kill 9, @kids;')
if [ "${forks:-0}" -ge 300 ]; then say fork_bomb open; else say fork_bomb shut; fi
echo "forks $forks"
exit 0
