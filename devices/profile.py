"""Device profiles: TOML files loaded into one frozen dataclass, checked when loaded."""
from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from inducekv.core.cli import parse_bytes
from inducekv.core.errors import InduceKVError

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).parent
OPT_LEVELS = ("disable", "basic", "extended", "all")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    intra_op_threads: int = 2          # threads inside one op (0 = all cores)
    inter_op_threads: int = 1          # parallel ops; the decoder is sequential
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)  # in order of preference
    graph_optimization: str = "all"    # onnxruntime optimization level
    default_budget: str = "16MiB"      # cap of a new bank
    k: int = 1                         # entries per query (see devices/cpu.toml)
    kv_bits: int = 8                   # payload quantization of new entries

    @property
    def default_budget_bytes(self) -> int:
        return parse_bytes(self.default_budget)

    def providers(self) -> list[str]:
        """The profile's providers that this onnxruntime build has, CPU always last."""
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        chosen = [p for p in self.execution_providers if p in available]
        for p in self.execution_providers:
            if p not in available:
                log.info("execution provider %s is not available here; falling back", p)
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        return chosen


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (``cpu``) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = PROFILE_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise InduceKVError(f"unknown device profile {name_or_path!r}; available: "
                                f"{', '.join(available_profiles())}, or a path to a .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise InduceKVError(f"cannot read device profile {path}: {e}") from None
    known = {f.name: f for f in fields(DeviceProfile)}
    unknown = set(raw) - set(known)
    if unknown:
        raise InduceKVError(f"device profile {path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    if "execution_providers" in raw:
        raw["execution_providers"] = tuple(raw["execution_providers"])
    raw.setdefault("name", path.stem)
    prof = DeviceProfile(**raw)
    if prof.graph_optimization not in OPT_LEVELS:
        raise InduceKVError(f"device profile {path}: graph_optimization must be one of {OPT_LEVELS}")
    try:
        budget = parse_bytes(prof.default_budget)
    except ValueError as e:
        raise InduceKVError(f"device profile {path}: default_budget: {e}") from None
    if budget <= 0:
        raise InduceKVError(f"device profile {path}: default_budget must be positive, got {prof.default_budget!r}")
    if prof.intra_op_threads < 0 or prof.inter_op_threads < 0 or prof.k < 1 or prof.kv_bits not in (4, 8, 16):
        raise InduceKVError(f"device profile {path}: threads must be >= 0, k >= 1, kv_bits one of 4, 8, 16")
    return prof
