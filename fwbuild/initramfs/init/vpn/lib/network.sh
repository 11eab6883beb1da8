# shellcheck shell=sh
# Library of the VPN init (/lib/fwbuild-init/network.sh): the mini-root, credentials,
# DHCP, the SSH master connection (tunnel, gate commands) and its supervisor.

# The mini-root: a tmpfs holding a copy of the tools and helpers (not the kernel modules), the
# credentials and the ssh configuration. ssh, sshfs, udhcpc and the supervisor run
# chrooted in it, so they keep working after switch_root empties the initramfs.
make_miniroot() {
    mkdir -p "$VPN"
    mount -t tmpfs -o mode=0755 walt-vpn "$VPN"
    for entry in /*; do
        case "$entry" in
            /proc|/sys|/dev|/run|/tmp|"$VPN"|/init|/newroot|/overlay|/lower) ;;
            *) cp -a "$entry" "$VPN/" ;;
        esac
    done
    rm -rf "$VPN/lib/modules" "$VPN/usr/lib/modules"
    mkdir -p "$VPN/proc" "$VPN/sys" "$VPN/dev" "$VPN/run" "$VPN/tmp" "$VPN/etc/ssh" \
        "$VPN/root" "$VPN/mnt/root"
    mount --bind /dev "$VPN/dev"
    mount -t proc proc "$VPN/proc"
    mount -t sysfs sysfs "$VPN/sys"
    echo "root:x:0:0:root:/root:/bin/sh" > "$VPN/etc/passwd"
    echo "root:x:0:" > "$VPN/etc/group"
    : > "$VPN/etc/resolv.conf"
}

unpack_credentials() {
    (
        umask 077
        mkdir -p "$VPN/creds"
        chmod 0700 "$VPN/creds"
        # printf is a shell builtin: the secret never appears in a process argument list.
        printf '%s' "$CFG_WALT_VPN_CREDS" | base64 -d 2>/dev/null \
            | tar -xzf - -C "$VPN/creds" 2>/dev/null
    ) || fatal "config: WALT_VPN_CREDS is not a base64 tar.gz"
    CFG_WALT_VPN_CREDS=
    unset CFG_WALT_VPN_CREDS
    # fwbuild's names, or WalT's client's (id_walt_vpn, id_walt_vpn-cert.pub)
    KEY_NAME=id_ed25519
    if [ ! -e "$VPN/creds/id_ed25519" ] && [ -e "$VPN/creds/id_walt_vpn" ]; then
        KEY_NAME=id_walt_vpn
    fi
    for name in $KEY_NAME $KEY_NAME-cert.pub known_hosts; do
        [ -s "$VPN/creds/$name" ] || fatal "config: WALT_VPN_CREDS lacks $name (or id_walt_vpn, as WalT writes it)"
        chmod 0600 "$VPN/creds/$name"
    done
}

# One ssh configuration for the master connection, sshfs and the supervisor.
write_ssh_config() {
    proxy_command=
    if [ -n "${CFG_WALT_VPN_HTTP_PROXY:-}" ]; then
        proxy_command="ProxyCommand /bin/vpn-http-connect ${CFG_WALT_VPN_HTTP_PROXY%:*} ${CFG_WALT_VPN_HTTP_PROXY##*:} %h %p"
    fi
    {
        echo "Host walt-vpn-entrypoint"
        echo "  HostName $ENTRY_HOST"
        echo "  Port $ENTRY_PORT"
        echo "  User $USER"
        if [ -n "${CFG_WALT_VPN_PROXY_JUMP:-}" ]; then
            echo "  ProxyJump walt-vpn-jump"
            jump=$CFG_WALT_VPN_PROXY_JUMP
            jump_user=$USER
            case "$jump" in *@*) jump_user=${jump%%@*}; jump=${jump#*@} ;; esac
            jump_port=22
            case "$jump" in *:*) jump_port=${jump##*:}; jump=${jump%:*} ;; esac
            echo "Host walt-vpn-jump"
            echo "  HostName $jump"
            echo "  Port $jump_port"
            echo "  User $jump_user"
        fi
        # With a jump host, the proxy is crossed to reach the jump host.
        [ -z "$proxy_command" ] || echo "  $proxy_command"
        echo "Host *"
        echo "  IdentityFile /creds/$KEY_NAME"
        echo "  CertificateFile /creds/$KEY_NAME-cert.pub"
        echo "  IdentitiesOnly yes"
        echo "  UserKnownHostsFile /creds/known_hosts"
        echo "  GlobalKnownHostsFile /dev/null"
        echo "  StrictHostKeyChecking yes"
        echo "  UpdateHostKeys no"
        echo "  CheckHostIP no"
        echo "  BatchMode yes"
        echo "  ConnectTimeout $CONNECT_TIMEOUT"
        echo "  ServerAliveInterval $SERVER_ALIVE_INTERVAL"
        echo "  ServerAliveCountMax $SERVER_ALIVE_COUNT"
        echo "  ControlPath $CTL"
        echo "  LogLevel ERROR"
        # zlib on the connection (SSH_COMPRESSION, fwbuild-init.conf): an ext4 root's blocks
        # compress about 3:1, which is what a slow path needs (measured at 200 ms, 20 Mbit/s);
        # ssh_master_args turns it off on walt-net.
        [ "$SSH_COMPRESSION" != 1 ] || echo "  Compression yes"
    } > "$VPN/etc/ssh/ssh_config"
}

first_interface() {
    for path in /sys/class/net/eth0 /sys/class/net/*; do
        name=${path##*/}
        case "$name" in lo|walt-vpn|tap*|'*') continue ;; esac
        [ -e "$path" ] && { echo "$name"; return 0; }
    done
    return 1
}

