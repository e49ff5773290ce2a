#!/usr/bin/env bash
# ARM64 proof: the device side (ikv-run, ikv-eval, ikv-learn, ikv-bank) on aarch64, emulated on an x86_64
# Debian/Ubuntu host with qemu user mode, against an int8 bundle and a bank made on x86.
#
#   sudo devices/check_arm64.sh [--bundle DIR] [--work DIR] [--n N] [--cpu MODEL]
#
#   --bundle DIR  int8 bundle made on x86 (default bundles/default/int8; exported with ikv-export from PATH if absent)
#   --work DIR    scratch (default ~/.cache/inducekv-arm64): the arm64 root, an x86 device venv, tasks, banks, logs
#   --n N         train and test examples per task (default 20: keeps the emulated learn to minutes)
#   --cpu MODEL   emulated CPU (default cortex-a76, the Raspberry Pi 5's; `qemu-aarch64-static -cpu help`)
#
# Steps: (1) qemu-user-static + debootstrap from apt, qemu-aarch64 registered with binfmt_misc (flag F, so it
# works inside a chroot); (2) a Debian bookworm arm64 root (debootstrap: ~10 min the first time); (3) the same
# pinned device-side packages (no torch) in an arm64 venv inside the root and an x86 venv beside it: wheels from
# PyPI, hnswlib compiled from source inside the root (~7 min emulated); this checkout copied into both;
# (4) x86: ikv-learn a bank from the capitals facts that N test questions ask, ikv-eval with it, ikv-run; (5) arm64: ikv-bank verify,
# ikv-run, ikv-eval with the x86 bank, ikv-learn N colours examples into a copy of it, ikv-eval; (6) x86 serves
# the arm64-learned bank; (7) the retrieved entries of both architectures are compared, example by example.
# Later runs reuse the root and the venvs. Heavy steps run under nice -n 19.
#
# Host changes: apt packages, binfmt_misc mounted and qemu-aarch64 registered (only if not already).
# Mounts into the root live in a private mount namespace (unshare) and vanish with it.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
BUNDLE=$REPO/bundles/default/int8
WORK=${HOME}/.cache/inducekv-arm64
N=20
CPU_MODEL=cortex-a76
MIRROR=http://deb.debian.org/debian
# Same versions on both architectures (the ones the README's numbers were measured with).
PINS="onnxruntime==1.32.0 numpy==2.4.6 tokenizers==0.22.2 safetensors==0.8.0 click==8.5.1 pillow==13.0.0
      tqdm==4.70.1 jinja2==3.1.6 hnswlib==0.8.0"
NICE="nice -n 19"
PROMPT="Write a long story about a brave knight and a dragon."

while [ $# -gt 0 ]; do
  case $1 in
    --bundle) BUNDLE=$(realpath -m "$2"); shift 2 ;;
    --work) WORK=$(realpath -m "$2"); shift 2 ;;
    --n) N=$2; shift 2 ;;
    --cpu) CPU_MODEL=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "Error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $N in ''|*[!0-9]*|0) echo "Error: --n takes a positive integer, got '$N'" >&2; exit 2 ;; esac

say() { printf '\n== %s\n' "$*" >&2; }
die() { echo "Error: $*" >&2; exit 2; }

[ "$(uname -m)" = x86_64 ] || die "run this on an x86_64 host (it emulates aarch64)"
[ "$(id -u)" = 0 ] || die "needs root (apt, debootstrap, chroot, binfmt_misc); run it with sudo"
command -v git >/dev/null || die "needs git (to copy this checkout)"

ROOT=$WORK/rootfs          # the arm64 Debian root
SHARED=/ikv                # inside the root: tasks, banks and outputs, the same files x86 reads
HOSTSHARED=$ROOT$SHARED
X86=$WORK/x86-venv         # device-side venv on the host, same pins
mkdir -p "$WORK"

# -- 1. qemu + binfmt ----------------------------------------------------------------------------------
say "1. qemu-user-static, debootstrap, binfmt_misc"
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap >&2
fi
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  [ -f "$conf" ] || die "$conf missing (qemu-user-static installs it)"
  cat "$conf" > /proc/sys/fs/binfmt_misc/register
fi
grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
  || die "qemu-aarch64 is registered without the F flag; it cannot run inside a chroot"
qemu-aarch64-static --version | head -1 >&2

# onnxruntime's cpuinfo initialisation segfaults under qemu-user when it parses the x86 host's /proc/cpuinfo;
# the root sees a /proc/cpuinfo describing the emulated CPU instead (one entry per host core).
CPUINFO=$WORK/cpuinfo
: > "$CPUINFO"
for i in $(seq 0 $(( $(nproc) - 1 ))); do
  printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n' "$i" >> "$CPUINFO"
