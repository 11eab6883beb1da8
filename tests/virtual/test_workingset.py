"""Boot working sets: recording, the set file, its keying by the root's digest, and the
init's prefetch (host busybox: missing, corrupt, stale and good sets)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fwbuild.errors import FormatError
from fwbuild.virtual.vpnboot import VpnInitSettings, write_vpn_init
from fwbuild.virtual.workingset import (
    BLOCK,
    WorkingSet,
    coalesce,
    load_working_set,
    parse_read_log,
    parse_working_set,
    publish_working_set,
    set_path,
    working_set_from_reads,
)

BUSYBOX = shutil.which("busybox")
needs_busybox = pytest.mark.skipif(BUSYBOX is None, reason="host busybox not installed")


def make_image(path: Path, blocks: int = 256, seed: int = 1) -> Path:
    data = b"".join(hashlib.sha256(f"{seed}-{i}".encode()).digest() * (BLOCK // 32) for i in range(blocks))
    path.write_bytes(data)
    return path


def test_read_log_keeps_the_image_reads_in_order() -> None:
    log = ("R 8192 4096 /srv/root.img\nR 0 65536 /srv/other.img\nR 4096 4096 /srv/root.img\n"
           "R 1 2 /srv/my\\x20root.img\nC 5 40\nR 12 3")  # torn last line
    assert parse_read_log(log, "/srv/root.img") == [(8192, 4096), (4096, 4096)]
    assert parse_read_log(log, "/srv/my root.img") == [(1, 2)]


def test_coalesce_sorts_by_block_and_merges_neighbours() -> None:
    reads = [(100 * BLOCK, 2 * BLOCK), (102 * BLOCK, BLOCK), (5 * BLOCK, 100), (100 * BLOCK, BLOCK),
             (110 * BLOCK, BLOCK), (500 * BLOCK, BLOCK), (6 * BLOCK + 1, BLOCK)]
    # Ascending: 5-7 (the last read straddles 6 and 7), 100-102 and 110 (7 blocks apart:
    # merged with the gap), 500; the second read of 100 adds nothing.
    assert coalesce(reads, gap_blocks=16) == ((5, 3), (100, 11), (500, 1))
    assert coalesce(reads, gap_blocks=0) == ((5, 3), (100, 3), (110, 1), (500, 1))
    assert coalesce([(0, BLOCK), (3 * BLOCK, BLOCK)], gap_blocks=4) == ((0, 4),)
    assert coalesce([(0, BLOCK), (9 * BLOCK, BLOCK)], gap_blocks=4) == ((0, 1), (9, 1))
    assert coalesce([(0, 0)]) == ()


def test_set_file_round_trip_and_strict_parse(tmp_path: Path) -> None:
    image = make_image(tmp_path / "root.img")
    ws = working_set_from_reads([(0, 65536), (40 * BLOCK, 3 * BLOCK)], image)
    assert ws.ranges == ((0, 16), (40, 3)) and ws.blocks == 19
    assert ws.image_size == image.stat().st_size
    assert ws.image_sha256 == hashlib.sha256(image.read_bytes()).hexdigest()
    text = ws.render()
    assert parse_working_set(text) == ws
    bad = [
        text.replace("fwbuild-prefetch 1", "fwbuild-prefetch 2"),
        text.replace("ranges 2", "ranges 3"),
        text.replace("40 3", "40 x"),
        text.replace("40 3", "255 2"),          # past the image's end
        text.replace("40 3", "40 0"),
        text.replace("block 4096", "block 512"),
        text[:-4],                              # no end line
        text + "1 1\n",
        "",
    ]
    for case in bad:
        with pytest.raises(FormatError):
            parse_working_set(case)


def test_a_changed_root_invalidates_the_set(tmp_path: Path) -> None:
    image = make_image(tmp_path / "root.img")
    ws = working_set_from_reads([(0, 8 * BLOCK)], image)
    assert publish_working_set(ws, image) == set_path(image)
    assert load_working_set(image) == ws
    # The root changes (one byte, same size): the published set is not its set any more.
    with image.open("r+b") as handle:
        handle.seek(200 * BLOCK)
        handle.write(b"\xff")
    assert load_working_set(image) is None
    # Publishing the old set for the new root refuses and removes the stale file.
    assert publish_working_set(ws, image) is None
    assert not set_path(image).exists()
    assert load_working_set(image) is None


# ---- the init's prefetch (host busybox) ---------------------------------------------------

def run_prefetch(tmp_path: Path, image: Path, pre: str = "") -> subprocess.CompletedProcess[str]:
    root = tmp_path / "initroot"
    init = write_vpn_init(root, VpnInitSettings())
    work = tmp_path / "pftmp"
    work.mkdir(exist_ok=True)
    assert BUSYBOX is not None
    return subprocess.run([BUSYBOX, "sh", "-c", f'FWBUILD_INIT_ROOT={root}\n. {init}\n{pre}\nprefetch_image "{image}"\necho rc=$?\n'],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PREFETCH_JAIL": "", "PREFETCH_TMP": str(work),
                               "PREFETCH_LOG": str(tmp_path / "prefetch.log")})


def prefetch_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("walt-vpn:")]


@needs_busybox
def test_init_prefetches_a_good_set(tmp_path: Path) -> None:
    image = make_image(tmp_path / "root.img")
    ws = working_set_from_reads([(0, 65536), (100 * BLOCK, 40 * BLOCK), (7 * BLOCK, BLOCK)], image)
    publish_working_set(ws, image)
    # The root's FUSE bdi (here a stand-in directory): its readahead is raised for the
    # streams and put back once they are done.
    bdi = tmp_path / "bdi"
    bdi.mkdir()
    (bdi / "read_ahead_kb").write_text("128\n")
    result = run_prefetch(tmp_path, image, f"FUSE_BDI={bdi}; FUSE_READAHEAD_KB=2048")
    lines = prefetch_lines(result)
    assert len(lines) == 1, result.stdout + result.stderr
    assert lines[0] == (f"walt-vpn: prefetch: {len(ws.ranges)} ranges, 0 MiB of the root"
                        )
    assert "rc=0" in result.stdout
    # The streams run in the background and report once done (on the console in the init).
    log = tmp_path / "prefetch.log"
    deadline = time.monotonic() + 120
    while "done" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.read_text().startswith("walt-vpn: prefetch: done in ")
    assert not list((tmp_path / "pftmp").iterdir())   # its stream files are gone
    assert (bdi / "read_ahead_kb").read_text().strip() == "128"


@needs_busybox
def test_init_boots_normally_without_a_set(tmp_path: Path) -> None:
    image = make_image(tmp_path / "root.img")
    result = run_prefetch(tmp_path, image)
    assert prefetch_lines(result) == ["walt-vpn: prefetch: no working set for this root: normal boot"]
    assert "rc=0" in result.stdout


@needs_busybox
@pytest.mark.parametrize("mutate, reason", [
    (lambda t: t.replace("fwbuild-prefetch 1", "garbage"), "not a working-set file"),
    (lambda t: t.replace("ranges 2", "ranges 5"), "wrong range count"),
    (lambda t: t.replace("\nend\n", "\n"), "truncated"),
    (lambda t: t.replace("100 40", "100 x"), "bad range on line 8"),
    (lambda t: t.replace("100 40", "250 40"), "bad range on line 8"),
    (lambda t: t + "3 3\n", "data after the end line"),
    (lambda t: "", "unreadable or empty"),
    (lambda t: "\x00\xff" * 300, "not a working-set file"),
])
def test_init_boots_normally_with_a_corrupt_set(tmp_path: Path, mutate: object, reason: str) -> None:
    image = make_image(tmp_path / "root.img")
    ws = working_set_from_reads([(0, 4096), (100 * BLOCK, 40 * BLOCK)], image)
    assert callable(mutate)
    set_path(image).write_text(mutate(ws.render()), errors="surrogateescape")
    result = run_prefetch(tmp_path, image)
    assert prefetch_lines(result) == [f"walt-vpn: prefetch: working set unusable ({reason}): normal boot"]
    assert "rc=0" in result.stdout


@needs_busybox
def test_init_ignores_a_set_of_another_root(tmp_path: Path) -> None:
    image = make_image(tmp_path / "root.img")
    ws = working_set_from_reads([(0, 4096)], image)
    set_path(image).write_text(ws.render())           # written without publish's check
    image.write_bytes(make_image(tmp_path / "new.img", seed=2).read_bytes())   # same size, new root
    result = run_prefetch(tmp_path, image)
    assert prefetch_lines(result) == [
        "walt-vpn: prefetch: working set unusable (recorded for another image): normal boot"]


def test_working_set_is_a_value() -> None:
    ws = WorkingSet("a" * 64, 8192, "b" * 64, ((0, 2),))
    assert parse_working_set(ws.render()) == ws


def test_prefetch_cli_refuses_a_missing_image_or_initramfs(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fwbuild.cli import main

    image = make_image(tmp_path / "root.img")
    result = CliRunner().invoke(main, ["rootfs", "prefetch", str(tmp_path / "nope.img"),
                                       "--initramfs", str(image)])
    assert result.exit_code == 2 and "does not exist" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["rootfs", "prefetch", str(image),
                                       "--initramfs", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "'--initramfs'" in result.output
    assert not set_path(image).exists()


@needs_busybox
def test_init_prefetch_plan_splits_big_ranges_across_streams(tmp_path: Path) -> None:
    # The init's plan: a 1100-block range goes out as pieces of at most 2 MiB (512
    # blocks), each to the least loaded stream, so no single stream is the slow tail.
    image = make_image(tmp_path / "root.img", blocks=1300)
    ws = working_set_from_reads([(0, 65536), (100 * BLOCK, 1100 * BLOCK)], image)
    publish_working_set(ws, image)
    root = tmp_path / "initroot"
    init = write_vpn_init(root, VpnInitSettings())
    work = tmp_path / "pftmp"
    assert BUSYBOX is not None
    result = subprocess.run(
        [BUSYBOX, "sh", "-c", (f'FWBUILD_INIT_ROOT={root}\n. {init}\nPREFETCH_STREAMS=3\n'
                               f'prefetch_plan "{set_path(image)}" {ws.image_size} {ws.probe_sha256}\n')],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PREFETCH_JAIL": "", "PREFETCH_TMP": str(work)})
    assert result.stdout.strip().splitlines()[-1] == f"ok 2 {ws.blocks}", result.stdout + result.stderr
    streams = {p.name: [tuple(map(int, line.split())) for line in p.read_text().splitlines()]
               for p in sorted(work.glob("ws.*"))}
    # Pieces in order: (0,16)->ws.0, (100,512)->ws.1, (612,512)->ws.2, (1124,76)->ws.0.
    assert streams == {"ws.0": [(0, 16), (1124, 76)], "ws.1": [(100, 512)], "ws.2": [(612, 512)]}
