"""The README's commands and snippets, and the CLIs' --help examples, checked without the 10-minute set-up.

Its fenced ``bash`` and ``python`` blocks are read in order, as a newcomer would follow
them: set-up command 1 first, then each section. Every path a command or snippet reads
must exist in the checkout or have been made by an earlier command (``ikv-export -o``,
``ikv-learn --memory``, ``examples/make_image_tasks.py -o``, run here with one image per
split); every ``ikv-*`` command, subcommand, flag and value must parse (click, without
running it) and its ``--help`` must work; every script and flag of ``python X.py`` must
exist; every Python import, method, keyword argument and attribute must exist.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import shlex
import subprocess
import sys
import tomllib
import typing
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PLACEHOLDER = "path/to/"  # README placeholders: "ikv-export path/to/model.gguf ..."
FORWARDS = {"Runtime.generate": "stream"}  # methods whose **kw go to another method of the class
OUTPUT_PARAMS = {("ikv-export", "out"), ("ikv-learn", "memory"), ("ikv-eval", "uses_path"), ("ikv-run", "uses_path")}  # click Path params a command creates


def fenced_blocks() -> list[tuple[str, str, int]]:
    text = README.read_text(encoding="utf-8")
    return [(m[1], m[2], text[:m.start()].count("\n") + 1) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)]


def tracked() -> set[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = set(out.split())
    return files | {str(Path(f).parents[i]) for f in files for i in range(len(Path(f).parents) - 1)}


class Checkout:
    """The files a newcomer has: the checkout, plus what the README's commands made so far."""

    def __init__(self, tmp: Path):
        self.files, self.made, self.tmp = tracked(), set(), tmp

    def exists(self, path: str) -> bool:
        p = str(Path(path))
        return p in self.files or any(p == m or p.startswith(m + "/") for m in self.made)

    def make(self, path: str) -> None:
        self.made.add(str(Path(path)))


def commands(block: str) -> list[list[str]]:
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        cmd = []
        for tok in shlex.split(line, comments=True):
            if tok in ("&&", ";", "||"):
                out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        out.append(cmd)
    return [c for c in out if c]


def entry_point(name: str) -> click.Command:
    target = PYPROJECT["project"]["scripts"].get(name)
    assert target, f"README uses {name}, which pyproject.toml does not install"
    return importlib.import_module(target.split(":")[0]).cli


def check_ikv(cmd: list[str], where: str, state: Checkout) -> None:
    name, args = cmd[0], cmd[1:]
    top = entry_point(name)
    command, cmd_name = top, name
    if isinstance(top, click.Group):
        assert args and args[0] in top.commands, f"{where}: {name} has no subcommand {args[:1]}"
        command, cmd_name, args = top.commands[args[0]], f"{name} {args[0]}", args[1:]
    help_args = [cmd_name.split()[1], "--help"] if command is not top else ["--help"]
    res = CliRunner().invoke(top, help_args)
    assert res.exit_code == 0, f"{where}: {cmd_name} --help failed: {res.output}"
    try:
        ctx = command.make_context(cmd_name, list(args), resilient_parsing=False)
    except click.ClickException as e:
        raise AssertionError(f"{where}: `{' '.join(cmd)}` does not parse: {e.format_message()}") from None
    for param in command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param.type, click.Path) or value is None or str(value).startswith(PLACEHOLDER):
            continue
        if (name, param.name) in OUTPUT_PARAMS:
            state.make(value)
        else:
            assert state.exists(value), f"{where}: `{' '.join(cmd)}` reads {value}, which does not exist yet"
    if name == "ikv-export":
        model = ctx.params["model"]
        from inducekv.export import source

        named = (source.DEFAULT_NAME, source.DEFAULT_VLM_NAME, source.GEMMA_NAME)   # models ikv-export knows by name
        assert model in named or model.startswith(PLACEHOLDER) or state.exists(model), model
    if ctx.params.get("prompt") and ctx.params.get("memory"):
        check_prompt_subject(ctx.params["prompt"], where)


