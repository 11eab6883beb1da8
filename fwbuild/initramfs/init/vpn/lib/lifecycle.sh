# shellcheck shell=sh
# Library of the VPN init (/lib/fwbuild-init/lifecycle.sh): failure handling (retry with
# backoff, then the mode's fallback) and the first steps (kernel filesystems, modules).

ATTEMPT=0
BACKOFF=
MODE=enforced

fallback_word() {
    if [ "$MODE" = permissive ]; then
        echo "dropping to a rescue shell (permissive mode)"
    else
        echo "rebooting (enforced mode)"
    fi
}

fallback() {
    if [ "$MODE" = permissive ]; then
        # shellcheck disable=SC2093  # the plain shell is meant for a busybox without setsid/cttyhack
        exec setsid cttyhack sh -i </dev/console >/dev/console 2>&1
        exec sh -i </dev/console >/dev/console 2>&1
    fi
    sync
    reboot -f
    sleep 5
    echo b > /proc/sysrq-trigger
    # Never fall through: the caller rejected its configuration.
    while :; do sleep 3600; done
}

# fail "what failed": one console line with what happens next, then backoff or fallback.
fail() {
    ATTEMPT=$((ATTEMPT + 1))
    [ -n "$BACKOFF" ] || BACKOFF=$BACKOFF_FIRST
    if [ "$ATTEMPT" -ge "$RETRIES" ]; then
        say "$1; giving up after $ATTEMPT attempts: $(fallback_word)"
        fallback
    fi
    say "$1; retrying in ${BACKOFF}s (attempt $ATTEMPT/$RETRIES)"
    sleep "$BACKOFF"
    BACKOFF=$((BACKOFF * 2))
    [ "$BACKOFF" -le "$BACKOFF_MAX" ] || BACKOFF=$BACKOFF_MAX
}

# A fatal problem no retry can fix (bad config): one line, then the fallback.
fatal() {
    say "$1: $(fallback_word)"
    fallback
}

mount_basics() {
    /bin/busybox mkdir -p /proc /sys /dev /run /tmp
    /bin/busybox mount -t proc proc /proc 2>/dev/null
    /bin/busybox --install -s
    mount -t sysfs sysfs /sys 2>/dev/null
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
    mkdir -p /dev/pts
    mount -t devpts devpts /dev/pts 2>/dev/null
    mount -t tmpfs -o mode=0755 tmpfs /run
    [ -e /dev/console ] || mknod /dev/console c 5 1
}

load_modules() {
    for module in $MODULES; do
        modprobe -q "$module" 2>/dev/null
    done
}
