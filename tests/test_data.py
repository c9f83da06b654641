"""Preference data reading: every accepted format, malformed-line reporting, deterministic split."""

import json

import pytest

from service.data import MalformedLine, demo_data_path, read_pairs, split_by_prompt
from tests.helpers import write_jsonl


def test_explicit_prompt_format(tmp_path):
    pairs, report = read_pairs(write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "Human: hi\n\nAssistant:", "chosen": "Hello!", "rejected": "Go away.", "margin": 1.5}]))
    assert report.n_pairs == 1 and not report.problems
    assert pairs[0].prompt == "Human: hi\n\nAssistant:" and pairs[0].chosen == "Hello!"
    assert pairs[0].rejected == "Go away." and pairs[0].margin == 1.5


def test_implicit_prompt_splits_at_last_assistant_turn(tmp_path):
    shared = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    pairs, _ = read_pairs(write_jsonl(tmp_path / "a.jsonl", [
        {"chosen": shared + " good answer", "rejected": shared + " bad answer"}]))
    assert pairs[0].prompt == shared
    assert (pairs[0].chosen, pairs[0].rejected) == ("good answer", "bad answer")


def test_chat_message_lists(tmp_path):
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    pairs, report = read_pairs(write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]},
        {"chosen": prompt + [{"role": "assistant", "content": "four"}],
         "rejected": prompt + [{"role": "assistant", "content": "five"}]},
    ]))
    assert report.n_pairs == 2
    assert pairs[0].prompt == "Human: What is 2+2?\n\nAssistant:" and pairs[0].chosen == "4"
    assert pairs[1].prompt == pairs[0].prompt and (pairs[1].chosen, pairs[1].rejected) == ("four", "five")


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ('["a list"]', "not a JSON object"),
    ('{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
    ('{"prompt": "p", "chosen": "", "rejected": "r"}', "empty"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "must both be strings"),
    ('{"chosen": "no turn marker", "rejected": "x"}', "Assistant"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"}', "margin"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": [{"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "assistant", "content": "b"}]}', "unknown role"),
]


def test_malformed_lines_are_reported_with_line_number_and_reason(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good] + [line for line, _ in BAD_LINES] + [good]) + "\n")
    pairs, report = read_pairs(path)
    assert report.n_pairs == 2 and len(pairs) == 2
    assert [n for n, _ in report.problems] == list(range(2, 2 + len(BAD_LINES)))
    for (_, reason), (_, expected) in zip(report.problems, BAD_LINES):
        assert expected in reason
    assert "8 malformed skipped" in report.summary()


def test_strict_mode_fails_on_first_malformed_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{oops\n')
    with pytest.raises(MalformedLine) as err:
        read_pairs(path, strict=True)
    assert err.value.line_no == 2 and str(path) in str(err.value)


def test_split_by_prompt_is_deterministic_and_keeps_prompts_together():
    pairs, _ = read_pairs(demo_data_path())
    train_a, dev_a = split_by_prompt(pairs, 0.2)
    train_b, dev_b = split_by_prompt(list(reversed(pairs)), 0.2)
    assert {id(p) for p in dev_a} == {id(p) for p in dev_b}
    assert not {p.prompt for p in train_a} & {p.prompt for p in dev_a}
    assert 0.05 < len(dev_a) / len(pairs) < 0.4


def test_demo_set_ships_with_the_package():
    pairs, report = read_pairs(demo_data_path(), strict=True)
    assert len(pairs) >= 200 and not report.problems