def check_prompt_subject(prompt: str, where: str) -> None:
    """A prompt asked with memory names a subject some example task teaches (not an invented one)."""
    names = re.findall(r"(?<!^)\b([A-Z][a-z]+)", prompt)
    tasks = " ".join(p.read_text(encoding="utf-8") for p in (ROOT / "examples" / "tasks").glob("*.jsonl"))
    missing = [n for n in names if n not in tasks]
    assert not missing, f"{where}: prompt {prompt!r} asks about {missing}, which no examples/tasks file teaches"


def check_python_script(cmd: list[str], where: str, state: Checkout) -> None:
    if cmd[1] == "-m":
        assert cmd[2] in ("venv", "pytest") or importlib.util.find_spec(cmd[2]), f"{where}: no module {cmd[2]}"
        if cmd[2] == "venv":
            state.make(cmd[3])
        return
    script = cmd[1]
    assert state.exists(script), f"{where}: {script} does not exist"
    source = (ROOT / script).read_text(encoding="utf-8")
    for flag in (t.split("=")[0] for t in cmd[2:] if t.startswith("-")):
        assert f'"{flag}"' in source, f"{where}: {script} has no option {flag}"
    if script == "examples/make_image_tasks.py":  # run it small and record what it writes
        out = cmd[cmd.index("-o") + 1]
        tmp = state.tmp / "image_tasks"
        subprocess.run([sys.executable, script, "-o", str(tmp), "--train", "1", "--test", "1"], cwd=ROOT, check=True,
                       capture_output=True, timeout=300)
        state.made |= {str(Path(out) / p.relative_to(tmp)) for p in tmp.rglob("*")}


def check_pip(cmd: list[str], where: str) -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    for tok in cmd[2:]:
        m = re.fullmatch(r"\.\[([\w,]+)\]", tok)
        if m:
            assert set(m[1].split(",")) <= set(extras), f"{where}: unknown extras in {tok}"
        if tok.startswith("torch=="):
            assert tok in extras["export"], f"{where}: {tok} is not the export extra's torch pin"


def check_bash(block: str, where: str, state: Checkout) -> None:
    for cmd in commands(block):
        cmd = cmd[1:] if cmd[0] == "sudo" else cmd
        if cmd[0].endswith(".sh"):  # a script of this checkout: it exists and takes the flags used
            assert state.exists(cmd[0]), f"{where}: {cmd[0]} does not exist"
            source = (ROOT / cmd[0]).read_text(encoding="utf-8")
            assert all(f"{t})" in source for t in cmd[1:] if t.startswith("--")), f"{where}: {' '.join(cmd)}"
        elif cmd[0].startswith("ikv-"):
            check_ikv(cmd, where, state)
        elif cmd[0] in ("python", "python3"):
            check_python_script(cmd, where, state)
        elif cmd[0] == "pip":
            check_pip(cmd, where)
        elif cmd[0] in (".", "source"):
            assert state.exists(cmd[1]), f"{where}: {cmd[1]} does not exist"
        else:
            raise AssertionError(f"{where}: this test does not know the command {cmd[0]!r}; teach it")


def _hints(obj) -> dict:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # an annotation that does not resolve: no deeper checks
        return {}


