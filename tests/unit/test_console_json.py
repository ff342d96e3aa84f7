"""``mailspool list --json`` streams its array; the text must be what json.dumps of the whole list gives."""

import io
import json

import pytest

from mailspool.console import write_json_array

DOCUMENTS = [
    {"queue_id": "1.M1P1Q1Rab.host", "recipients": ["a@example.org", "zoë@example.org"], "size": 10,
     "last_reply": "451 4.3.0 try later\nsecond line", "problem": None, "nested": {"k": [1, {"x": []}]}},
    {"queue_id": "2", "recipients": [], "attempts": 0, "text": "quote \" and backslash \\"},
]


@pytest.mark.parametrize("count", [0, 1, 2])
def test_the_streamed_array_is_the_whole_list_dumped_at_once(count):
    out = io.StringIO()

    write_json_array(iter(DOCUMENTS[:count]), out.write)

    assert out.getvalue() == json.dumps(DOCUMENTS[:count], indent=1, ensure_ascii=False) + "\n"
    assert json.loads(out.getvalue()) == DOCUMENTS[:count]
