"""Task files: valid lines parse; each bad line names its line number."""
from __future__ import annotations

import pytest

from inducekv.core.errors import InduceKVError
from inducekv.runtime.tasks import MAX_LINE_BYTES, load_task


def write(tmp_path, text, name="t.jsonl"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_file(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    p = write(tmp_path, '{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answers": ["d", "e"], "image": "img/a.png"}\n')
    ex = load_task(p)
    assert [(e.prompt, e.answers, e.line) for e in ex] == [("a", ("b",), 1), ("c", ("d", "e"), 3)]
    assert ex[1].image == tmp_path / "img" / "a.png"


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a"', "t.jsonl:2: not valid JSON"),
    ('["a"]', "t.jsonl:2: each line must be a JSON object"),
    ('{"prompt": ""}', "t.jsonl:2: \"prompt\" must be"),
    ('{"prompt": "a"}', "t.jsonl:2: missing \"answer\""),
    ('{"prompt": "a", "answers": []}', "t.jsonl:2: \"answers\" must be"),
    ('{"prompt": "a", "answer": 3}', "t.jsonl:2: \"answer\" must be"),
    ('{"prompt": "a", "answer": "b", "image": "nope.png"}', "t.jsonl:2: image"),
])
def test_bad_lines_name_their_line(tmp_path, line, words):
    p = write(tmp_path, '{"prompt": "ok", "answer": "fine"}\n' + line + "\n")
    with pytest.raises(InduceKVError) as e:
        load_task(p)
    assert words in str(e.value)


def test_queries_without_answers_are_allowed_for_run(tmp_path):
    assert load_task(write(tmp_path, '{"prompt": "a"}\n'), require_answer=False)[0].answers == ()


def test_overlong_line_and_empty_file(tmp_path):
    with pytest.raises(InduceKVError, match="longer than"):
        load_task(write(tmp_path, '{"prompt": "' + "x" * MAX_LINE_BYTES + '"}\n'))
    with pytest.raises(InduceKVError, match="no examples"):
        load_task(write(tmp_path, "\n\n", name="empty.jsonl"))
