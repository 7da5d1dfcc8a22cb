"""The model card every run writes (README.md) and --push_to_hub: what the card tells a user, that its diffusers lines
really load the embedding, and that the upload gets the right folder, repository and files. Only the two network
calls (creating the repository, uploading) are replaced."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import train_hypernetwork as thn
import train_textual_inversion as tti
from tools import hub as hub_tool
from utils import hub
from utils.embeddings import load_embedding

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "examples" / "sample_images"
TOKEN = "hf_secret_value_for_tests_0123456789"


def _ti(model, out, *extra):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(SAMPLES), "--output_dir", str(out),
            "--placeholder_token", "red-ball", "--initializer_token", "ball", "--num_vectors", "2", "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2", "--save_every", "2",
            "--preview_every", "2", "--preview_steps", "2", "--num_preview_images", "2", *map(str, extra)]


class FakeHub:
    """Stands in for the Hub's two network calls and records them."""

    def __init__(self, monkeypatch, owner="tester", fail=None):
        import huggingface_hub

        self.created, self.uploads, self.owner, self.fail = [], [], owner, fail
        # Plain functions, so that they bind to the HfApi instance like the methods they replace.
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda api, *a, **kw: self.create_repo(api, *a, **kw))
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda api, **kw: self.upload_folder(api, **kw))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def create_repo(self, api, repo_id, **kw):
        from huggingface_hub import RepoUrl

        self.created.append({"repo_id": repo_id, "token": api.token, **kw})
        full = repo_id if "/" in repo_id else f"{self.owner}/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, api, **kw):
        if self.fail:
            raise self.fail
        folder = Path(kw["folder_path"])
        from huggingface_hub.utils import filter_repo_objects

        every = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        kw["files"] = sorted(filter_repo_objects(every, allow_patterns=kw.get("allow_patterns"),
                                                 ignore_patterns=kw.get("ignore_patterns")))
        kw["token"] = api.token
        self.uploads.append(kw)


def _card(out: Path) -> str:
    return (out / "README.md").read_text(encoding="utf-8")


def _python_block(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)


def test_card_tells_a_user_everything_and_its_diffusers_lines_load_the_embedding(tiny_sd1, tmp_path):
    out = tmp_path / "o"
    assert tti.main(_ti(tiny_sd1, out, "--report_to", "wandb")) == 0
    card = _card(out)
    settings = json.loads((out / "training_settings.json").read_text())

    assert "Trigger word: **`red-ball`**, 2 vector(s)." in card
    assert f"**{settings['model_name']}** (A1111 hash `{settings['model_hash']}`)" in card and settings["model_hash"]
    assert "put `red-ball.pt` in `stable-diffusion-webui/embeddings/`" in card
    assert "put `red-ball.safetensors` in `ComfyUI/models/embeddings/` and write `embedding:red-ball`" in card
    assert [f"![red-ball-4-{k}](./images/red-ball-4-{k}.png)" for k in (0, 1)] == \
        [line for line in card.splitlines() if line.startswith("![")]  # the final previews, not step 2's
    assert all((out / "images" / f"red-ball-4-{k}.png").is_file() for k in (0, 1))
    assert "| steps | 4 (of 4) |" in card and "| vectors per token | 2 |" in card
    assert "| batch | 2 = 2 per process x 1 accumulation x 1 process(es) |" in card
    assert "| resolution | 64 x 64 |" in card and "| initialization text | `ball` |" in card
    run_dir = next((out / "wandb").glob("offline-run-*"))
    assert f"Training run: W&B run `{run_dir.name.rsplit('-', 1)[1]}` (offline" in card
    assert "base_model:" not in card  # a local model is not a Hub id; its path is not published either
    assert str(tiny_sd1.parent) not in card

    # The card's diffusers lines, run as written (local paths for the placeholders, CPU instead of CUDA).
    code = (_python_block(card).replace(f"path/to/{tiny_sd1.name}", str(tiny_sd1))
            .replace("path/to/this/folder", str(out)).replace("torch.float16", "torch.float32")
            .replace('.to("cuda")', "").replace('pipe("a photo of <red-ball>")', 'pipe("a photo of <red-ball>", '
                                                   'num_inference_steps=1, height=64, width=64)'))
    scope: dict = {}
    exec(compile(code, "card", "exec"), scope)
    pipe = scope["pipe"]
    ids = pipe.tokenizer.convert_tokens_to_ids(["<red-ball>", "<red-ball>_1"])
    trained = load_embedding(out / "red-ball.pt").vectors
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight.detach()[ids], trained)
    assert pipe.maybe_convert_prompt("a photo of <red-ball>", pipe.tokenizer) == "a photo of <red-ball> <red-ball>_1"


