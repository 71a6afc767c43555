"""Model metadata: bytes per layer from a model's own files, or from a catalog of known configs."""
from reconciler.models.catalog import CATALOG, ModelNotFound, catalog_profile, resolve_profile
from reconciler.models.metadata import (
    ModelMetadataError,
    ModelProfile,
    profile_from_config,
    profile_from_directory,
    read_safetensors_header,
)

__all__ = [
    "CATALOG", "ModelMetadataError", "ModelNotFound", "ModelProfile", "catalog_profile",
    "profile_from_config", "profile_from_directory", "read_safetensors_header", "resolve_profile",
]
