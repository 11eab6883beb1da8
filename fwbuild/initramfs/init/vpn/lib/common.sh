# shellcheck shell=sh
# Library of the VPN init (/lib/fwbuild-init/common.sh): what every part uses.

# One console line; the init's stdout is the console, so is the supervisor's.
say() {
    echo "walt-vpn: $*"
}
