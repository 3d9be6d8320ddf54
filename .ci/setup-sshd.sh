#!/usr/bin/env bash
# Start the OpenSSH servers that tests/managers/test_ssh.py runs SSHManager against.
#
#   .ci/setup-sshd.sh         install (if needed) and start everything; safe to run again
#   .ci/setup-sshd.sh stop    stop the servers and remove the namespaces
#
# Needs root (apt-get, network namespaces, sshd). Keys, sshd_config, known_hosts and an ssh
# client config live in $DISTEXEC_SSHD_DIR (default /run/distexec-sshd); the tests pass
# `-F $DISTEXEC_SSHD_DIR/ssh_config` to ssh. /etc/ssh is not touched. ~/.ssh/config gets one
# marked block naming only the two namespace addresses, so that plain `ssh 10.213.1.2` works
# (what `distexec run --machine-file` does, with no way to pass ssh flags).
#
# What runs afterwards:
#   root namespace   sshd on 127.0.0.1:$DISTEXEC_SSHD_PORT (default 2222: a machine's own
#                    sshd usually has port 22)
#   namespace dxh1   sshd on 10.213.1.2:22, veth dxv1 (10.213.1.1 in the root namespace)
#   namespace dxh2   sshd on 10.213.2.2:22, veth dxv2 (10.213.2.1 in the root namespace)
# The root namespace routes between the two, so "hosts" dxh1 and dxh2 reach each other and
# the master reaches both. The file $DISTEXEC_SSHD_DIR/hosts lists "name address port".
set -euo pipefail

dir="${DISTEXEC_SSHD_DIR:-/run/distexec-sshd}"
port="${DISTEXEC_SSHD_PORT:-2222}"
namespaces=(dxh1 dxh2)

log() { echo "setup-sshd: $*"; }

ns_index() { echo "${1#dxh}"; }

# sshd_running PIDFILE [LISTEN]: is the process the pidfile names an sshd of ours (on LISTEN)? A
# pidfile can outlive its sshd (a machine restored from a snapshot keeps /run) and its pid be
# reused by another process, so a live pid alone proves nothing.
sshd_running() {
    local pid cmdline
    pid="$(cat "$1" 2>/dev/null || true)"
    [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = sshd ] || return 1
    cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
    [[ "$cmdline" == *"$dir/sshd_config"*"ListenAddress=${2:-}"* ]]
}

stop_all() {
    for pidfile in "$dir"/sshd-*.pid; do
        [ -f "$pidfile" ] || continue
        if sshd_running "$pidfile"; then
            kill "$(cat "$pidfile")" 2>/dev/null || true
        fi
        rm -f "$pidfile"
    done
    local home
    home="$(getent passwd "$(id -un)" | cut -d: -f6)"
    if [ -f "$home/.ssh/config" ]; then
        sed -i '/^# >>> distexec test hosts/,/^# <<< distexec test hosts/d' "$home/.ssh/config"
    fi
    for ns in "${namespaces[@]}"; do
        ip link del "dxv$(ns_index "$ns")" 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    log "stopped"
}

# iptables: the partition test (fault W12) drops a namespace host's packets.
install_packages() {
    if [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null && command -v ip >/dev/null \
            && command -v iptables >/dev/null; then
        return
    fi
    log "installing openssh-server, openssh-client, iproute2, iptables"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(openssh-server openssh-client iproute2 iptables)
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }
}