class Snippets:
    """Static checks of the Python snippets, which share one session (rt, r, bank, ...)."""

    def __init__(self, state: Checkout):
        self.state, self.names, self.types = state, {}, {}

    def check(self, source: str, where: str) -> None:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = importlib.import_module(node.module)
                for a in node.names:
                    assert hasattr(mod, a.name), f"{where}: {node.module} has no {a.name}"
                    self.names[a.asname or a.name] = getattr(mod, a.name)
        for node in tree.body:
            self.statement(node, where)

    def statement(self, node, where):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            self.types[node.targets[0].id] = self.expr(node.value, where)
        elif isinstance(node, (ast.With,)):
            for item in node.items:
                t = self.expr(item.context_expr, where)
                if isinstance(item.optional_vars, ast.Name):
                    self.types[item.optional_vars.id] = getattr(t, "__enter__", None) and _hints(t.__enter__).get(
                        "return", t)
            for n in node.body:
                self.statement(n, where)
        elif isinstance(node, ast.For):
            self.expr(node.iter, where)
            for n in node.body:
                self.statement(n, where)
        elif isinstance(node, ast.Expr):
            self.expr(node.value, where)

    def expr(self, node, where):
        """Check an expression; return the class of its value when known, else None."""
        if isinstance(node, ast.Name):
            return self.types.get(node.id) if node.id in self.types else self.names.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self.expr(node.value, where)
            if owner is None:
                return None
            cls = owner if inspect.isclass(owner) else type(owner)
            assert hasattr(cls, node.attr) or node.attr in _hints(cls) or node.attr in getattr(
                cls, "__dataclass_fields__", {}), f"{where}: {cls.__name__} has no attribute {node.attr}"
            attr = inspect.getattr_static(cls, node.attr, None)
            if isinstance(attr, property):
                return _hints(attr.fget).get("return")
            if callable(getattr(cls, node.attr, None)):
                return getattr(cls, node.attr)
            return _hints(cls).get(node.attr)
        if isinstance(node, ast.Call):
            fn = self.expr(node.func, where)
            for a in [*node.args, *(k.value for k in node.keywords)]:
                self.expr(a, where)
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    self.path_literal(a.value, where)
            if fn is None or not callable(fn):
                return None
            params = dict(inspect.signature(fn).parameters)
            target = FORWARDS.get(getattr(fn, "__qualname__", ""))
            if target:  # its **kw go to another method of its class
                cls = vars(inspect.getmodule(fn))[fn.__qualname__.split(".")[0]]
                params = {n: p for n, p in params.items() if p.kind is not p.VAR_KEYWORD}
                params |= inspect.signature(getattr(cls, target)).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                for k in node.keywords:
                    assert k.arg in params, f"{where}: {fn.__qualname__} takes no keyword {k.arg}"
            ret = _hints(fn).get("return")
            return fn if inspect.isclass(fn) else ret if inspect.isclass(ret) else None
        for child in ast.iter_child_nodes(node):
            self.expr(child, where)
        return None

    def path_literal(self, s: str, where: str) -> None:
        if re.fullmatch(r"[\w./-]+\.(ikv|jsonl|png|gguf)|bundles/[\w./-]+", s):
            assert self.state.exists(s), f"{where}: the snippet reads {s}, which does not exist at this point"


def test_readme_starts_with_exactly_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    head = text[:text.index("\n## ")]
    blocks = re.findall(r"```(\w*)\n(.*?)```", head, re.S)
    assert [b[0] for b in blocks] == ["bash", "bash"]
    assert blocks[0][1].startswith("# 1. ") and blocks[1][1].startswith("# 2. ")
    assert "ikv-export default -o bundles/default/fp32" in blocks[0][1] and "pytest" in blocks[1][1]


def follow_readme(tmp: Path) -> Checkout:
    """Check every block in order; the files a newcomer has at the end."""
    state = Checkout(tmp)
    snippets = Snippets(state)
    for lang, body, line in fenced_blocks():
        if lang == "bash":
            check_bash(body, f"README.md:{line}", state)
        elif lang == "python":
            snippets.check(body, f"README.md:{line}")
    return state


def test_every_readme_block_runs_as_written_after_setup(tmp_path):
    blocks = fenced_blocks()
    assert sum(lang == "bash" for lang, _, _ in blocks) >= 5 and sum(lang == "python" for lang, _, _ in blocks) >= 3
    state = follow_readme(tmp_path)
    assert state.exists("bundles/default/fp32") and state.exists("bank.ikv")  # what set-up command 1 leaves


def help_examples() -> list[tuple[str, str]]:
    """(command, line) for each example in the ``--help`` of every installed command and subcommand."""
    out = []
    for name in PYPROJECT["project"]["scripts"]:
        top = entry_point(name)
        for command in [top, *getattr(top, "commands", {}).values()]:
            m = re.search(r"Examples?:\n(.*?)(?:\n\s*\n|$)", command.help or "", re.S)
            out += [(name, line.strip()) for line in (m[1].splitlines() if m else []) if line.strip()]
    return out