done

HOSTCA=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
arm() {  # arm ARGS...: run a command inside the arm64 root, bundle read-only at /bundle, shared dir at /ikv
  unshare --mount --propagation private bash -c '
    set -e; R=$1; B=$2; C=$3; shift 3
    mount --bind /proc "$R/proc"; mount --bind /dev "$R/dev"; mount --bind /sys "$R/sys"
    mount --bind "$C" "$R/proc/cpuinfo"
    mount --bind /etc/resolv.conf "$R/etc/resolv.conf"
    mkdir -p "$R/bundle"; mount --bind "$B" "$R/bundle"; mount -o remount,bind,ro "$R/bundle"
    exec env -i PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU='"$CPU_MODEL"' \
      PIP_CERT=/etc/ssl/certs/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
      chroot "$R" "$@"' _ "$ROOT" "$BUNDLE" "$CPUINFO" "$@"
}

# -- 2. arm64 root -------------------------------------------------------------------------------------
say "2. Debian bookworm arm64 root in $ROOT"
if [ ! -f "$ROOT/.ikv-root-ready" ]; then
  rm -rf "$ROOT"
  $NICE debootstrap --foreign --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-dev,g++,ca-certificates bookworm "$ROOT" "$MIRROR" >&2
  unshare --mount --propagation private bash -c '
    mount --bind /proc "$1/proc"; mount --bind /dev "$1/dev"
    exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root DEBOOTSTRAP_DIR=/debootstrap \
      nice -n 19 chroot "$1" /debootstrap/debootstrap --second-stage' _ "$ROOT" >&2
  touch "$ROOT/.ikv-root-ready"
fi
cp "$HOSTCA" "$ROOT/etc/ssl/certs/host-ca.crt"
arm uname -m
arm python3 --version

