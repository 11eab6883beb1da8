"""The build steps of `fwbuild build`, in pipeline order.

Each step turns recipe values and earlier artifacts into artifacts of the set; it
declares what it reads and writes with the handles of fwbuild.layout (which also says
where each lives), and the engine (fwbuild.pipeline) runs it. The formats themselves
live in the eeprom/, initramfs/, bootimg/ and recovery/ packages.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict

from .errors import BuildError, KeyFileError
from .fsutil import sha256_file
from .keys import load_boot_key
from .layout import (
    BOOT_IMG,
    BOOT_SIG,
    EEPROM_IMAGE,
    EEPROM_SIG,
    INITRAMFS,
    INITRAMFS_PROVENANCE,
    RECOVERY_KIT,
)
from .pipeline import BuildContext, Step
from .recipe import resolve_path, resolved_repositories
from .refs import FAKE, PACKAGE, SYNTHETIC, TEMPLATE, Ref
from .sources import check_offline, needed_sources, source_path


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _section_digest(section: object) -> str:
    return _digest(json.dumps(asdict(section), sort_keys=True, default=str).encode())  # type: ignore[call-overload]


def _key_digest(ctx: BuildContext) -> str:
    path = ctx.keys.boot_key
    if not path.is_file():
        raise KeyFileError("boot-signing key not found", str(path),
                           f"create the site keys with `fwbuild keys init {ctx.keys.directory}` "
                           "or point the build at them with --keys DIR")
    return sha256_file(path)


# --- check_inputs / fetch_sources ------------------------------------------------------

def _selected(ctx: BuildContext, *names: str) -> bool:
    """Whether any of the steps `names` is part of this build (all are when none was selected)."""
    return not ctx.selected or any(name in ctx.selected for name in names)


def check_inputs(ctx: BuildContext) -> None:
    """Fail before any download: keys present, local files present, offline cache complete."""
    _key_digest(ctx)
    load_boot_key(ctx.keys.boot_key)
    recipe = ctx.recipe
    if _selected(ctx, "initramfs", "bootimg"):
        for repo in recipe.apt_repositories:
            keyring = resolve_path(recipe, repo.keyring)
            if not keyring.is_file():
                raise BuildError("apt repository keyring not found",
                                 f"apt.repositories ({repo.uri}): {keyring}")
    if _selected(ctx, "eeprom"):
        for variant, template in recipe.eeprom.templates.items():
            if not resolve_path(recipe, template).is_file():
                raise BuildError("bootconf template not found", f"eeprom.templates.{variant}: {template}")
    if _selected(ctx, "initramfs"):
        if recipe.initramfs.init.kind == TEMPLATE and not resolve_path(recipe, recipe.initramfs.init.name).is_file():
            raise BuildError("init template not found", f"initramfs.init: {recipe.initramfs.init}")
        for dest, src in recipe.initramfs.files.items():
            if not resolve_path(recipe, src).exists():
                raise BuildError("initramfs extra file not found", f"initramfs.files.{dest}: {src}")
    if ctx.offline:
        check_offline(ctx.cache, recipe, needed_sources(recipe, ctx.selected))


def fetch_sources(ctx: BuildContext) -> None:
    """Fetch the sources the selected steps read (an unused source is never downloaded)."""
    for name in needed_sources(ctx.recipe, ctx.selected):
        ctx.sources[name] = source_path(ctx.cache, ctx.recipe, name, offline=ctx.offline,
                                        progress=ctx.progress)


def _source_bytes(ctx: BuildContext, ref: Ref) -> bytes:
    return ctx.sources[ref.name].read_bytes()


# --- eeprom ---------------------------------------------------------------------------

def _eeprom_base(ctx: BuildContext) -> bytes:
    from .eeprom.synthetic import synthetic_image

    base = ctx.recipe.eeprom.base
    if base.kind == SYNTHETIC:
        return synthetic_image(base.name)
    return _source_bytes(ctx, base)


def site_values(ctx: BuildContext) -> dict[str, object]:
    site = ctx.recipe.site
    return {"http_host": site.http_host, "http_port": site.http_port, "http_path": site.http_path,
            "extra": []}


def _template_texts(ctx: BuildContext) -> dict[str, str]:
    texts = {}
    for variant, path in ctx.recipe.eeprom.templates.items():
        try:
            texts[variant] = resolve_path(ctx.recipe, path).read_text("utf-8")
        except UnicodeDecodeError:
            raise BuildError("bootconf template is not UTF-8 text", f"eeprom.templates.{variant}: {path}") from None
    return texts


def eeprom_inputs(ctx: BuildContext) -> Mapping[str, str]:
    base = ctx.recipe.eeprom.base
    return {
        "section": _section_digest(ctx.recipe.eeprom),
        "site": _section_digest(ctx.recipe.site),
        "base": str(base) if base.kind == SYNTHETIC else ctx.recipe.sources[base.name].sha256,
        "templates": _digest(json.dumps(_template_texts(ctx), sort_keys=True).encode()),
        "key": _key_digest(ctx),
        "epoch": str(ctx.epoch),
    }


def build_eeprom(ctx: BuildContext) -> None:
    from .eeprom.assemble import assemble_eeprom, pieeprom_sig
    from .eeprom.bootconf import render_bootconf

    base = _eeprom_base(ctx)
    key = load_boot_key(ctx.keys.boot_key)
    templates = _template_texts(ctx)
    for variant in ctx.recipe.eeprom.variants:
        text = render_bootconf(variant, site_values(ctx), templates.get(variant))
        image = assemble_eeprom(base, text, boot_key=key, timestamp=ctx.epoch)
        ctx.put(EEPROM_IMAGE(variant), image)
        ctx.put(EEPROM_SIG(variant), pieeprom_sig(image, ctx.epoch))


# --- recovery --------------------------------------------------------------------------

def recovery_inputs(ctx: BuildContext) -> Mapping[str, str]:
    ref = ctx.recipe.recovery.recovery_bin
    return {
        "recovery_bin": str(ref) if ref.kind == FAKE else ctx.recipe.sources[ref.name].sha256,
        "pieeprom": _digest(ctx.get(EEPROM_IMAGE(ctx.recipe.recovery.variant))),
        "epoch": str(ctx.epoch),
    }


def build_recovery(ctx: BuildContext) -> None:
    from .recovery.archive import fake_recovery_bin, recovery_archive

    ref = ctx.recipe.recovery.recovery_bin
    recovery_bin = fake_recovery_bin() if ref.kind == FAKE else _source_bytes(ctx, ref)
    pieeprom = ctx.get(EEPROM_IMAGE(ctx.recipe.recovery.variant))
    ctx.put(RECOVERY_KIT, recovery_archive(recovery_bin, pieeprom, ctx.epoch))


# --- initramfs -------------------------------------------------------------------------

def build_initramfs_step(ctx: BuildContext) -> None:
    """Not step-cached: apt decides the package pins; staged packages are cached by digest."""
    from .initramfs.builder import build_initramfs, spec_from_recipe

    spec = spec_from_recipe(ctx.recipe, epoch=ctx.epoch)
    result = build_initramfs(spec, ctx.cache, ctx.progress, offline=ctx.offline)
    ctx.put(INITRAMFS, result.data)
    ctx.put(INITRAMFS_PROVENANCE,
            (json.dumps(result.provenance_document(), indent=1, sort_keys=True) + "\n").encode())
    ctx.packages.extend({k: str(v) for k, v in p.as_record().items()} for p in result.packages)


# --- boot image ------------------------------------------------------------------------

def _kernel_and_dtbs(ctx: BuildContext) -> tuple[bytes, dict[str, bytes]]:
    from .initramfs.builder import stage_kernel

    recipe = ctx.recipe
    if recipe.bootimg.kernel.kind != PACKAGE:
        return _source_bytes(ctx, recipe.bootimg.kernel), {}
    if not recipe.initramfs.kernel_package:
        raise BuildError("bootimg.kernel = \"package\" but no initramfs.kernel_package",
                         "bootimg.kernel", "name the kernel package in [initramfs] kernel_package")
    kernel = stage_kernel(recipe.initramfs.kernel_package, ctx.cache, repositories=resolved_repositories(recipe),
                          progress=ctx.progress, offline=ctx.offline)
    dtbs: dict[str, bytes] = {}
    for pattern in recipe.bootimg.dtbs:
        matches = [p for p in kernel.tree.nodes if p.endswith(".dtb")
                   and fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern)]
        if not matches:
            raise BuildError(f"no device tree in {recipe.initramfs.kernel_package} matches {pattern!r}",
                             "bootimg.dtbs")
        for path in matches:
            dtbs[path.rsplit("/", 1)[-1]] = kernel.tree.host_path(path).read_bytes()
    return kernel.image.read_bytes(), dtbs


GZIP_MAGIC = b"\x1f\x8b"


def build_bootimg(ctx: BuildContext) -> None:
    from .bootimg.bootimg import boot_files, build_boot_image, sign_boot_image
    from .initramfs.builder import compress_cached

    kernel, dtbs = _kernel_and_dtbs(ctx)
    section = ctx.recipe.bootimg
    if section.compress_kernel and not kernel.startswith(GZIP_MAGIC):
        kernel = compress_cached(kernel, "gzip", ctx.cache)
    files = boot_files(kernel, ctx.get(INITRAMFS), dtbs, section.cmdline,
                       section.config, {}, kernel_name=section.kernel_name,
                       require_dtbs=ctx.recipe.info.target != "virtual")
    image = build_boot_image(files, ctx.epoch)
    ctx.put(BOOT_IMG, image)
    ctx.put(BOOT_SIG, sign_boot_image(image, load_boot_key(ctx.keys.boot_key), ctx.epoch))


STEPS: list[Step] = [
    Step("check_inputs", check_inputs, always=True),
    Step("fetch_sources", fetch_sources, always=True),
    Step("eeprom", build_eeprom, eeprom_inputs, writes=(EEPROM_IMAGE, EEPROM_SIG)),
    Step("initramfs", build_initramfs_step, writes=(INITRAMFS, INITRAMFS_PROVENANCE)),
    Step("bootimg", build_bootimg, reads=(INITRAMFS,), writes=(BOOT_IMG, BOOT_SIG)),
    Step("recovery", build_recovery, recovery_inputs, reads=(EEPROM_IMAGE,), writes=(RECOVERY_KIT,)),
]
