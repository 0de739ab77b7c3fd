"""The model repository: the bundles a deployment holds, each named by its ``bundle.json``.

Triton, KServe and TorchServe make the model a named, versioned thing in every request and result;
here a *model* is a bundle directory of ``MOTIONGUARD_MODEL_REPOSITORY`` (default: the shipped
``models/bundles/``; a deployment that sets only ``MOTIONGUARD_BUNDLE_DIR`` serves that one bundle,
as before models existed), identified by the ``name`` and ``version`` of its ``bundle.json`` and pinned
by a digest: the sha256 of the ``bundle.json`` bytes. The file records the sha256 of every weight
file and the loader checks them, so the digest names the exact weights, labels, geometry, defence
defaults and calibration a worker computes with. The bundle of ``MOTIONGUARD_BUNDLE_DIR`` is always
part of the repository and is the default model (what a request that names none gets).

``MOTIONGUARD_MODELS`` (``name`` or ``name:version``, comma separated) says which of them this
deployment serves; empty: all of them. Only metadata is read here (plain JSON, no torch), so the API
process lists and resolves models without loading any weights.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from models.bundle_meta import BUNDLE_FILE, BundleMeta, read_bundle_meta
from models.errors import BundleError
from worker.settings import Settings

log = logging.getLogger(__name__)

#: A model name usable in queue names, Redis keys, Kubernetes object names and URLs.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
DIGEST_PREFIX = 12  # digest characters in a pinned queue's name (48 bits: no collision among a few bundles)


def bundle_digest(bundle_dir: str | Path) -> str:
    """sha256 of the bundle's ``bundle.json`` bytes: the identity a job is pinned to."""
    return hashlib.sha256((Path(bundle_dir) / BUNDLE_FILE).read_bytes()).hexdigest()


def version_key(version: str) -> tuple:
    """Natural order of version strings: "1.10" after "1.9", numbers before words."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"[.\-+_]", version))


@dataclass(frozen=True)
class ModelEntry:
    """One bundle of the repository: where it is, what it says, and its digest."""

    path: Path
    meta: BundleMeta = field(compare=False, repr=False)
    sha256: str

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def version(self) -> str:
        return self.meta.version

    @property
    def ref(self) -> dict[str, str]:
        """``{name, version, sha256}``: what a job records and a result carries."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


class ModelNotFound(LookupError):
    """No bundle of the repository has this name (and version)."""


class ModelNotServed(LookupError):
    """The bundle exists but this deployment does not serve it (``MOTIONGUARD_MODELS``)."""


def _read(path: Path) -> ModelEntry | None:
    try:
        meta = read_bundle_meta(path)
        digest = bundle_digest(path)
    except (BundleError, OSError) as exc:
        log.warning("model repository: skipping %s (%s)", path, exc)
        return None
    if not NAME_RE.fullmatch(meta.name) or not NAME_RE.fullmatch(meta.version):
        log.warning("model repository: skipping %s (name/version %r %r not usable)", path, meta.name, meta.version)
        return None
    return ModelEntry(path=path.resolve(), meta=meta, sha256=digest)


def _candidates(root: Path) -> list[Path]:
    """Bundle directories under ``root`` (``root`` itself when it is one bundle)."""
    if (root / BUNDLE_FILE).is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / BUNDLE_FILE).is_file())


def _parse_spec(spec: str) -> tuple[str, str | None]:
    name, _, version = spec.strip().partition(":")
    return name, version or None


class Repository:
    """The deployment's models: every bundle, which of them are served, and the default one."""

    def __init__(self, entries: list[ModelEntry], default: ModelEntry | None, served: list[str] | None = None):
        self.entries = sorted(entries, key=lambda e: (e.name, version_key(e.version)))
        self.default = default
        self.specs = [_parse_spec(s) for s in (served or []) if s.strip()]

    @classmethod
    def scan(cls, settings: Settings) -> Repository:
        """Read ``settings.model_repository`` and ``settings.bundle_dir`` (metadata only)."""
        entries: dict[tuple[str, str], ModelEntry] = {}
        default = _read(Path(settings.bundle_dir)) if (Path(settings.bundle_dir) / BUNDLE_FILE).is_file() else None
        if default is None:
            log.warning("model repository: no readable default bundle at %s", settings.bundle_dir)
        scanned = _candidates(Path(settings.repository_dir)) if settings.repository_dir is not None else []
        for path in [*([default.path] if default else []), *[p.resolve() for p in scanned]]:
            entry = default if default is not None and path == default.path else _read(path)
            if entry is None:
                continue
            key = (entry.name, entry.version)
            if key in entries:
                if entries[key].path != entry.path:
                    log.warning(
                        "model repository: %s v%s at %s and %s; serving the first",
                        *key,
                        entries[key].path,
                        entry.path,
                    )
                continue
            entries[key] = entry
        return cls(list(entries.values()), default, list(settings.models))

    def is_served(self, entry: ModelEntry) -> bool:
        if not self.specs:
            return True
        return any(name == entry.name and version in (None, entry.version) for name, version in self.specs)

    @property
    def served(self) -> list[ModelEntry]:
        return [e for e in self.entries if self.is_served(e)]

    def names(self) -> list[str]:
        return sorted({e.name for e in self.entries})

    def versions(self, name: str) -> list[ModelEntry]:
        return [e for e in self.entries if e.name == name]

    def resolve(self, name: str | None = None, version: str | None = None, *, served_only: bool = True) -> ModelEntry:
        """The bundle a request for ``name`` (None: the default model) and ``version`` gets.

        Without a version: the default bundle when it has this name, else the highest served
        version. Raises ``ModelNotFound`` (no such bundle) or ``ModelNotServed``."""
        if name is None:
            if self.default is None:
                raise ModelNotFound("no default model (no readable bundle at MOTIONGUARD_BUNDLE_DIR)")
            name = self.default.name
            version = version or self.default.version
        candidates = self.versions(name)
        if version is not None:
            candidates = [e for e in candidates if e.version == version]
        if not candidates:
            known = ", ".join(f"{e.name}:{e.version}" for e in self.entries) or "none"
            what = f"{name} version {version}" if version else name
            raise ModelNotFound(f"no model {what} in the repository (known: {known})")
        if served_only:
            served = [e for e in candidates if self.is_served(e)]
            if not served:
                raise ModelNotServed(f"model {candidates[0].name} is in the repository but not served here")
            candidates = served
        if version is None and self.default is not None and self.default in candidates:
            return self.default
        return candidates[-1]

    def find_digest(self, sha256: str) -> ModelEntry | None:
        return next((e for e in self.entries if e.sha256 == sha256), None)
