"""Typed errors of the deployment layer (all derive from :class:`fedpeft.core.errors.FedPeftError`)."""

from __future__ import annotations

from fedpeft.core.errors import ConfigError, FedPeftError


class DeployError(FedPeftError):
    """A deployment process could not start, or its run did not complete."""


class CertificateExistsError(DeployError, FileExistsError):
    """A key or certificate file already exists and ``force`` was not given."""


class CertificateError(DeployError, ConfigError):
    """Certificate or key material is missing, malformed or does not fit its use."""
