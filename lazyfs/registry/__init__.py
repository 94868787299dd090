"""OCI distribution registry client for lazyfs.

    from lazyfs.registry import RegistryClient, RegistryConfig
    with RegistryClient(RegistryConfig(insecure_hosts={"reg.lan:5000"})) as client:
        image = client.resolve("reg.lan:5000/app:1.0")
        repo = client.repository(image.reference)
        footer = repo.get_range(image.manifest.layers[-1].digest, offset, 51)

Speaks only HTTP(S) to registries (and their token servers and storage
redirects); knows nothing of stargz or containerd.
"""

from .client import RegistryClient, Repository, Resolved
from .config import RegistryConfig
from .credentials import Credential, CredentialStore
from .errors import (
    AuthError,
    ConfigError,
    CredentialsError,
    DigestMismatch,
    IncompleteBody,
    InsecureRegistry,
    InvalidReference,
    NotFound,
    ProtocolError,
    RegistryError,
    TLSError,
    Unreachable,
)
from .manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
    host_platform,
)
from .reference import Reference, parse_reference
from .upload import PushResult

__all__ = [
    "AuthError",
    "ConfigError",
    "Credential",
    "CredentialStore",
    "CredentialsError",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "Descriptor",
    "DigestMismatch",
    "IncompleteBody",
    "InsecureRegistry",
    "InvalidReference",
    "Manifest",
    "NotFound",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "Platform",
    "ProtocolError",
    "PushResult",
    "Reference",
    "RegistryClient",
    "RegistryConfig",
    "RegistryError",
    "Repository",
    "Resolved",
    "TLSError",
    "Unreachable",
    "host_platform",
    "parse_reference",
]
