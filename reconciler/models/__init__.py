"""Model metadata: bytes per layer from a model's own files, or from a catalog of known configs."""
from reconciler.models.catalog import (
    CATALOG, ModelNotFound, catalog_profile, local_model_dir, resolve_profile, split_refusal_of,
)
from reconciler.models.metadata import (
    InvalidModelConfig,
    ModelMetadataError,
    ModelProfile,
    profile_from_config,
    profile_from_directory,
    read_safetensors_header,
    UnsupportedDtype,
)

__all__ = [
    "CATALOG", "InvalidModelConfig", "ModelMetadataError", "ModelNotFound", "ModelProfile", "UnsupportedDtype",
    "catalog_profile", "local_model_dir", "profile_from_config", "profile_from_directory", "read_safetensors_header",
    "resolve_profile", "split_refusal_of",
]