bring_up_network() {
    while :; do
        IFACE=$(first_interface)
        if [ -n "$IFACE" ]; then
            ip link set lo up
            ip link set "$IFACE" up
            rm -f "$VPN/run/dhcp-domain"
            if chroot "$VPN" udhcpc -i "$IFACE" -s /bin/vpn-udhcpc -n -t 4 -T 2 -A 2 \
                    -p /run/udhcpc.pid >/dev/null 2>&1; then
                DOMAIN=$(cat "$VPN/run/dhcp-domain" 2>/dev/null)
                say "network: $IFACE is up (DHCP lease obtained${DOMAIN:+, domain $DOMAIN})"
                return 0
            fi
            fail "network: no DHCP lease on $IFACE"
        else
            fail "network: no wired interface found"
        fi
    done
}

# ssh's error output, turned into one line naming the cause.
describe_ssh_error() {
    log=$1
    if grep -q "walt-vpn:" "$log"; then
        sed -n 's/.*walt-vpn: //p' "$log" | head -n 1
    elif grep -qiE "host key verification failed|REMOTE HOST IDENTIFICATION|host key .* not known|no .* host key is known" "$log"; then
        echo "SSH entrypoint $ENTRY_HOST:$ENTRY_PORT presented a host key that is not pinned (refused)"
    elif grep -q "Permission denied" "$log"; then
        echo "SSH entrypoint $ENTRY_HOST:$ENTRY_PORT refused the node certificate (revoked, expired or wrong principal)"
    elif grep -qiE "connection refused|timed out|no route|unreachable|could not resolve|connection closed|connection reset" "$log"; then
        echo "SSH entrypoint $ENTRY_HOST:$ENTRY_PORT unreachable ($(grep -m1 -oiE 'connection refused|timed out|no route to host|network is unreachable|could not resolve[^:]*|connection closed|connection reset' "$log"))"
    else
        echo "SSH connection to $ENTRY_HOST:$ENTRY_PORT failed ($(tail -n 1 "$log" | tr -d '\000-\037\177-\377' | cut -c1-120))"
    fi
}

# The SSH master connection, authenticated once, shared by the tunnel and sshfs.
# `-f` returns only after authentication; a refused tunnel does not stop it.
# On walt-net (DHCP domain walt) the entrypoint is on the node's LAN: no compression there
# (ssh_config asks for it on every other path).
ssh_master_args() {
    tunnel_args=
    [ "$WANT_TUNNEL" = 1 ] && tunnel_args="-o Tunnel=ethernet -w any:any"
    [ "${DOMAIN:-}" = walt ] && tunnel_args="$tunnel_args -o Compression=no"
    echo "-M -S $CTL -o ControlPersist=no -o ExitOnForwardFailure=no $tunnel_args -f -N walt-vpn-entrypoint"
}

connect_ssh() {
    while :; do
        # shellcheck disable=SC2046
        if chroot "$VPN" ssh $(ssh_master_args) 2>/tmp/ssh.err; then
            say "ssh: authenticated to $ENTRY_HOST:$ENTRY_PORT as $USER (certificate, pinned host key)"
            return 0
        fi
        fail "$(describe_ssh_error /tmp/ssh.err)"
    done
}

write_supervisor_env() {
    cat > "$VPN/run/supervisor.env" <<SUPERVISOR_EOF
CTL=$CTL
RETRIES=$RETRIES
BACKOFF_FIRST=$BACKOFF_FIRST
BACKOFF_MAX=$BACKOFF_MAX
MIN_SESSION=$MIN_SESSION
TAP_WAIT=$TAP_WAIT
WANT_TUNNEL=$WANT_TUNNEL
MAC=$CFG_WALT_VPN_MAC
MASTER_ARGS="$(ssh_master_args)"
SUPERVISOR_EOF
}

# The tunnel's tap device becomes walt-vpn with WALT_VPN_MAC (same code as reconnections).
setup_tap() {
    write_supervisor_env
    chroot "$VPN" /bin/vpn-supervisor setup-tap
}

# The supervisor keeps the master connection (and the tunnel) alive after switch_root.
# Its stdout (only its `say` lines) stays open on the console through switch_root.
start_supervisor() {
    chroot "$VPN" setsid /bin/vpn-supervisor </dev/null >/dev/console 2>/dev/null &
}

