"""The bundle manifest; it lives in ``inducekv.core.manifest`` (kept here for existing imports)."""
from inducekv.core.manifest import (MAX_MANIFEST_BYTES, Manifest, describe_files, read_manifest,  # noqa: F401
                                    sha256_file, write_manifest)
