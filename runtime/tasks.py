"""Task files (JSONL): one example per line.

    {"prompt": "...", "answer": "...", "image": "optional/path.png"}
    {"prompt": "...", "answers": ["...", "..."]}

Image paths are relative to the task file. Files are untrusted: lines are
length-bounded and every error names the line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from inducekv.core.errors import InduceKVError

MAX_LINE_BYTES = 1 << 20  # 1 MiB per example is far more than any prompt


@dataclass(frozen=True, slots=True)
class Example:
    prompt: str
    answers: tuple[str, ...]      # empty for query-only files (ikv-run --task)
    image: Path | None            # resolved against the task file's folder
    line: int                     # 1-based line number in the file


def iter_task(path: str | Path, require_answer: bool = True) -> Iterator[Example]:
    """Stream examples from a JSONL task file, validating each line."""
    path = Path(path)
    if not path.is_file():
        raise InduceKVError(f"task file {path} does not exist")
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise InduceKVError(f"{path}:{n}: line is longer than {MAX_LINE_BYTES} bytes")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise InduceKVError(f"{path}:{n}: not valid JSON ({e.__class__.__name__}: {e})") from None
            yield _example(obj, path, n, require_answer)


def load_task(path: str | Path, require_answer: bool = True) -> list[Example]:
    examples = list(iter_task(path, require_answer))
    if not examples:
        raise InduceKVError(f"task file {path} has no examples")
    return examples


def _example(obj, path: Path, n: int, require_answer: bool) -> Example:
    where = f"{path}:{n}"
    if not isinstance(obj, dict):
        raise InduceKVError(f"{where}: each line must be a JSON object with a \"prompt\"")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InduceKVError(f"{where}: \"prompt\" must be a non-empty string")
    if "answers" in obj:
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise InduceKVError(f"{where}: \"answers\" must be a non-empty list of non-empty strings")
    elif "answer" in obj:
        if not isinstance(obj["answer"], str) or not obj["answer"].strip():
            raise InduceKVError(f"{where}: \"answer\" must be a non-empty string")
        answers = [obj["answer"]]
    elif require_answer:
        raise InduceKVError(f"{where}: missing \"answer\" (or \"answers\": [...])")
    else:
        answers = []
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise InduceKVError(f"{where}: \"image\" must be a path string")
        image = (path.parent / image)
        if not image.is_file():
            raise InduceKVError(f"{where}: image {image} does not exist")
    return Example(prompt, tuple(answers), image, n)
