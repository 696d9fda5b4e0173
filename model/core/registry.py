"""File-system model registry: immutable published bundles plus a small aliases file (stdlib only).

Layout::

    <root>/versions/<version>/{model.onnx, manifest.json}   immutable once published
    <root>/versions/.tmp-<uuid>/                             a publish in progress (never listed)
    <root>/aliases.json                                      production / previous / canary / shadow
    <root>/history.jsonl                                     one line per aliases change (audit)
    <root>/.lock                                             flock serialising aliases updates

The directory may be local (the embedded default) or a volume shared by every replica (NFS, a
ReadWriteMany PVC, a compose volume). Safety rests on two primitives that hold there too:

* fsync + rename. A version is staged in a temp directory, fsynced (files and directory), then
  renamed into place in one step, so no reader ever sees a half-copied version (TF Serving #1086).
  Renaming a directory onto an existing non-empty directory fails, so of several concurrent
  publishers of one version exactly one wins and the others get ``VersionExists``.
  ``aliases.json`` is replaced the same way (temp file + fsync + ``os.replace`` + fsync of the
  directory), so pollers read either the old or the new file, never a torn one.
* ``fcntl.flock`` on ``<root>/.lock``. Every aliases change is a read-modify-write under an
  exclusive lock, so concurrent activations from several processes never lose an update. On NFS
  the Linux client implements flock with byte-range locks (NLM / NFSv4), which are cluster-wide.

The mechanics (staged publish, the locked read-modify-write, the content stamp, errors without
paths) are the one artifact store's (``model.core.artifacts``), shared with the feature
snapshots; what each rollout verb does to the aliases is a pure transition (``model.core.aliases``).

The registry is the fleet's source of truth: the admin API writes ``aliases.json`` and every
replica polls it (``aliases_stamp``) and converges. Every change also appends a line to
``history.jsonl`` (``model.core.history``) under the same lock: who (``actor``), why
(``reason``), from which version to which.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from model.core import aliases as transitions
from model.core.aliases import (
    MAX_PREVIOUS,
    Aliases,
    AliasesMissing,
    Canary,
    Change,
    InvalidCanary,
    InvalidShadow,
    InvalidVersionName,
    NothingToRollBack,
    RegistryError,
    RegistryUnavailable,
    Shadow,
    VersionExists,
    VersionNotFound,
    check_version_name,
)
from model.core.artifacts import ALIASES_FILE, ArtifactStore, Faults
from model.core.bundle import (
    MANIFEST_FILE,
    MODEL_FILE,
    VERSION_RE,
    Bundle,
    BundleError,
    load_bundle,
)
from model.core.fileio import copy_durable, fsync_dir, json_bytes, write_durable
from model.core.history import History
from model.core.policy import CanaryPolicy

__all__ = [
    "ALIASES_FILE",
    "MAX_PREVIOUS",
    "VERSION_RE",
    "Aliases",
    "AliasesMissing",
    "Canary",
    "InvalidCanary",
    "InvalidShadow",
    "InvalidVersionName",
    "NothingToRollBack",
    "Registry",
    "RegistryError",
    "Shadow",
    "RegistryUnavailable",
    "VersionExists",
    "VersionNotFound",
    "check_version_name",
]

VERSIONS_DIR = "versions"

FAULTS = Faults("version", "registry", ALIASES_FILE, InvalidVersionName, VersionNotFound,
                VersionExists, RegistryError, RegistryUnavailable)  # fmt: skip


class Registry(ArtifactStore[Aliases]):
    """A model registry rooted at a directory (local, or a volume shared by replicas)."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root)
        versions = root / VERSIONS_DIR
        super().__init__(
            root, FAULTS, Aliases.from_dict, Aliases(None), artifacts=versions, history=True
        )

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    @property
    def versions_root(self) -> Path:
        """``<root>/versions``: one sub-directory per published version."""
        return self.artifacts

    @property
    def history(self) -> History:
        """``<root>/history.jsonl``: every aliases change, oldest first."""
        assert self.audit is not None
        return self.audit

    versions = ArtifactStore.names  # published versions, oldest first
    version_dir = ArtifactStore.path  # the directory of a version; rejects invalid names

    def bundle(self, version: str, *, verify: bool = True) -> Bundle:
        """Load (and by default checksum-verify) a published version's bundle.

        Raises ``VersionNotFound`` if absent and ``BundleError`` if the bundle is invalid.
        """
        bundle = load_bundle(self.require(version), verify=verify)
        if bundle.version != version:
            raise BundleError(
                f"manifest of {version} names version {bundle.version!r}; a registry directory "
                "must hold the bundle of its own name"
            )
        return bundle

    def publish(self, src: Path | str | Bundle, version: str | None = None) -> str:
        """Publish the bundle at ``src`` as ``version`` (default: the manifest's) atomically.

        The source is verified (unless it is a ``Bundle``, which ``load_bundle`` or
        ``write_bundle`` already verified), copied into ``versions/.tmp-<uuid>/``, fsynced,
        verified again and renamed to ``versions/<version>``; only then is it visible. If the
        name differs from the manifest's, the copy's manifest is rewritten to it (the sha256
        covers model.onnx only, so it stays valid). Only the bundle's two files are copied.

        Raises ``BundleError`` for an invalid source, ``InvalidVersionName`` and
        ``VersionExists`` (also when a concurrent publisher of the same name wins the race).
        The temp directory is removed on any failure.
        """
        source = src if isinstance(src, Bundle) else load_bundle(Path(src), verify=True)
        name = check_version_name(source.version if version is None else version)
        self.publish_staged(name, lambda tmp: self._stage(source, tmp, name))
        return name

    def _stage(self, source: Bundle, tmp: Path, name: str) -> None:
        """Copy the bundle into ``tmp``, make it durable and verify the copy."""
        copy_durable(source.onnx_path, tmp / MODEL_FILE)
        if name == source.version:
            copy_durable(source.manifest_path, tmp / MANIFEST_FILE)
        else:
            manifest = dict(source.manifest, version=name)
            write_durable(tmp / MANIFEST_FILE, json_bytes(manifest))
        fsync_dir(tmp)
        staged = load_bundle(tmp, verify=True)  # re-read from disk: catches a bad copy
        if staged.version != name:
            raise BundleError(f"staged manifest names {staged.version!r}, expected {name!r}")

    # -- aliases -------------------------------------------------------------------------------
    def read_aliases(self, *, missing_ok: bool = True) -> Aliases:
        """Current aliases; ``Aliases(None)`` when none have been written yet.

        With ``missing_ok=False`` a missing file (or registry directory) raises
        ``AliasesMissing`` instead: a serving replica must tell "no file" from "no production".
        """
        aliases = self.current()
        if aliases is not None:
            return aliases
        if missing_ok:
            return Aliases(None)
        what = ALIASES_FILE if self.root.is_dir() else "the registry directory"
        raise AliasesMissing(f"{what} is missing")

    aliases_stamp = ArtifactStore.stamp  # a cheap change token for aliases.json

    def activate(
        self, version: str, *, actor: str = "library", reason: str | None = None
    ) -> Aliases:
        """Make ``version`` production; the old production goes onto ``previous``.

        Raises ``VersionNotFound`` if ``version`` is not published. This only checks that the
        version exists; loading and warming it is the service's job. ``actor`` and ``reason``
        go to the history line.
        """
        return self.apply(
            partial(transitions.activate, version=version),
            Change("activate", actor, reason),
            needs=(version,),
        )

    def rollback(
        self, expected: str | None = None, *, actor: str = "library", reason: str | None = None
    ) -> Aliases:
        """Make the most recent ``previous`` version production again (``transitions.rollback``)."""

        def change(cur: Aliases) -> Aliases:
            new = transitions.rollback(cur, expected)
            self.require(str(new.production))  # the target must still be published
            return new

        return self.apply(change, Change("rollback", actor, reason))

    def set_canary(
        self,
        version: str,
        percent: float,
        policy: CanaryPolicy | None = None,
        *,
        actor: str = "library",
        reason: str | None = None,
    ) -> Aliases:
        """Send ``percent`` of traffic to ``version`` (replacing any current canary).

        Raises ``VersionNotFound``, ``InvalidCanary`` for a percent outside (0, 100], and
        ``RegistryError`` when there is no production version or ``version`` already is it.
        """
        return self._set_beside(Canary(version, percent, policy), actor, reason)

    def clear_canary(self, *, actor: str = "library", reason: str | None = None) -> Aliases:
        """Stop the canary (a no-op apart from ``updated_at`` when there is none)."""
        return self.apply(transitions.clear_canary, Change("canary_clear", actor, reason))

    def remove_canary(
        self, version: str, *, actor: str = "auto-rollback", reason: str | None = None
    ) -> Aliases | None:
        """Remove the canary if it still is ``version`` (an automatic rollback); None, writing
        nothing, when the canary is already another version or none."""
        change = partial(transitions.remove_canary, version=version)
        return self.update(change, Change("auto_rollback", actor, reason).line)

    def set_shadow(
        self, version: str, percent: float, *, actor: str = "library", reason: str | None = None
    ) -> Aliases:
        """Have ``version`` also score ``percent`` of requests, off the response path."""
        return self._set_beside(Shadow(version, percent), actor, reason)

    def _set_beside(self, role: Canary | Shadow, actor: str, reason: str | None) -> Aliases:
        """Put a canary or shadow beside production (``<role>_set`` in the history); its version
        must be published when the lock is held. ``role`` was validated before taking the lock."""
        return self.apply(
            partial(transitions.set_beside, role=role),
            Change(f"{role.ROLE}_set", actor, reason),
            needs=(role.version,),
        )

    def clear_shadow(self, *, actor: str = "library", reason: str | None = None) -> Aliases:
        """Stop shadow scoring (a no-op apart from ``updated_at`` when there is none)."""
        return self.apply(transitions.clear_shadow, Change("shadow_clear", actor, reason))

    def deactivate(self, *, actor: str = "library", reason: str | None = None) -> Aliases:
        """Serve nothing: ``production`` becomes null (pushed onto ``previous``), no canary.

        The one way to take the model away from every replica on purpose; ``rollback`` brings
        it back. A missing or broken aliases file never does this.
        """
        return self.apply(transitions.deactivate, Change("deactivate", actor, reason))

    def apply(
        self, change: Callable[[Aliases], Aliases], why: Change, needs: tuple[str, ...] = ()
    ) -> Aliases:
        """Apply a transition under the lock (the versions ``needs`` must be published then),
        write the result and its history line; return the new aliases."""

        def checked(cur: Aliases) -> Aliases:
            for version in needs:
                self.require(version)
            return change(cur)

        new = self.update(checked, why.line)
        assert new is not None
        return new
