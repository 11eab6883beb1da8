# shellcheck shell=sh
# shellcheck disable=SC2034  # its globals are read by the other files /init sources
# (shellcheck checks each library file alone)
# Library of the VPN init (/lib/fwbuild-init/config.sh): the node's configuration
# (fw_cfg or blconfig nvmem, the kernel command line) and its checks. The build's own
# settings (RETRIES, FW_CFG_NAME, ...) are in /etc/fwbuild-init.conf, sourced before this.

SYS=/sys
FW_CFG_CONFIG=/sys/firmware/qemu_fw_cfg/by_name/$FW_CFG_NAME/raw
VPN=/vpn
CTL=/run/ssh-master.sock

# ---- configuration ---------------------------------------------------------------------

# The running bootloader config as text: QEMU fw_cfg (virtual Pi 5), else the blconfig
# nvmem (Pi 5: the node named by the devicetree alias `blconfig`).
read_config_text() {
    if [ -r "$FW_CFG_CONFIG" ]; then
        cat "$FW_CFG_CONFIG"
        return 0
    fi
    alias=$SYS/firmware/devicetree/base/aliases/blconfig
    [ -r "$alias" ] || return 1
    node=$(tr -d '\000' < "$alias")
    for dev in "$SYS"/bus/nvmem/devices/*; do
        [ -e "$dev/of_node" ] || continue
        of=$(readlink -f "$dev/of_node")
        if [ "$of" = "$(readlink -f "$SYS/firmware/devicetree/base$node")" ]; then
            tr -d '\000' < "$dev/nvmem"
            return 0
        fi
    done
    return 1
}

# One parser for both sources: KEY=value lines; [section] lines, comments and blank
# lines are ignored; the last value wins. Each key becomes CFG_<KEY>. Values are never
# evaluated (eval only sees the validated key name).
parse_config() {
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%"$(printf '\r')"}
        case "$line" in
            ''|'#'*|'['*) continue ;;
            *=*) ;;
            *) continue ;;
        esac
        key=${line%%=*}
        value=${line#*=}
        case "$key" in
            ''|*[!A-Za-z0-9_]*) continue ;;
        esac
        eval "CFG_$key=\$value"
    done
}

# Kernel command line overrides for tests and debugging: walt_vpn.retries=N,
# walt_vpn.backoff=SECONDS, walt_vpn.min_session=SECONDS, walt_vpn.flash_pause=STEP (the
# EEPROM write stops after that step and waits, for a power cut).
parse_cmdline() {
    # shellcheck disable=SC2013  # the command line is one line of words
    for word in $(cat /proc/cmdline); do
        case "${word#*=}" in ''|*[!0-9]*) continue ;; esac
        case "$word" in
            walt_vpn.retries=*) RETRIES=${word#*=} ;;
            walt_vpn.backoff=*) BACKOFF_FIRST=${word#*=} ;;
            walt_vpn.min_session=*) MIN_SESSION=${word#*=} ;;
            walt_vpn.flash_pause=*) VPN_EEPROM_PAUSE=${word#*=}; export VPN_EEPROM_PAUSE ;;
            walt_vpn.prefetch_streams=*) PREFETCH_STREAMS=${word#*=} ;;
            walt_vpn.prefetch_wait=*) PREFETCH_WAIT=${word#*=} ;;
            walt_vpn.compression=*) SSH_COMPRESSION=${word#*=} ;;
        esac
    done
}


# Required: WALT_VPN_MAC, WALT_VPN_ENTRYPOINT, WALT_VPN_CREDS (what WalT's own client
# writes). Optional, with defaults: WALT_VPN_BOOT_MODE (enforced), WALT_VPN_USER (walt-vpn),
# WALT_VPN_ROOT (default: the root the SSH gate gives this node's certificate, found by
# attach_root with no site path; a non-empty VPN_ROOT_DEFAULT from the init's settings,
# fwbuild-init.conf, with {mac12}/{mac} = this node's Ethernet MAC, replaces it). The mode
# is read first, so a missing key in permissive mode falls back like any permissive failure.

check_config() {
    case "${CFG_WALT_VPN_BOOT_MODE:-enforced}" in
        enforced|permissive) MODE=${CFG_WALT_VPN_BOOT_MODE:-enforced} ;;
        *) fatal "config: WALT_VPN_BOOT_MODE must be enforced or permissive" ;;
    esac
    for key in WALT_VPN_MAC WALT_VPN_ENTRYPOINT WALT_VPN_CREDS; do
        eval "value=\${CFG_$key:-}"
        [ -n "$value" ] || fatal "config: $key is missing"
    done
    value=
    ROOT_NAME=${CFG_WALT_VPN_ROOT:-}
    if [ -z "${CFG_WALT_VPN_ROOT:-}" ] && [ -z "${VPN_ROOT_DEFAULT:-}" ]; then
        ROOT_NAME="the SSH gate's root for this node"
        say "config: no WALT_VPN_ROOT (a WalT-written EEPROM): root = $ROOT_NAME"
    elif [ -z "${CFG_WALT_VPN_ROOT:-}" ]; then
        iface=$(first_interface) || fatal "config: no WALT_VPN_ROOT and no network interface to name the default"
        own_mac=$(tr 'A-F' 'a-f' < "/sys/class/net/$iface/address" 2>/dev/null)
        own_mac12=$(printf '%s' "$own_mac" | tr -d :)
        CFG_WALT_VPN_ROOT=$(printf '%s' "$VPN_ROOT_DEFAULT" | sed "s/{mac12}/$own_mac12/g; s/{mac}/$own_mac/g")
        ROOT_NAME=$CFG_WALT_VPN_ROOT
        say "config: no WALT_VPN_ROOT (a WalT-written EEPROM): root $CFG_WALT_VPN_ROOT"
    fi
    USER=${CFG_WALT_VPN_USER:-walt-vpn}
    case "$CFG_WALT_VPN_MAC" in
        [0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]:[0-9a-f][0-9a-f]) ;;
        *) fatal "config: WALT_VPN_MAC is not a lowercase MAC address" ;;
    esac
    case "${CFG_WALT_VPN_ROOT:-}" in
        /*|'') ;;
        *) fatal "config: WALT_VPN_ROOT must be an absolute path" ;;
    esac
    case "$USER" in
        ''|*[!A-Za-z0-9_.-]*) fatal "config: WALT_VPN_USER has unexpected characters" ;;
    esac
    case "$CFG_WALT_VPN_ENTRYPOINT" in
        *:*) ENTRY_HOST=${CFG_WALT_VPN_ENTRYPOINT%:*}; ENTRY_PORT=${CFG_WALT_VPN_ENTRYPOINT##*:} ;;
        *) ENTRY_HOST=$CFG_WALT_VPN_ENTRYPOINT; ENTRY_PORT=22 ;;
    esac
    case "$ENTRY_PORT" in
        ''|*[!0-9]*) fatal "config: WALT_VPN_ENTRYPOINT port is not a number" ;;
    esac
    case "$ENTRY_HOST" in
        ''|*[!A-Za-z0-9.-]*) fatal "config: WALT_VPN_ENTRYPOINT host has unexpected characters" ;;
    esac
    # These reach ssh's configuration (ProxyCommand runs through a shell): only
    # host[:port] and [user@]host[:port] made of safe characters pass.
    if [ -n "${CFG_WALT_VPN_HTTP_PROXY:-}" ]; then
        case "$CFG_WALT_VPN_HTTP_PROXY" in
            *:*) ;;
            *) fatal "config: WALT_VPN_HTTP_PROXY must be host:port" ;;
        esac
        case "${CFG_WALT_VPN_HTTP_PROXY%:*}" in
            ''|*[!A-Za-z0-9.-]*) fatal "config: WALT_VPN_HTTP_PROXY host has unexpected characters" ;;
        esac
        case "${CFG_WALT_VPN_HTTP_PROXY##*:}" in
            ''|*[!0-9]*) fatal "config: WALT_VPN_HTTP_PROXY port is not a number" ;;
        esac
    fi
    if [ -n "${CFG_WALT_VPN_PROXY_JUMP:-}" ]; then
        case "$CFG_WALT_VPN_PROXY_JUMP" in
            *[!A-Za-z0-9_.@:-]*|*@*@*|@*|*:*:*) fatal "config: WALT_VPN_PROXY_JUMP is not [user@]host[:port]" ;;
        esac
        case "$CFG_WALT_VPN_PROXY_JUMP" in
            *:*) case "${CFG_WALT_VPN_PROXY_JUMP##*:}" in
                     ''|*[!0-9]*) fatal "config: WALT_VPN_PROXY_JUMP port is not a number" ;;
                 esac ;;
        esac
    fi
}
