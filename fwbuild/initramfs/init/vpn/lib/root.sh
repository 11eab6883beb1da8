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

# tune_fuse MOUNTPOINT: more requests in flight on the root's FUSE connection
# (FUSE_BACKGROUND; the kernel's 12 x 64 KiB is about 4 MB/s at 200 ms), through fusectl.
# FUSE_BDI names the connection's bdi (its readahead is raised only while prefetching).
tune_fuse() {
    dev=$(stat -c %d "$1" 2>/dev/null)
    ctl=/sys/fs/fuse/connections
    # shellcheck disable=SC2034  # read by prefetch.sh (prefetch_start)
    FUSE_BDI=/sys/class/bdi/0:$dev
    grep -q " $ctl fusectl " /proc/mounts || mount -t fusectl fusectl "$ctl" 2>/dev/null
    if echo "$FUSE_BACKGROUND" > "$ctl/$dev/max_background" 2>/dev/null \
            && echo $((FUSE_BACKGROUND * 3 / 4)) > "$ctl/$dev/congestion_threshold" 2>/dev/null; then
        return 0
    fi
    say "root: cannot tune the FUSE connection ${dev:-?} (kernel defaults: slower on a long path)"
}

# The root: WALT_VPN_ROOT (a directory, or an image file loop-mounted), or without it the
# SFTP start directory the SSH gate gives this node (`walt-vpn-entrypoint:` with no path).
# attach_root mounts the directory (sshfs over the SSH connection) and, for an image, starts
# its prefetch; finish_root (after the tunnel is up: the two overlap) waits for the
# prefetch (walt_vpn.prefetch_wait=1) and loop-mounts the image. LOWER: the root's tree.
attach_root() {
    remote=${CFG_WALT_VPN_ROOT:-}
    IMAGE=
    case "$remote" in
        *.img|*.ext4|*.ext2) IMAGE=${remote##*/}; remote=${remote%/*} ;;
    esac
    [ -n "$remote" ] || [ -z "${CFG_WALT_VPN_ROOT:-}" ] || remote=/
    opts="ro,kernel_cache,allow_other,default_permissions,dir_cache=yes,reconnect"
    opts="$opts,entry_timeout=$CACHE_TIMEOUT,attr_timeout=$CACHE_TIMEOUT,negative_timeout=$CACHE_TIMEOUT"
    opts="$opts,dcache_timeout=$CACHE_TIMEOUT,dcache_max_size=1000000"
    # 64 KiB SFTP reads (sshfs's default is 32 KiB): fewer requests for the same bytes.
    opts="$opts,max_read=65536"
    until chroot "$VPN" sshfs -F /etc/ssh/ssh_config -o "$opts" \
            -o "ssh_command=ssh -o ControlMaster=no" \
            "walt-vpn-entrypoint:$remote" /mnt/root 2>/tmp/sshfs.err; do
        fail "root: sshfs cannot mount $ROOT_NAME ($(tail -n 1 /tmp/sshfs.err | tr -d '\000-\037\177-\377' | cut -c1-100))"
    done
    tune_fuse "$VPN/mnt/root"
    [ -n "${CFG_WALT_VPN_ROOT:-}" ] || IMAGE=$(gate_root_image "$VPN/mnt/root")
    if [ -z "$IMAGE" ]; then
        LOWER=$VPN/mnt/root
        say "root: mounted $ROOT_NAME read-only (sshfs over the SSH connection)"
        return 0
    fi
    prefetch_image "$VPN/mnt/root/$IMAGE"
}

finish_root() {
    while [ -n "$IMAGE" ]; do
        prefetch_join
        mkdir -p /lower
        if mount -t ext4 -o ro,noload,loop "$VPN/mnt/root/$IMAGE" /lower 2>/tmp/mount.err \
                || mount -o ro,loop "$VPN/mnt/root/$IMAGE" /lower 2>/tmp/mount.err; then
            LOWER=/lower
            say "root: mounted image ${CFG_WALT_VPN_ROOT:-$IMAGE of $ROOT_NAME} read-only (loop over sshfs)"
            return 0
        fi
        umount "$VPN/mnt/root" 2>/dev/null
        fail "root: cannot mount image ${CFG_WALT_VPN_ROOT:-$IMAGE of $ROOT_NAME} ($(tail -n 1 /tmp/mount.err | cut -c1-100))"
        attach_root
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
