# shellcheck shell=sh
# shellcheck disable=SC2034  # its globals are read by the other files /init sources
# (shellcheck checks each library file alone)
# Library of the VPN init (/lib/fwbuild-init/flash.sh): the EEPROM, first boot (enroll,
# self-flash) and every boot (compare with the server's digest, re-flash).

EEPROM_TOOL=$VPN/bin/vpn-eeprom
ETMP=${TMPDIR:-/tmp}
# EEPROM_RETRIES comes from the init's settings (fwbuild-init.conf).

# One line from a failed busybox wget: its last stderr line without the "wget: " prefix.
describe_wget_error() {
    tail -n 1 "$1" 2>/dev/null | sed 's/^wget: //' | tr -d '\000-\037\177-\377' | cut -c1-100
}

# check_and_flash NEW DIGEST: check NEW against DIGEST and the running EEPROM's boot key,
# flash it, read it back. On failure prints one line saying why and returns 1 (a check
# failed: nothing was written) or 2 (the write failed: no second try in this boot).
# Never returns on success: the node reboots into the new EEPROM.
check_and_flash() {
    why=$("$EEPROM_TOOL" check "$1" "$2" "$ETMP/eeprom-running.bin") \
        || { echo "image refused, not flashed: $why"; return 1; }
    note "flash: image sha256 ${2%"${2#????????????????}"} checked (2712 structure, expected digest, boot key); writing the flash"
    why=$("$EEPROM_TOOL" flash "$1" "$ETMP/eeprom-running.bin") \
        || { echo "flashing failed: $why"; return 2; }
    note "flash: EEPROM written and verified by read-back (sha256 ${2%"${2#????????????????}"}); rebooting"
    sync
    reboot -f
    sleep 5
    echo b > /proc/sysrq-trigger
    while :; do sleep 3600; done
}

# Progress lines from functions whose stdout is captured (the "why" of a failure).
note() {
    say "$@" >&2
}

valid_digest() {
    case "$1" in
        [0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f][0-9a-f]*) ;;
        *) return 1 ;;
    esac
    [ "$(printf '%s' "$1" | tr -d '0-9a-f' | wc -c)" -eq 0 ] && [ "$(printf '%s' "$1" | wc -c)" -eq 64 ]
}

# First boot (the recovery EEPROM HTTP-booted this initramfs; its config holds no
# WALT_VPN_* value): enroll with the server on walt-net (the server binds the node to its
# address), fetch this node's own image and expected digest, check, flash, reboot.
first_boot() {
    host=${CFG_HTTP_HOST:-}
    port=${CFG_HTTP_PORT:-80}
    case "$host" in
        ''|*[!A-Za-z0-9.-]*) fatal "config: no WALT_VPN_CREDS and no usable HTTP_HOST: cannot enroll" ;;
    esac
    case "$port" in ''|*[!0-9]*) fatal "config: HTTP_PORT is not a number" ;; esac
    say "first boot: no credentials in the EEPROM config; enrolling with the server at $host:$port"
    backend=$("$EEPROM_TOOL" backend) || fatal "flash: $backend"
    bring_up_network
    mac=$(cat "/sys/class/net/$IFACE/address")
    mac12=$(echo "$mac" | tr -d :)
    base=http://$host:$port/walt-vpn
    enrolled=
    while :; do
        if [ -z "$enrolled" ]; then
            if ! wget -q -O "$ETMP/enroll.json" --post-data "mac=$mac" "$base/enroll" 2>"$ETMP/wget.err"; then
                fail "enroll: $base/enroll failed ($(describe_wget_error "$ETMP/wget.err"))"
                continue
            fi
            enrolled=1
            say "enroll: the server enrolled this node ($mac)"
        fi
        if ! wget -q -O "$ETMP/eeprom-digest" "$base/node/$mac12/eeprom-digest" 2>"$ETMP/wget.err"; then
            fail "flash: fetching eeprom-digest failed ($(describe_wget_error "$ETMP/wget.err"))"
            continue
        fi
        digest=$(head -c 80 "$ETMP/eeprom-digest" | tr -d '\n')
        if ! valid_digest "$digest"; then
            fail "flash: the server's eeprom-digest is not a sha256"
            continue
        fi
        if ! wget -q -O "$ETMP/eeprom-new.bin" "$base/node/$mac12/pieeprom.bin" 2>"$ETMP/wget.err"; then
            fail "flash: fetching pieeprom.bin failed ($(describe_wget_error "$ETMP/wget.err"))"
            continue
        fi
        why=$("$EEPROM_TOOL" read "$ETMP/eeprom-running.bin") || fatal "flash: $why"
        why=$(check_and_flash "$ETMP/eeprom-new.bin" "$digest")
        # At most one flash per boot: a failed write reboots (the flash stays bootable).
        [ $? -eq 2 ] && fatal "flash: $why"
        fail "flash: $why"
    done
}

