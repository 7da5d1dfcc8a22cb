from utils.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, build_clip_tokenizer


def test_real_clip_ids():
    tok = build_clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok("a photo of a tree").input_ids == [49406, 320, 1125, 539, 320, 2677, 49407]
    assert tok("*").input_ids[1] == 265  # the id A1111 writes in string_to_token


def test_padding_styles():
    sd1 = build_clip_tokenizer()
    assert sd1("a", padding="max_length", max_length=6).input_ids == [BOS_ID, 320, EOS_ID, EOS_ID, EOS_ID, EOS_ID]
    sd2 = build_clip_tokenizer(open_clip_padding=True)
    assert sd2("a", padding="max_length", max_length=6).input_ids == [BOS_ID, 320, EOS_ID, 0, 0, 0]
    assert sd1.model_max_length == 77
