import torch

from utils.tiny_models import FAMILIES, build_pipeline, tiny_model_path


def test_build_is_seeded():
    a = build_pipeline("sd1", seed=0)
    b = build_pipeline("sd1", seed=0)
    c = build_pipeline("sd1", seed=1)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, part).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), part
    # (its speed, ~1 s on 2 idle cores, is not asserted: a timed assertion fails on a loaded machine)


def test_families_have_the_promised_widths(tiny_sd1, tiny_sd1_768, tiny_sd2):
    from transformers import CLIPTextConfig

    widths = {p: CLIPTextConfig.from_pretrained(p, subfolder="text_encoder").hidden_size
              for p in (tiny_sd1, tiny_sd1_768, tiny_sd2)}
    assert list(widths.values()) == [32, 768, 1024]
    assert set(FAMILIES) == {"sd1", "sd1-768", "sd2", "sdxl"}
    assert tiny_model_path("sd1") == tiny_sd1  # cached: the second call reuses the folder


def test_sd2_is_v_prediction_with_open_clip_padding(tiny_sd2):
    import json

    sched = json.loads((tiny_sd2 / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd2, subfolder="tokenizer")
    assert tok("a", padding="max_length", max_length=5).input_ids == [49406, 320, 49407, 0, 0]
