# shellcheck shell=sh
# Library of the VPN init (/lib/fwbuild-init/root.sh): the read-only root over sshfs,
# the tmpfs overlay, switch_root.

mount_root() {
    remote=$CFG_WALT_VPN_ROOT
    image=
    case "$remote" in
        *.img|*.ext4|*.ext2) image=${remote##*/}; remote=${remote%/*} ;;
    esac
    [ -n "$remote" ] || remote=/
    opts="ro,kernel_cache,allow_other,default_permissions,dir_cache=yes,reconnect"
    opts="$opts,entry_timeout=$CACHE_TIMEOUT,attr_timeout=$CACHE_TIMEOUT,negative_timeout=$CACHE_TIMEOUT"
    opts="$opts,dcache_timeout=$CACHE_TIMEOUT,dcache_max_size=1000000"
    # 64 KiB SFTP reads (sshfs's default is 32 KiB): fewer requests for the same bytes.
    opts="$opts,max_read=65536"
    while :; do
        if chroot "$VPN" sshfs -F /etc/ssh/ssh_config -o "$opts" \
                -o "ssh_command=ssh -o ControlMaster=no" \
                "walt-vpn-entrypoint:$remote" /mnt/root 2>/tmp/sshfs.err; then
            if [ -z "$image" ]; then
                LOWER=$VPN/mnt/root
                say "root: mounted $CFG_WALT_VPN_ROOT read-only (sshfs over the SSH connection)"
                return 0
            fi
            mkdir -p /lower
            prefetch_image "$VPN/mnt/root/$image"
            if mount -t ext4 -o ro,noload,loop "$VPN/mnt/root/$image" /lower 2>/tmp/mount.err \
                    || mount -o ro,loop "$VPN/mnt/root/$image" /lower 2>/tmp/mount.err; then
                LOWER=/lower
                say "root: mounted image $CFG_WALT_VPN_ROOT read-only (loop over sshfs)"
                return 0
            fi
            umount "$VPN/mnt/root" 2>/dev/null
            fail "root: cannot mount image $CFG_WALT_VPN_ROOT ($(tail -n 1 /tmp/mount.err | cut -c1-100))"
        else
            fail "root: sshfs cannot mount $CFG_WALT_VPN_ROOT ($(tail -n 1 /tmp/sshfs.err | tr -d '\000-\037\177-\377' | cut -c1-100))"
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
        fatal "root: $CFG_WALT_VPN_ROOT has no /sbin/init"
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
    say "root: switching to $CFG_WALT_VPN_ROOT"
    exec switch_root /newroot /sbin/init
}
