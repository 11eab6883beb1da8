# shellcheck shell=sh
# Library of the VPN init (/lib/fwbuild-init/prefetch.sh).

# Boot working-set prefetch (image mode). `<image>.prefetch`, published next to the image
# for exactly that image, lists the 4 KiB blocks a reference boot read, as ranges in
# ascending order (one dd process per range: few ranges matter on a slow CPU). After a
# check (format; the image's size and first 64 KiB), $PREFETCH_STREAMS streams read
# them, one large read per piece, from the mini-root (so they could outlive
# switch_root), filling the page cache the loop device reads from. They start as soon as
# the root's directory is mounted (the tunnel comes up meanwhile).
# The boot waits for them (walt_vpn.prefetch_wait=0: runs alongside; on the one-vCPU
# virtual node at 200 ms / 20 Mbit/s 75.3 s against 78.8 s waiting, one pair side by
# side: no clear gain, so not the default). A missing set, or one that is unreadable, malformed or not
# this image's: one line and a normal boot. PREFETCH_JAIL/TMP/LOG let host tests run it.
# PREFETCH_STREAMS and PREFETCH_WAIT come from the init's settings (fwbuild-init.conf).
PREFETCH_JAIL=${PREFETCH_JAIL-$VPN}
PREFETCH_TMP=${PREFETCH_TMP:-$VPN/tmp}
PREFETCH_LOG=${PREFETCH_LOG:-/dev/console}
prefetch_image() {
    img=$1
    wsf=$img.prefetch
    if [ ! -e "$wsf" ]; then
        say "prefetch: no working set for this root: normal boot"
        return 0
    fi
    mkdir -p "$PREFETCH_TMP"
    # The set, the image's first 64 KiB and its size are read side by side: each costs
    # round trips, which a distant path makes long.
    cat "$wsf" > "$PREFETCH_TMP/set" 2>/dev/null &
    set_pid=$!
    (dd if="$img" bs=65536 count=1 2>/dev/null | sha256sum | cut -d' ' -f1 > "$PREFETCH_TMP/probe") &
    probe_pid=$!
    size=$(stat -c %s "$img" 2>/dev/null)
    wait "$probe_pid"
    probe=$(cat "$PREFETCH_TMP/probe")
    if wait "$set_pid"; then
        why=$(prefetch_plan "$PREFETCH_TMP/set" "$size" "$probe")
    else
        why="bad unreadable or empty"
    fi
    rm -f "$PREFETCH_TMP/set" "$PREFETCH_TMP/probe"
    prefetch_start "$img" "$why"
}

# prefetch_plan SET SIZE PROBE: checks the set against the image's size and probe digest
# and writes the stream files $PREFETCH_TMP/ws.*; prints "ok RANGES BLOCKS" or "bad WHY".
prefetch_plan() {
    [ "$PREFETCH_STREAMS" -ge 1 ] 2>/dev/null || PREFETCH_STREAMS=1
    mkdir -p "$PREFETCH_TMP"
    rm -f "$PREFETCH_TMP"/ws.*
    awk -v dir="$PREFETCH_TMP" -v size="$2" -v probe="$3" -v n="$PREFETCH_STREAMS" '
        function bad(msg) { if (!reason) reason = msg; exit }
        NR == 1 { if ($0 != "fwbuild-prefetch 1") bad("not a working-set file"); next }
        NR == 2 { if ($1 != "image-sha256") bad("bad header"); next }
        NR == 3 { if ($1 != "image-size" || $2 != size) bad("recorded for another image"); next }
        NR == 4 { if ($1 != "probe-sha256" || $2 != probe) bad("recorded for another image"); next }
        NR == 5 { if ($0 != "block 4096") bad("bad block size"); next }
        NR == 6 { if ($1 != "ranges" || $2 !~ /^[0-9]+$/) bad("bad header"); count = $2 + 0; next }
        ended { bad("data after the end line") }
        $0 == "end" { ended = 1; next }
        {
            if (NF != 2 || $1 !~ /^[0-9]+$/ || $2 !~ /^[0-9]+$/ || $2 == 0 || ($1 + $2) * 4096 > size + 4095)
                bad("bad range on line " NR)
            seen++; blocks += $2
            # Pieces of at most 2 MiB, each to the stream with the fewest blocks so far:
            # the streams end together (one big range in one stream was the slow tail).
            for (s = $1 + 0; s < $1 + $2; s += c) {
                c = $1 + $2 - s; if (c > 512) c = 512
                best = 0
                for (i = 1; i < n; i++) if (load[i] < load[best]) best = i
                load[best] += c
                print s, c > (dir "/ws." best)
            }
        }
        END {
            if (!reason && NR == 0) reason = "unreadable or empty"
            if (!reason && !ended) reason = "truncated"
            if (!reason && seen != count) reason = "wrong range count"
            if (reason) print "bad " reason; else print "ok " seen " " blocks
        }' "$1" 2>/dev/null
}

# prefetch_start IMAGE PLAN: one line, then the streams (or, for a bad plan, a normal boot).
prefetch_start() {
    img=$1
    why=$2
    case "$why" in
        "ok "*) ;;
        *)
            rm -f "$PREFETCH_TMP"/ws.*
            say "prefetch: working set unusable (${why#bad }): normal boot"
            return 0
            ;;
    esac
    # shellcheck disable=SC2086  # split "ok RANGES BLOCKS" into the positional parameters
    set -- $why
    say "prefetch: $2 ranges, $(( $3 / 256 )) MiB of the root"
    # While the streams run, the root's FUSE files read ahead FUSE_READAHEAD_KB (one large
    # read per piece in flight); vpn-prefetch puts the kernel's value back when done, so
    # the boot's own reads do not fetch more than they did when the set was recorded.
    ra=${FUSE_BDI:-/nonexistent}/read_ahead_kb
    ra_old=$(cat "$ra" 2>/dev/null) && echo "$FUSE_READAHEAD_KB" > "$ra" 2>/dev/null || ra=
    if [ -n "$PREFETCH_JAIL" ]; then
        set -- chroot "$PREFETCH_JAIL" /bin/busybox sh /bin/vpn-prefetch \
            "${img#"$PREFETCH_JAIL"}" "${PREFETCH_TMP#"$PREFETCH_JAIL"}" "$PREFETCH_LOG" ${ra:+"$ra"} ${ra:+"$ra_old"}
    else
        set -- /bin/busybox sh "$FWBUILD_INIT_ROOT/bin/vpn-prefetch" "$img" "$PREFETCH_TMP" "$PREFETCH_LOG" \
            ${ra:+"$ra"} ${ra:+"$ra_old"}
    fi
    # The streams run in the background from here; prefetch_join waits for them when
    # walt_vpn.prefetch_wait=1 (default); with 0 the boot goes on alongside them.
    "$@" </dev/null >/dev/null 2>&1 &
    PREFETCH_PID=$!
}

# prefetch_join: the boot waits for the streams (PREFETCH_WAIT=1) before mounting the image.
prefetch_join() {
    # shellcheck disable=SC2153  # PREFETCH_WAIT is a setting (fwbuild-init.conf), not a typo
    if [ "$PREFETCH_WAIT" = 1 ] && [ -n "${PREFETCH_PID:-}" ]; then
        wait "$PREFETCH_PID"
    fi
    PREFETCH_PID=
}
