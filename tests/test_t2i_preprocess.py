"""Captioned sources and the CLIP text stage, with a tiny random-weight CLIPTextModel built here."""
import json
import os
import string
import types

import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("transformers")

from repa.preprocess.captions import (COCOSource, CaptionsFolderSource, TextStage, open_text_stage,  # noqa: E402
                                      CAPTIONS_FILE, EMPTY_CONTEXT_FILE)
from repa.preprocess.hub import ModelDownloadError  # noqa: E402
from repa.preprocess.sources import SourceError  # noqa: E402
from repa.preprocess.text_encoder import TextEncoderError, load_text_encoder  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 30, 220)}
SHAPES = ("circle", "square")


def make_tiny_clip(folder: str, hidden: int = 32) -> str:
    """A CLIPTextModel (1 layer, random weights, seed 0) + a letter-level CLIPTokenizer, save_pretrained-style."""
    from transformers import CLIPTextConfig, CLIPTextModel
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    vocab["re"], vocab["red</w>"] = len(vocab), len(vocab) + 1  # one real merge: "red" is one token
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\nr e\nre d</w>\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77}, f)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModel(cfg).save_pretrained(folder)
    return folder


def shape_image(colour: str, shape: str, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def shape_items(n: int):
    """n (file stem, captions) pairs: 'a red circle' etc.; item i has 1 + i % 3 captions."""
    items = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
        caps = [f"a {colour} {shape}", f"{shape} {colour}", f"one {colour} {shape}"][: 1 + i % 3]
        items.append((f"img{i:03d}", colour, shape, caps))
    return items


def make_captions_folder(root: str, n: int = 6) -> str:
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    with open(os.path.join(root, "captions.jsonl"), "w") as f:
        for stem, colour, shape, caps in shape_items(n):
            rel = f"sub/{stem}.png" if int(stem[3:]) % 2 else f"{stem}.png"
            shape_image(colour, shape).save(os.path.join(root, rel))
            f.write(json.dumps({"file": rel, "captions": caps}) + "\n")
    return root


def make_coco(root: str, n: int = 5, split: str = "train2014") -> str:
    os.makedirs(os.path.join(root, split))
    os.makedirs(os.path.join(root, "annotations"))
    images, anns = [], []
    for i, (stem, colour, shape, caps) in enumerate(shape_items(n)):
        image_id = 100 - 7 * i  # ids in decreasing file order: the records must follow the ids
        shape_image(colour, shape).save(os.path.join(root, split, f"{stem}.jpg"))
        images.append({"id": image_id, "file_name": f"{stem}.jpg"})
        anns += [{"id": 1000 + len(anns), "image_id": image_id, "caption": c + " "} for c in caps]
    with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
        json.dump({"images": images, "annotations": anns}, f)
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(str(tmp_path_factory.mktemp("clip") / "tiny-clip"))


def test_text_encoder_is_uvit_frozen_clip(tiny_clip):
    enc = load_text_encoder(tiny_clip)
    out = enc.encode(["a red circle", ""])
    assert out.shape == (2, 77, 32) and out.dtype == torch.float32
    v = enc.tokenizer.get_vocab()
    ids = [0, v["a</w>"], v["red</w>"], v["c"], v["i"], v["r"], v["c"], v["l"], v["e</w>"]]
    ids = torch.tensor([ids + [1] * (77 - len(ids)), [0] + [1] * 76])  # bos, tokens, eos padded to 77
    with torch.no_grad():
        want = enc.model(input_ids=ids).last_hidden_state  # input_ids only: no attention mask
        masked = enc.model(input_ids=ids, attention_mask=(torch.arange(77) < 10).long().expand(2, 77)).last_hidden_state
    assert torch.equal(out, want)
    assert not torch.allclose(out[0, 20:], masked[0, 20:])  # the padding positions are encoded unmasked
    prov = enc.provenance
    assert (prov["max_length"], prov["hidden_size"], prov["attention_mask"]) == (77, 32, False)
    assert prov["weights_sha256"] == load_text_encoder(tiny_clip).weights_sha256()


def test_text_encoder_errors(tmp_path):
    with pytest.raises(TextEncoderError, match="no such folder"):
        load_text_encoder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderError, match="cannot load a CLIPTextModel"):
        load_text_encoder(str(tmp_path / "empty"))
    with pytest.raises(ModelDownloadError) as e:  # HF_HUB_OFFLINE=1 (conftest) and not cached
        load_text_encoder("clip-vit-L")
    msg = str(e.value)
    assert "openai/clip-vit-large-patch14" in msg and "HF_HUB_OFFLINE" in msg and "--text-encoder /path" in msg


def test_captions_folder_source(tmp_path):
    src = CaptionsFolderSource(make_captions_folder(str(tmp_path / "set")), "captions:set")
    assert src.files == ["img000.png", "img002.png", "img004.png", "sub/img001.png", "sub/img003.png",
                         "sub/img005.png"]
    assert src.captions(3) == ["a green circle", "circle green"]  # img001
    img, label, name = src.decode(src.get(0))
    assert img.size == (32, 32) and label == 0 and name.endswith("img000.png")
    assert img.getpixel((16, 16)) == COLOURS["red"]


