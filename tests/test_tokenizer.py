import pytest
from open_clip.tokenizer import SimpleTokenizer

from studio.tokenizer import build_clip_tokenizer

TEXTS = ["a red circle", "A photo of a Striped blue square, on the left!", "crimson   star and azure box",
         "naïve café 123 ✨", "<|startoftext|> not special here"]


@pytest.mark.parametrize("text", TEXTS)
def test_same_ids_as_clip_reference_tokenizer(text):
    ref = SimpleTokenizer()
    ids = build_clip_tokenizer()(text).input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    if "<|" not in text:
        assert ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id]


def test_vocabulary_is_clips():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok.convert_ids_to_tokens(736) == "red</w>"