def test_every_help_example_runs_after_the_readme(tmp_path):
    state = follow_readme(tmp_path)
    examples = help_examples()
    assert {name for name, _ in examples} >= {"ikv-run", "ikv-eval", "ikv-learn", "ikv-export"}
    for name, line in examples:
        check_bash(line, f"{name} --help", state)


def test_inline_commands_in_the_prose_exist():
    text = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    for span in sorted(set(re.findall(r"`((?:python |ikv-)[^`\n]*)`", text))):
        tokens = span.replace("\\|", "|").split()
        if tokens[0] == "python":
            if tokens[1] == "-m":
                assert importlib.util.find_spec(tokens[2]), span
            else:
                assert (ROOT / tokens[1]).is_file(), span
                source = (ROOT / tokens[1]).read_text(encoding="utf-8")
                assert all(f'"{t}"' in source for t in tokens[2:] if t.startswith("--")), span
            continue
        top = entry_point(tokens[0])
        options = {o for p in top.params for o in p.opts}
        if isinstance(top, click.Group):
            subs = [s for t in tokens[1:2] for s in t.split("|") if not t.startswith("-")]
            assert all(s in top.commands for s in subs), span
            options |= {o for c in top.commands.values() for p in c.params for o in p.opts}
        assert all(t in options for t in tokens[1:] if t.startswith("--")), span


@pytest.mark.parametrize("block,words", [
    ("```bash\nikv-run --bundle bundles/default/int8 --prompt hi\n```", ["bundles/default/int8", "does not exist"]),
    ("```bash\nikv-eval --bundle bundles/default/fp32 --task capitals.test.jsonl\n```", ["capitals.test.jsonl"]),
    ("```bash\nikv-run --bundle bundles/default/fp32 --prompt hi --beams 4\n```", ["does not parse", "--beams"]),
    ("```bash\nikv-bank show bank.ikv\n```", ["no subcommand"]),
    ("```bash\nikv-run --bundle bundles/default/fp32 --memory bank.ikv --prompt 'Capital of Vexland?'\n```",
     ["Vexland"]),
    ("```bash\npython benchmarks/decode.py --fast\n```", ["no option --fast"]),
    ("```bash\nsudo devices/check_arm64.sh --threads 4\n```", ["check_arm64.sh --threads"]),
    ("```python\nfrom inducekv.runtime import Runtime\nrt = Runtime.open('bundles/default/fp32')\n"
     "rt.generate('hi', kk=1)\n```", ["takes no keyword kk"]),
    ("```python\nfrom inducekv.runtime import Runtime\nrt = Runtime.open('bundles/default/fp32')\n"
     "r = rt.generate('hi')\nr.timings.ttft_s\n```", ["Timings has no attribute ttft_s"]),
    ("```python\nfrom inducekv.runtime import Runtime\nrt = Runtime.open('bundles/default/int4')\n```",
     ["bundles/default/int4"]),
    ("```python\nfrom inducekv.runtime import Runtime\nrt = Runtime.open('bundles/default/fp32')\n"
     "rt.generate('Is this digit even or odd?', image='seven.png')\n```", ["seven.png"]),
    ("```bash\npython examples/kiosk.py --bundle bundles/default/fp32 --memory k.ikv --voice\n```",
     ["no option --voice"]),
])
def test_the_check_catches_what_a_newcomer_would_hit(monkeypatch, tmp_path, block, words):
    setup = re.search(r"```bash\n# 1\..*?```", README.read_text(encoding="utf-8"), re.S)[0]
    fake = tmp_path / "README.md"
    fake.write_text(setup + "\n\n" + block + "\n")
    monkeypatch.setattr(sys.modules[__name__], "README", fake)
    with pytest.raises(AssertionError) as e:
        state, snippets = Checkout(tmp_path), Snippets(Checkout(tmp_path))
        snippets.state = state
        for lang, body, line in fenced_blocks():
            (check_bash(body, "x", state) if lang == "bash" else snippets.check(body, "x"))
    assert all(w in str(e.value) for w in words), str(e.value)