def test_captions_folder_errors(tmp_path):
    root = make_captions_folder(str(tmp_path / "set"), n=3)
    index = os.path.join(root, "captions.jsonl")
    lines = open(index).read().splitlines()
    cases = [
        (lines + [lines[0]], "is listed twice"),
        (lines + ["not json"], r"captions.jsonl:4 is not a"),
        (lines + [json.dumps({"file": "gone.png", "captions": ["x"]})], r"1 captioned image\(s\).*'gone.png'"),
        (lines[:2], r"1 image\(s\) in .* have no captions .*img002.png"),
        (lines[:2] + [json.dumps({"file": "img002.png", "captions": []})], "no caption strings"),
    ]
    for content, match in cases:
        with open(index, "w") as f:
            f.write("\n".join(content) + "\n")
        with pytest.raises(SourceError, match=match):
            CaptionsFolderSource(root, "captions:set")
    os.remove(index)
    with pytest.raises(SourceError, match="captions.jsonl not found"):
        CaptionsFolderSource(root, "captions:set")


def test_coco_source_order_split_and_errors(tmp_path):
    root = make_coco(str(tmp_path / "coco"))
    src = COCOSource(root, "coco:x", split="train")  # "train" finds captions_train2014.json
    assert src.split == "train2014" and src.image_ids == [72, 79, 86, 93, 100]
    assert src.files[0] == "img004.jpg" and src.captions(0) == ["a green square", "square green"]
    with pytest.raises(SourceError, match=r"captions_val2014.json not found \(found: \['train2014'\]\)"):
        COCOSource(root, "coco:x", split="val2014")
    ann_path = os.path.join(root, "annotations", "captions_train2014.json")
    ann = json.load(open(ann_path))
    os.remove(os.path.join(root, "train2014", "img001.jpg"))
    with pytest.raises(SourceError, match=r"not in .*train2014 \(e.g. 'img001.jpg'\)"):
        COCOSource(root, "coco:x", split="train2014")
    shape_image("red", "circle").save(os.path.join(root, "train2014", "img001.jpg"))
    shape_image("red", "circle").save(os.path.join(root, "train2014", "extra.jpg"))
    with pytest.raises(SourceError, match=r"have no captions .*'extra.jpg'"):
        COCOSource(root, "coco:x", split="train2014")
    os.remove(os.path.join(root, "train2014", "extra.jpg"))
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 93]
    json.dump(ann, open(ann_path, "w"))
    with pytest.raises(SourceError, match="gives image 'img001.jpg' no caption strings"):
        COCOSource(root, "coco:x", split="train2014")


def test_text_stage_slots_counts_and_sidecars(tmp_path, tiny_clip):
    root = make_captions_folder(str(tmp_path / "set"), n=3)
    opts = types.SimpleNamespace(source=f"captions:{root}", split="train", image_column=None, caption_column=None,
                                 text_encoder=tiny_clip, max_captions=2)
    stage = open_text_stage(opts)
    stage.load("cpu")
    arrays = stage([1, 0, 2])  # keys follow the sorted files: img002 (3 captions), img000 (1), sub/img001 (2)
    assert arrays["num_captions"].tolist() == [2, 1, 2]
    enc = stage.encoder.encode(["a blue circle", "circle blue", "a red circle", ""])
    assert torch.equal(arrays["text.0"][0], enc[0]) and torch.equal(arrays["text.1"][0], enc[1])
    assert torch.equal(arrays["text.0"][1], enc[2]) and torch.equal(arrays["text.1"][1], enc[3])  # unused = ""
    assert set(stage.fields("bf16")) == {"text.0", "text.1", "num_captions"}
    prov = stage.finalize(str(tmp_path / "out"))
    side = json.load(open(tmp_path / "out" / CAPTIONS_FILE))
    assert side["captions"]["1"] == ["a blue circle", "circle blue", "one blue circle"]  # all kept
    assert (prov["captions_total"], prov["captions_truncated"], prov["max_captions"]) == (6, 1, 2)
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(tmp_path / "out" / EMPTY_CONTEXT_FILE))["empty_context"], enc[3])
    assert oct(os.stat(tmp_path / "out" / CAPTIONS_FILE).st_mode & 0o777) == oct(0o666 & ~_umask())


def test_text_options_on_a_class_source_are_refused():
    opts = types.SimpleNamespace(source="digits", caption_column=None, text_encoder="clip-vit-L", max_captions=None)
    with pytest.raises(SourceError, match="need a captioned source"):
        open_text_stage(opts)
    assert open_text_stage(types.SimpleNamespace(source="digits")) is None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_captions_folder_with_a_symlink_loop_and_a_fifo(tmp_path):
    """The captioned walk is the image-folder walk: a loop (``sub/up -> ..``) repeats no image; a FIFO named
    like a captioned image is refused naming it, never opened for a blocking read."""
    root = make_captions_folder(str(tmp_path / "set"))
    os.symlink("..", os.path.join(root, "sub", "up"))
    src = CaptionsFolderSource(root, "captions:set")
    assert len(src) == 6 and len(set(src.paths)) == 6  # the loop added nothing (before: the check saw repeats)
    os.remove(os.path.join(root, "img002.png"))
    os.mkfifo(os.path.join(root, "img002.png"))
    src = CaptionsFolderSource(root, "captions:set")
    with pytest.raises(SourceError, match="img002.png"):
        src.decode(src.get(1))