make_keys() {
    mkdir -p "$dir" /run/sshd
    chmod 700 "$dir"
    [ -f "$dir/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C distexec-test-host -f "$dir/host_ed25519"
    [ -f "$dir/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C distexec-test-client -f "$dir/id_ed25519"
    cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
    chmod 600 "$dir/authorized_keys"
    local hostkey
    hostkey="$(cut -d' ' -f1,2 "$dir/host_ed25519.pub")"
    {
        echo "[127.0.0.1]:$port $hostkey"
        for ns in "${namespaces[@]}"; do echo "10.213.$(ns_index "$ns").2 $hostkey"; done
    } >"$dir/known_hosts"
}

write_configs() {
    # ClientAlive*: a server whose client vanished (a cut link) ends the session within ~6 s,
    # and with it the remote worker, whose stdin then reaches EOF.
    cat >"$dir/sshd_config" <<EOF
HostKey $dir/host_ed25519
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PrintMotd no
ClientAliveInterval 2
ClientAliveCountMax 3
MaxStartups 100:30:200
MaxSessions 100
LogLevel ERROR
EOF
    cat >"$dir/ssh_config" <<EOF
Host *
    User root
    IdentityFile $dir/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $dir/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    LogLevel ERROR
EOF
    {
        echo "root 127.0.0.1 $port"
        for ns in "${namespaces[@]}"; do echo "$ns 10.213.$(ns_index "$ns").2 22"; done
    } >"$dir/hosts"
}

# A marked block at the top of ~/.ssh/config for the namespace hosts; "Host *" at its end puts
# the user's own lines that follow back in the global scope.
user_config_block() {
    local home config tmp
    home="$(getent passwd "$(id -un)" | cut -d: -f6)"
    config="$home/.ssh/config"
    mkdir -p "$home/.ssh"
    chmod 700 "$home/.ssh"
    touch "$config"
    tmp="$(mktemp)"
    {
        echo "# >>> distexec test hosts (.ci/setup-sshd.sh) >>>"
        echo "Host 10.213.1.2 10.213.2.2"
        sed -n '/^Host \*/,$p' "$dir/ssh_config" | tail -n +2
        echo "Host *"
        echo "# <<< distexec test hosts <<<"
        sed '/^# >>> distexec test hosts/,/^# <<< distexec test hosts/d' "$config"
    } >"$tmp"
    cat "$tmp" >"$config"
    rm -f "$tmp"
    chmod 600 "$config"
}

# start_sshd NAME LISTEN [NAMESPACE]: no-op when the one from an earlier run still runs.
start_sshd() {
    local name="$1" listen="$2" ns="${3:-}" pidfile="$dir/sshd-$1.pid"
    if sshd_running "$pidfile" "$listen"; then
        log "sshd $name already listening on $listen"
        return
    fi
    rm -f "$pidfile"
    local cmd=(/usr/sbin/sshd -f "$dir/sshd_config" -o "ListenAddress=$listen" -o "PidFile=$pidfile")
    local run=()
    [ -z "$ns" ] || run=(ip netns exec "$ns")
    "${run[@]}" "${cmd[@]}"
    # sshd forks before it binds: a port already taken is only seen as no pidfile appearing.
    local waited=0
    until sshd_running "$pidfile" "$listen"; do
        if [ "$waited" -ge 100 ]; then
            log "ERROR: sshd $name did not start on $listen; what listens there:" >&2
            "${run[@]}" ss -ltnp >&2 || true
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    log "sshd $name listening on $listen"
}

make_namespace() {
    local ns="$1" i root_if peer_if
    i="$(ns_index "$ns")"
    root_if="dxv$i"
    peer_if="dxv${i}p"
    # A name left in /run/netns by a machine restored from a snapshot names no namespace.
    if ip netns list 2>/dev/null | grep -qw "^$ns" && ! ip netns exec "$ns" true 2>/dev/null; then
        ip netns del "$ns" 2>/dev/null || rm -f "/run/netns/$ns"
    fi
    ip netns list 2>/dev/null | grep -qw "^$ns" || ip netns add "$ns"
    if ! ip link show "$root_if" >/dev/null 2>&1; then
        ip link add "$root_if" type veth peer name "$peer_if"
        ip link set "$peer_if" netns "$ns"
    fi
    ip addr replace "10.213.$i.1/24" dev "$root_if"
    ip link set "$root_if" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr replace "10.213.$i.2/24" dev "$peer_if"
    ip netns exec "$ns" ip link set "$peer_if" up
    ip netns exec "$ns" ip route replace default via "10.213.$i.1"
}

# The two "hosts": namespaces with their own sshd, reaching each other through the root one.
setup_namespaces() {
    echo 1 >/proc/sys/net/ipv4/ip_forward
    for ns in "${namespaces[@]}"; do
        make_namespace "$ns"
        start_sshd "$ns" "10.213.$(ns_index "$ns").2:22" "$ns"
    done
    for ns in "${namespaces[@]}"; do
        ssh -F "$dir/ssh_config" "10.213.$(ns_index "$ns").2" true
    done
    ip netns exec dxh1 ssh -F "$dir/ssh_config" 10.213.2.2 true
    ssh 10.213.1.2 true  # through the ~/.ssh/config block
}

main() {
    case "${1:-}" in
        stop) stop_all; return ;;
        namespaces) setup_namespaces; return ;;
    esac
    install_packages
    make_keys
    write_configs
    user_config_block
    start_sshd root "127.0.0.1:$port"
    ssh -F "$dir/ssh_config" -p "$port" 127.0.0.1 true
    # Without network namespaces (no CAP_NET_ADMIN) the loopback tests still run; the
    # multi-host ones then skip and say why.
    if ! "${BASH_SOURCE[0]}" namespaces; then
        log "WARNING: could not set up the namespace hosts dxh1/dxh2; multi-host SSH tests will skip"
    fi
    log "ready (state in $dir)"
}

main "$@"