# An enforced node on walt-net (DHCP domain walt) boots without the tunnel only when the
# server, reached with the pinned host key, confirms its address is inside walt-net
# (WalT's anti-relay `check-in-walt-net`): a fake "walt" network relaying to the server
# is refused, and the node reconnects with its tunnel as anywhere else.
check_in_walt_net() {
    if ssh_gate check-in-walt-net "$ETMP/check-in" && [ "$(cat "$ETMP/check-in")" = OK ]; then
        say "network: on walt-net, confirmed by the server (check-in-walt-net): no tunnel"
        return 0
    fi
    why=$(cat "$ETMP/check-in" "$ETMP/gate.err" 2>/dev/null | head -n 1 | sed 's/^walt-vpn: //' | tr -d '\000-\037\177-\377' | cut -c1-80)
    say "network: the server did not confirm walt-net (${why:-no answer}): using the tunnel"
    chroot "$VPN" ssh -S "$CTL" -O exit walt-vpn-entrypoint >/dev/null 2>&1
    WANT_TUNNEL=1
    connect_ssh
}

# ssh_gate COMMAND OUT: run one of the SSH gate's commands over the master connection.
ssh_gate() {
    chroot "$VPN" ssh walt-vpn-entrypoint "$1" > "$2" 2>"$ETMP/gate.err"
}

# Every boot, once connected: the server's expected digest (SSH gate) against the running
# EEPROM; different -> fetch the image over the same authenticated channel, check, flash,
# reboot. Bad answers cost one line each and a backoff; after EEPROM_RETRIES the node boots
# with the EEPROM it has (which keeps working).
eeprom_update() {
    backend=$("$EEPROM_TOOL" backend) || { say "flash: $backend; not checking the EEPROM"; return 0; }
    tries=0
    wait=$BACKOFF_FIRST
    while :; do
        why=$(eeprom_update_once)
        case $? in
            0) return 0 ;;
            2) say "flash: $why; no second flash in this boot: booting on"; return 0 ;;
        esac
        tries=$((tries + 1))
        if [ "$tries" -ge "$EEPROM_RETRIES" ]; then
            say "flash: $why; booting with the current EEPROM (attempt $tries/$EEPROM_RETRIES)"
            return 0
        fi
        say "flash: $why; retrying in ${wait}s (attempt $tries/$EEPROM_RETRIES)"
        sleep "$wait"
        wait=$((wait * 2))
        [ "$wait" -le "$BACKOFF_MAX" ] || wait=$BACKOFF_MAX
    done
}

gate_error() {
    line=$(tail -n 1 "$ETMP/gate.err" 2>/dev/null | sed 's/^walt-vpn: //' | tr -d '\000-\037\177-\377' | cut -c1-100)
    echo "the SSH gate's $1 failed${line:+ ($line)}"
}

eeprom_update_once() {
    ssh_gate eeprom-digest "$ETMP/eeprom-digest" || {
        # 3: the server renders no EEPROM for this node (its own client, WalT's, writes it)
        [ $? -eq 3 ] && { note "flash: $(tail -n 1 "$ETMP/gate.err" | sed 's/^walt-vpn: //' | tr -d '\000-\037\177-\377' | cut -c1-120); not checking the EEPROM"; return 0; }
        gate_error eeprom-digest; return 1; }
    digest=$(head -c 80 "$ETMP/eeprom-digest" | tr -d '\n')
    valid_digest "$digest" || { echo "the server's eeprom-digest is not a sha256"; return 1; }
    why=$("$EEPROM_TOOL" read "$ETMP/eeprom-running.bin") || { echo "$why"; return 1; }
    running=$(sha256sum "$ETMP/eeprom-running.bin" | cut -d' ' -f1)
    if [ "$running" = "$digest" ]; then
        note "flash: the running EEPROM is the one the server expects (sha256 ${digest%"${digest#????????????????}"}); nothing to flash"
        return 0
    fi
    note "flash: the server expects EEPROM sha256 ${digest%"${digest#????????????????}"}, this node runs ${running%"${running#????????????????}"}: fetching its image"
    ssh_gate eeprom-image "$ETMP/eeprom-new.bin" || { gate_error eeprom-image; return 1; }
    check_and_flash "$ETMP/eeprom-new.bin" "$digest"
}
