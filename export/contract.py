"""The bundle I/O contract; it lives in ``inducekv.core.contract`` (kept here for existing imports)."""
from inducekv.core.contract import *  # noqa: F401,F403
from inducekv.core.contract import SCHEMA_VERSION, MANIFEST_NAME, BUNDLE_KIND  # noqa: F401
