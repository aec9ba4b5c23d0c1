"""One typed error hierarchy for patches and the registry.

Every message is written for the person who has to act on it: what is wrong and what was
expected. `http_status` is the single mapping to HTTP codes the server uses; nothing
classifies errors by string matching.
"""

from __future__ import annotations


class ConceptGuardError(Exception):
    """Base of every error ConceptGuard raises on purpose (user-facing message)."""

    http_status = 500
    # Seconds a client should wait before trying again (HTTP Retry-After), where that helps.
    retry_after_s: int | None = None


# --- a patch file that cannot be accepted on its own (malformed or hostile) ---------------


class PatchFileError(ConceptGuardError):
    """The bytes are not an acceptable ConceptGuard patch file."""

    http_status = 400


class TruncatedFile(PatchFileError):
    pass


class FileTooLarge(PatchFileError):
    http_status = 413


class HeaderTooLarge(PatchFileError):
    pass


class PickleRefused(PatchFileError):
    pass


class HeaderNotJSON(PatchFileError):
    pass


class BadTensorEntry(PatchFileError):
    """A header entry whose shape, offsets or layout is inconsistent."""


class DuplicateTensorName(PatchFileError):
    pass


class UnsupportedDType(PatchFileError):
    pass


class TooManyTensors(PatchFileError):
    pass


class NonFiniteValues(PatchFileError):
    pass


class MissingManifest(PatchFileError):
    pass


class ManifestNotJSON(PatchFileError):
    pass


class InvalidManifest(PatchFileError):
    """The manifest is JSON but its fields are missing, mistyped or inconsistent."""


class ContentHashMismatch(PatchFileError):
    pass


class BadTensorNames(PatchFileError):
    """Tensor names that cannot belong to the patch's kind (checked without a pipeline)."""


# --- a well-formed patch that does not fit a given pipeline -------------------------------


class PatchIncompatible(ConceptGuardError):
    http_status = 422


class WrongTarget(PatchIncompatible):
    """The patch edits a component this pipeline does not have (or of the wrong kind)."""


class BaseFingerprintMismatch(PatchIncompatible):
    pass


class UnknownTensorName(PatchIncompatible):
    pass


class ShapeMismatch(PatchIncompatible):
    pass


class StackOrderError(PatchIncompatible):
    """Removing a patch that is not the most recently applied one on its component."""

    http_status = 409


# --- the registry -----------------------------------------------------------------------


class RegistryError(ConceptGuardError):
    pass


class PatchNotFound(RegistryError):
    http_status = 404


class AmbiguousReference(RegistryError):
    http_status = 400


class TenantNotFound(RegistryError):
    http_status = 404


class PatchInUse(RegistryError):
    http_status = 409


class InvalidName(RegistryError):
    http_status = 400


class NothingToRollBack(RegistryError):
    http_status = 409


class RegistryCorrupt(RegistryError):
    """On-disk state that fails its own checks: never silently ignored."""

    http_status = 500


class RegistryUnreadable(RegistryError):
    """The registry's files cannot be read (permissions, I/O): nobody is served (fail closed)."""

    http_status = 503


class RegistryStateMissing(RegistryUnreadable):
    """No state where a registry is expected (or once was): nothing is read or written, and
    nobody is served, rather than starting an empty registry (fail closed)."""


class RegistryExists(RegistryError):
    """`init` or `recover` where a registry's state is present."""

    http_status = 409


class PatchExists(RegistryError):
    """The same bytes are registered already, under another name than the one asked for."""

    http_status = 409


# --- models ------------------------------------------------------------------------------


class ModelLoadError(ConceptGuardError):
    """A model folder or hub id that cannot be loaded as a diffusers pipeline."""

    http_status = 500