# -- 3. device-side venvs, this checkout -------------------------------------------------------------
say "3. device-side packages (pinned) and this checkout, arm64 and x86"
mkdir -p "$HOSTSHARED"
rm -rf "$HOSTSHARED/src" && mkdir -p "$HOSTSHARED/src"
git -C "$REPO" ls-files -co --exclude-standard -z | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$HOSTSHARED/src"
if [ ! -x "$ROOT/opt/venv/bin/python" ]; then arm python3 -m venv /opt/venv; fi
# shellcheck disable=SC2086
arm $NICE pip install -q --no-binary hnswlib $PINS >&2
arm $NICE pip install -q --no-deps --force-reinstall "$SHARED/src" >&2
[ -x "$X86/bin/python" ] || python3 -m venv "$X86"
# shellcheck disable=SC2086
$NICE "$X86/bin/pip" install -q $PINS >&2
$NICE "$X86/bin/pip" install -q --no-deps --force-reinstall "$HOSTSHARED/src" >&2
arm python -c "import platform, onnxruntime as o, numpy, hnswlib, tokenizers
print(platform.machine(), 'onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__)"
"$X86/bin/python" -c "import platform, onnxruntime as o, numpy
print(platform.machine(), 'onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__)"
"$X86/bin/python" -c "import importlib.util as u; assert u.find_spec('torch') is None" \
  || die "torch is installed in $X86: the device side must run without it"

# -- 4. x86: bundle, bank, answers ----------------------------------------------------------------------
say "4. x86: int8 bundle, a bank learned from $N capitals examples, eval and run"
if [ ! -f "$BUNDLE/manifest.json" ]; then
  command -v ikv-export >/dev/null || die "no bundle at $BUNDLE and no ikv-export on PATH (activate the set-up venv)"
  $NICE ikv-export default -o "$BUNDLE" --weights int8 >&2
fi
grep -q '"weights": "int8"' "$BUNDLE/manifest.json" || echo "note: $BUNDLE is not an int8 bundle" >&2
D=$HOSTSHARED
for t in capitals colours; do  # the first N test questions and the training facts they ask about
  python3 - "$REPO/examples/tasks/$t" "$D/$t" "$N" <<'EOF'
import json, re, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
test = open(src + ".test.jsonl", encoding="utf-8").readlines()[:n]
train = open(src + ".train.jsonl", encoding="utf-8").readlines()
words = lambda line: set(re.findall(r"[a-z]{4,}", json.loads(line)["prompt"].lower()))
df = {}
for line in train:
    for w in words(line):
        df[w] = df.get(w, 0) + 1
asked = {w for line in test for w in words(line) if df.get(w, 0) <= 2}  # the subjects: rare words
train = [line for line in train if words(line) & asked][:n]
open(dst + ".test.jsonl", "w", encoding="utf-8").writelines(test)
open(dst + ".train.jsonl", "w", encoding="utf-8").writelines(train)
EOF
done
rm -f "$D"/*.ikv "$D"/*.json  # this run's outputs only
x86() { local c=$1; shift; (cd "$D" && $NICE "$X86/bin/$c" "$@"); }
x86 ikv-learn --bundle "$BUNDLE" --memory x86.ikv --task capitals.train.jsonl --budget 64MiB --json > "$D/x86.learn.json"
x86 ikv-eval --bundle "$BUNDLE" --memory x86.ikv --task capitals.test.jsonl --json > "$D/x86.eval.json"
x86 ikv-run --bundle "$BUNDLE" --prompt "$PROMPT" --max-new-tokens 64 --json > "$D/x86.run.json"

# -- 5. arm64: the same bank file, then a learn there -------------------------------------------------
say "5. arm64 (emulated $CPU_MODEL): verify, run, eval with the x86 bank, learn $N colours examples, eval"
a() { local c=$1; shift; arm bash -c 'cd /ikv && exec nice -n 19 "$@"' _ "$c" "$@"; }
a ikv-run --list-devices
a ikv-bank verify x86.ikv
a ikv-run --bundle /bundle --prompt "$PROMPT" --max-new-tokens 64 --json > "$D/arm.run.json"
x86 ikv-run --bundle "$BUNDLE" --prompt "$PROMPT" --max-new-tokens 64 --json > "$D/x86.run2.json"  # load drifts
a ikv-eval --bundle /bundle --memory x86.ikv --task capitals.test.jsonl --json > "$D/arm.eval.json"
cp "$D/x86.ikv" "$D/arm.ikv"
a ikv-learn --bundle /bundle --memory arm.ikv --task colours.train.jsonl --json > "$D/arm.learn.json"
a ikv-eval --bundle /bundle --memory arm.ikv --task colours.test.jsonl --json > "$D/arm.eval2.json"

# -- 6. x86 serves the arm64-learned bank ---------------------------------------------------------------
say "6. x86: verify and serve the bank learned on arm64"
x86 ikv-bank verify arm.ikv
x86 ikv-eval --bundle "$BUNDLE" --memory arm.ikv --task colours.test.jsonl --json > "$D/x86.eval2.json"

# -- 7. compare ---------------------------------------------------------------------------------------
say "7. summary"
"$X86/bin/python" - "$D" "$CPU_MODEL" <<'EOF'
import json, re, sys
from pathlib import Path

d, cpu = Path(sys.argv[1]), sys.argv[2]
j = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")}
host = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
print(f"host CPU: {host}; emulated: qemu-aarch64 user mode, -cpu {cpu}")
for run in ("x86.run", "arm.run", "x86.run2"):  # x86 just before and just after the emulated run
    t = j[run]["timings"]
    print(f"ikv-run {run:8}: {t['new_tokens']} tokens, {t['tokens_per_s']:.2f} tok/s, ttft {t['ttft_ms']:.0f} ms")
x86_tps = max(j[r]["timings"]["tokens_per_s"] for r in ("x86.run", "x86.run2"))
print(f"decode speed arm64 (emulated) / x86 (best of two): {j['arm.run']['timings']['tokens_per_s'] / x86_tps:.3f}")
for arch, key in (("x86", "x86.learn"), ("arm", "arm.learn")):
    L = j[key]
    print(f"ikv-learn {arch:3}: {L['task']} added {L['added']} of {L['examples']}, evicted {L['evicted']}, "
          f"{L['total_s']:.1f} s; tasks after {L['tasks_after']}")

def same(a, b, what):
    ea, eb = j[a]["examples"], j[b]["examples"]
    ids = sum([(e["id"], e["task"]) for e in x["entries"]] == [(e["id"], e["task"]) for e in y["entries"]]
              for x, y in zip(ea, eb))
    text = sum(x["generated"] == y["generated"] for x, y in zip(ea, eb))
    dscore = max((abs(u["score"] - v["score"]) for x, y in zip(ea, eb) for u, v in zip(x["entries"], y["entries"])),
                 default=0.0)
    print(f"{what}: same retrieved entries {ids}/{len(ea)}, same answer {text}/{len(ea)}, max |score diff| "
          f"{dscore:.2e}; accuracy {j[a]['accuracy']:.2f} ({a}) vs {j[b]['accuracy']:.2f} ({b}); median ttft "
          f"{j[a]['median_ttft_ms']:.0f} vs {j[b]['median_ttft_ms']:.0f} ms")
    return ids == len(ea)

ok = same("x86.eval", "arm.eval", "bank made on x86, capitals")
ok &= same("arm.eval2", "x86.eval2", "bank learned on arm64, colours")
print("PASS: the same bank file retrieves the same entries on both architectures" if ok else
      "FAIL: retrieved entries differ between architectures")
sys.exit(0 if ok else 1)
EOF