def test_push_uploads_the_final_files_to_the_named_repo(tiny_sd1, tmp_path, monkeypatch, capsys):
    fake = FakeHub(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "o"
    assert tti.main(_ti(tiny_sd1, out, "--push_to_hub", "--hub_model_id", "my-red-ball", "--hub_token", TOKEN)) == 0

    assert [(c["repo_id"], c["token"], c["exist_ok"]) for c in fake.created] == [("my-red-ball", TOKEN, True)]
    (up,) = fake.uploads
    assert Path(up["folder_path"]) == out and up["repo_id"] == "tester/my-red-ball" and up["token"] == TOKEN
    assert up["files"] == sorted([
        "README.md", "red-ball.pt", "red-ball.safetensors", "learned_embeds.safetensors", "training_settings.json",
        "textual_inversion_loss.csv", "images/red-ball-4-0.png", "images/red-ball-4-1.png"])
    card = _card(out)
    assert 'pipe.load_textual_inversion("tester/my-red-ball", weight_name="learned_embeds.safetensors", ' \
           'token="<red-ball>")' in card
    assert "Published: https://huggingface.co/tester/my-red-ball" in capsys.readouterr().out
    # The token goes to the Hub client and nowhere else.
    assert not [p for p in out.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]


def test_push_takes_hf_token_and_defaults_the_repo_to_the_folder_name(tiny_sd1, tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch, owner="someone")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "textual_inversion_cat"
    assert tti.main(_ti(tiny_sd1, out, "--push_to_hub", "--no_previews")) == 0
    assert fake.created[0]["repo_id"] == "textual_inversion_cat" and fake.created[0]["token"] is None
    (up,) = fake.uploads
    assert up["repo_id"] == "someone/textual_inversion_cat" and not any(f.startswith("images/") for f in up["files"])
    assert "## Samples" not in _card(out)


@pytest.mark.parametrize("env, message", [
    ({"HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN}, "HF_HUB_OFFLINE is set"),
    ({"HF_HOME": "/nonexistent-hf-home"}, "needs a Hugging Face token"),
])
def test_push_that_cannot_work_stops_before_training(tiny_sd1, tmp_path, monkeypatch, env, message):
    from utils.errors import UserError

    for k in ("HF_TOKEN", "HF_HUB_OFFLINE", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: env.get("HF_TOKEN"))
    with pytest.raises(UserError, match=message):
        tti.main(_ti(tiny_sd1, tmp_path / "o", "--push_to_hub"))
    assert not (tmp_path / "o").exists()  # nothing ran


def test_failed_upload_keeps_everything_and_says_how_to_publish_later(tiny_sd1, tmp_path, monkeypatch):
    from utils.errors import UserError

    FakeHub(monkeypatch, fail=ConnectionError("no route to host"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "o"
    with pytest.raises(UserError) as e:
        tti.main(_ti(tiny_sd1, out, "--push_to_hub", "--hub_model_id", "me/x", "--no_previews"))
    assert "no route to host" in str(e.value) and f"python -m tools.hub {out} --hub_model_id me/x" in str(e.value)
    assert (out / "red-ball.pt").is_file() and (out / "README.md").is_file()

    # ... which then works from a machine with network.
    fake = FakeHub(monkeypatch)
    assert hub_tool.main([str(out), "--hub_model_id", "me/x"]) == 0
    assert fake.uploads[0]["repo_id"] == "me/x" and "red-ball.pt" in fake.uploads[0]["files"]


def test_hypernetwork_card(tiny_sd1, tmp_path):
    out = tmp_path / "h"
    assert thn.main(["--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(SAMPLES),
                     "--output_dir", str(out), "--hypernetwork_name", "my-style", "--resolution", "64",
                     "--max_train_steps", "2", "--preview_every", "0", "--preview_steps", "1",
                     "--layer_structure", "1, 2, 1", "--activation_func", "relu"]) == 0
    card = _card(out)
    assert "A hypernetwork for Stable Diffusion 1.x, trained for 2 steps" in card
    assert "put `my-style.pt` in `stable-diffusion-webui/models/hypernetworks/` and add `<hypernet:my-style:1>`" in card
    assert "*HypernetworkLoader* node" in card and "![my-style-2-0](./images/my-style-2-0.png)" in card
    assert "| layer structure | 1, 2, 1 |" in card and "| activation | relu |" in card
    assert "- `my-style.pt`" in card and "- `my-style.safetensors`" in card


def test_card_of_a_hub_model_and_sdxl_lines(tmp_path):
    """Unit level: metadata names a Hub base model; SDXL gets the two-encoder diffusers lines and its one-file name."""
    info = hub.CardInfo(kind="embedding", name="x", family="sdxl", base_model="stabilityai/stable-diffusion-xl-base-1.0",
                        base_model_on_hub=True, base_model_name="sdxl", base_model_hash="0123456789", step=10,
                        files=["x.safetensors"], repo_id="me/x")
    card = hub.model_card(info)
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in card and "- stable-diffusion-xl" in card
    assert "put `x.safetensors` in `stable-diffusion-webui/embeddings/`" in card
    assert 'weight_name="learned_embeds_2.safetensors", token="<x>",' in card and "tokenizer=pipe.tokenizer_2)" in card
    assert 'StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0"' in card


def test_a_readme_we_did_not_write_is_kept(tmp_path, capsys):
    (tmp_path / "README.md").write_text("my own notes", encoding="utf-8")
    info = hub.CardInfo(kind="embedding", name="x", family="sd1", base_model="m", base_model_on_hub=False,
                        base_model_name="m", base_model_hash=None, step=1, files=[])
    assert hub.write_model_card(tmp_path, info) is None
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == "my own notes"
    assert "not written by Embedforge" in capsys.readouterr().err
    (tmp_path / "README.md").unlink()
    assert hub.write_model_card(tmp_path, info) == tmp_path / "README.md"
    assert hub.write_model_card(tmp_path, info) == tmp_path / "README.md"  # ours: rewritten


def test_card_lists_the_final_files(tiny_sd1, tmp_path):
    """The card's 'Files' are the final files in the folder, not the periodic copies or checkpoints."""
    out = tmp_path / "o"
    assert tti.main(_ti(tiny_sd1, out, "--no_previews")) == 0
    files = re.findall(r"^- `(.+)`$", _card(out), flags=re.M)
    assert files == ["red-ball.pt", "red-ball.safetensors", "learned_embeds.safetensors"]
