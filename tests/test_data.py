"""Training data: formats, normalization, and the generic assistant-only loss mask."""

import json

import pytest

from eagle3.training.data import fit_length, iter_records, read_conversations, tokenize_conversation


def test_truncated_json_array_is_read_record_by_record(tmp_path):
    path = tmp_path / "sharegpt.json"
    good = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    path.write_text("[" + json.dumps(good) + ", " + json.dumps(good) + ', {"id": "b", "conversa')
    assert len(list(iter_records(path))) == 2


def test_formats_roles_and_skips(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "chatgpt", "value": "a"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        {"instruction": "do", "input": "x", "response": "done"},
        {"question": "1+1?", "answer": "2"},
        {"conversations": [{"from": "gpt", "value": "lead"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "alien", "value": "q"}]},
        {"conversations": [{"from": "human", "value": "q"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}]},
        {"nothing": 1},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    conversations, stats = read_conversations([path])
    assert len(conversations) == 5 and stats.read == 10
    assert stats.skipped == {"unknown role": 1, "no assistant answer": 1, "roles do not alternate": 1,
                             "unknown format": 1, "malformed JSON": 1}
    assert conversations[0] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert conversations[2][0]["content"] == "do\n\nx"
    assert conversations[4][0]["role"] == "user"  # the leading assistant turn is dropped
    with pytest.raises(FileNotFoundError):
        read_conversations([tmp_path / "missing.json"])


def test_shared_training_sets_parse():
    from eagle3.paths import shared_path

    for name in ("fastchat_dummy_conversation.json", "gpteacher_codegen.json", "gsm8k_train.jsonl"):
        conversations, stats = read_conversations([shared_path(f"data/train/{name}")], limit=50)
        assert len(conversations) == 50, (name, stats)


@pytest.mark.slow
def test_loss_mask_covers_exactly_the_assistant_turns(smollm2):
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}]
    ex = tokenize_conversation(tok, messages)
    trained = tok.decode(ex.input_ids[ex.loss_mask.bool()])
    assert "Blue, like the sea." in trained and "Green." in trained
    assert "Name a colour" not in trained and "Another" not in trained and "user" not in trained
    assert trained.count("<|im_end|>") == 2  # each answer's end-of-turn marker is predicted too
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(messages, tokenize=False)
    short = fit_length(ex, 10)
    assert len(short.input_ids) == 10 and fit_length(ex, 10, truncate=False) is None
