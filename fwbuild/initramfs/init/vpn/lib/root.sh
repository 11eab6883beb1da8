# shellcheck shell=sh
# Library of the VPN init (/lib/fwbuild-init/root.sh): the read-only root over sshfs,
# the tmpfs overlay, switch_root.

# gate_root_image DIR: no WALT_VPN_ROOT, DIR is the gate's root for this node (sshfs of the
# SFTP start directory), read with one listing. A tree (it has /sbin) is the root itself
# (prints nothing); else the image (*.img, *.ext4, *.ext2) listed there (the gate lists an
# image root's image and its .prefetch only).
gate_root_image() {
    found=
    for entry in "$1"/*; do
        case "${entry##*/}" in
            sbin) return 0 ;;
            *.img|*.ext4|*.ext2)
                [ -z "$found" ] || { say "root: several images in the gate's root, using $found" >&2; break; }
                found=${entry##*/} ;;
        esac
    done
    echo "$found"
}

# The root: WALT_VPN_ROOT (a directory, or an image file loop-mounted), or without it the
# SFTP start directory the SSH gate gives this node (`walt-vpn-entrypoint:` with no path).
mount_root() {
    remote=${CFG_WALT_VPN_ROOT:-}
    image=
    case "$remote" in
        *.img|*.ext4|*.ext2) image=${remote##*/}; remote=${remote%/*} ;;
    esac
    [ -n "$remote" ] || [ -z "${CFG_WALT_VPN_ROOT:-}" ] || remote=/
    opts="ro,kernel_cache,allow_other,default_permissions,dir_cache=yes,reconnect"
    opts="$opts,entry_timeout=$CACHE_TIMEOUT,attr_timeout=$CACHE_TIMEOUT,negative_timeout=$CACHE_TIMEOUT"
    opts="$opts,dcache_timeout=$CACHE_TIMEOUT,dcache_max_size=1000000"
    # 64 KiB SFTP reads (sshfs's default is 32 KiB): fewer requests for the same bytes.
    opts="$opts,max_read=65536"
    while :; do
        if chroot "$VPN" sshfs -F /etc/ssh/ssh_config -o "$opts" \
                -o "ssh_command=ssh -o ControlMaster=no" \
                "walt-vpn-entrypoint:$remote" /mnt/root 2>/tmp/sshfs.err; then
            [ -n "${CFG_WALT_VPN_ROOT:-}" ] || image=$(gate_root_image "$VPN/mnt/root")
            if [ -z "$image" ]; then
                LOWER=$VPN/mnt/root
                say "root: mounted $ROOT_NAME read-only (sshfs over the SSH connection)"
                return 0
            fi
            mkdir -p /lower
            prefetch_image "$VPN/mnt/root/$image"
            if mount -t ext4 -o ro,noload,loop "$VPN/mnt/root/$image" /lower 2>/tmp/mount.err \
                    || mount -o ro,loop "$VPN/mnt/root/$image" /lower 2>/tmp/mount.err; then
                LOWER=/lower
                say "root: mounted image ${CFG_WALT_VPN_ROOT:-$image of $ROOT_NAME} read-only (loop over sshfs)"
                return 0
            fi
            umount "$VPN/mnt/root" 2>/dev/null
            fail "root: cannot mount image ${CFG_WALT_VPN_ROOT:-$image of $ROOT_NAME} ($(tail -n 1 /tmp/mount.err | cut -c1-100))"
        else
            fail "root: sshfs cannot mount $ROOT_NAME ($(tail -n 1 /tmp/sshfs.err | tr -d '\000-\037\177-\377' | cut -c1-100))"
        fi
    done
}

overlay_and_switch() {
    mkdir -p /overlay /newroot
    mount -t tmpfs -o mode=0755 overlay /overlay
    mkdir -p /overlay/upper /overlay/work
    if ! mount -t overlay -o "lowerdir=$LOWER,upperdir=/overlay/upper,workdir=/overlay/work" \
            overlay /newroot; then
        fatal "root: cannot stack the tmpfs overlay"
    fi
    if [ ! -x /newroot/sbin/init ] && [ ! -L /newroot/sbin/init ]; then
        fatal "root: $ROOT_NAME has no /sbin/init"
    fi
    # The mini-root stays visible to the new system (its VPN state, the sshfs mount)
    # at /run/walt-vpn; its processes keep their chroot through the move.
    mkdir -p /run/walt-vpn
    mount --move "$VPN" /run/walt-vpn
    for fs in dev proc sys run; do
        if [ -d "/newroot/$fs" ]; then
            mount --move "/$fs" "/newroot/$fs" 2>/dev/null
        fi
    done
    say "root: switching to $ROOT_NAME"
    exec switch_root /newroot /sbin/init
}
