"""Device profiles: TOML files loaded into one frozen dataclass, checked when loaded.

A profile lists execution providers in order of preference. ``providers()`` keeps
the ones this onnxruntime build has, CPU always last; a profile whose preferred
providers are missing here runs on what is left and says so once per process, in
one warning line (e.g. the ``jetson`` profile on a laptop: CUDA missing, CPU used).
"""
from __future__ import annotations

import logging
import platform
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from inducekv.core.cli import parse_bytes
from inducekv.core.contract import WEIGHT_FORMATS
from inducekv.core.errors import InduceKVError

log = logging.getLogger(__name__)

PROFILE_DIR = Path(__file__).parent
OPT_LEVELS = ("disable", "basic", "extended", "all")
CPU = "CPUExecutionProvider"
_TOML_TYPES = {"str": (str, "a string"), "int": (int, "an integer"), "float": ((int, float), "a number"),
               "tuple[str, ...]": (list, "a list of names"),
               "dict | None": (dict, "a table")}  # DeviceProfile field annotation -> TOML type
_noticed: set[tuple[str, tuple[str, ...]]] = set()  # (profile, missing providers) already reported


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str = ""              # the target, one line (ikv-run --list-devices)
    intra_op_threads: int = 2          # threads inside one op (0 = all cores)
    inter_op_threads: int = 1          # parallel ops; the decoder is sequential
    execution_providers: tuple[str, ...] = (CPU,)  # in order of preference
    provider_options: dict | None = field(default=None, hash=False)  # {provider: {option: value}}, e.g. CoreML's
    graph_optimization: str = "all"    # onnxruntime optimization level
    weights: str = "any"               # bundle weights the target is sized for (ikv-export --weights); advisory
    default_budget: str = "16MiB"      # cap of a new bank
    k: int = 1                         # entries per query (see devices/cpu.toml)
    kv_bits: int = 8                   # payload quantization of new entries
    compact: str = "perlayer"          # entry compaction of new banks: perlayer (where the bundle can) or none
    keep: float = 0.5                  # perlayer: share of an entry's tokens each layer keeps

    @property
    def default_budget_bytes(self) -> int:
        return parse_bytes(self.default_budget)

    def split_providers(self, available: list[str] | None = None) -> tuple[list[str], list[str]]:
        """(providers to use, CPU last; the profile's providers this onnxruntime build lacks)."""
        if available is None:
            import onnxruntime as ort

            available = ort.get_available_providers()
        chosen = [p for p in self.execution_providers if p in available]
        missing = [p for p in self.execution_providers if p not in available]
        if CPU not in chosen:
            chosen.append(CPU)
        return chosen, missing

    def providers(self) -> list[str | tuple[str, dict]]:
        """The providers to open sessions with (name, or (name, options) where the profile sets options).

        The profile's providers this build lacks get one warning line per process.
        """
        chosen, missing = self.split_providers()
        if missing and (self.name, tuple(missing)) not in _noticed:
            _noticed.add((self.name, tuple(missing)))
            log.warning("device profile %r: %s not available in this onnxruntime build; falling back to %s",
                        self.name, ", ".join(missing), ", ".join(chosen))
        opts = self.provider_options or {}
        return [(p, {k: str(v) for k, v in opts[p].items()}) if p in opts else p for p in chosen]


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
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise InduceKVError(f"cannot read device profile {path}: {e}") from None
    known = {f.name: f for f in fields(DeviceProfile)}
    unknown = set(raw) - set(known)
    if unknown:
        raise InduceKVError(f"device profile {path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    for key, value in raw.items():
        want, what = _TOML_TYPES[known[key].type]
        if not isinstance(value, want) or isinstance(value, bool):
            raise InduceKVError(f"device profile {path}: {key} must be {what}, got {value!r}")
    if "execution_providers" in raw:
        raw["execution_providers"] = tuple(raw["execution_providers"])
    raw.setdefault("name", path.stem)
    prof = DeviceProfile(**raw)
    _check(prof, path)
    return prof


def _check(prof: DeviceProfile, path: Path) -> None:
    where = f"device profile {path}"
    if prof.graph_optimization not in OPT_LEVELS:
        raise InduceKVError(f"{where}: graph_optimization must be one of {OPT_LEVELS}")
    try:
        budget = parse_bytes(prof.default_budget)
    except ValueError as e:
        raise InduceKVError(f"{where}: default_budget: {e}") from None
    if budget <= 0:
        raise InduceKVError(f"{where}: default_budget must be positive, got {prof.default_budget!r}")
    if prof.intra_op_threads < 0 or prof.inter_op_threads < 0 or prof.k < 1 or prof.kv_bits not in (4, 8, 16):
        raise InduceKVError(f"{where}: threads must be >= 0, k >= 1, kv_bits one of 4, 8, 16")
    if prof.compact not in ("perlayer", "none") or not (isinstance(prof.keep, (int, float)) and 0 < prof.keep <= 1):
        raise InduceKVError(f"{where}: compact must be perlayer or none, keep a share in (0, 1]")
    if prof.weights not in ("any", *WEIGHT_FORMATS):
        raise InduceKVError(f"{where}: weights must be one of any, {', '.join(WEIGHT_FORMATS)}; got {prof.weights!r}")
    if not prof.execution_providers or not all(isinstance(p, str) for p in prof.execution_providers):
        raise InduceKVError(f"{where}: execution_providers must be a non-empty list of provider names")
    import onnxruntime as ort

    known = ort.get_all_providers()  # every provider name onnxruntime knows, built here or not
    opts = prof.provider_options or {}
    typos = [p for p in [*prof.execution_providers, *opts] if p not in known]
    if typos:
        raise InduceKVError(f"{where}: unknown execution provider {typos[0]!r}; onnxruntime knows "
                            + ", ".join(known))
    for p, o in opts.items():
        if not isinstance(o, dict) or not all(isinstance(v, (str, int, float)) for v in o.values()):
            raise InduceKVError(f"{where}: provider_options.{p} must be a table of option = value")


def machine_summary() -> dict:
    """This machine: architecture, onnxruntime version and the providers its build has."""
    import onnxruntime as ort

    return {"machine": platform.machine(), "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers()}


def describe_profiles() -> list[dict]:
    """Every bundled profile with the providers it would use on this machine (nothing is logged)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    rows = []
    for name in available_profiles():
        p = load_profile(name)
        use, missing = p.split_providers(available)
        rows.append({"name": p.name, "description": p.description, "intra_op_threads": p.intra_op_threads,
                     "execution_providers": list(p.execution_providers), "uses_here": use, "missing_here": missing,
                     "weights": p.weights, "kv_bits": p.kv_bits, "k": p.k, "default_budget": p.default_budget,
                     "compact": p.compact, "keep": p.keep})
    return rows
