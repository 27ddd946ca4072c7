"""The demo teacher: trained (not random) on the digits, saved in timm's folder format, loadable by the pipeline."""
import json
import os

import torch

from repa.preprocess.demo_teacher import (INFO_FILE, TeacherRecipe, digits_images, ensure_teacher, evaluate_folder,
                                     split_halves)

TINY = TeacherRecipe(embed_dim=32, depth=2, num_heads=2, steps=40, batch_size=64, learning_rate=3e-3)


def test_split_halves_disjoint_and_seeded():
    a, b = split_halves(1797, 1234)
    assert len(a) == 898 and len(b) == 899
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == 1797
    a2, _ = split_halves(1797, 1234)
    assert torch.equal(a, a2)


def test_digits_images_match_the_source_scaling():
    x, y = digits_images(32)
    assert x.shape == (1797, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey repeated to RGB
    assert y.tolist()[:10] == list(range(10))  # scikit-learn's order: 0, 1, ..., 9, ...
    assert int(x.max()) == 255 and int(x.min()) == 0


def test_teacher_learns_saves_and_loads(tmp_path):
    path = ensure_teacher(str(tmp_path), TINY, log=None)
    assert os.path.basename(path) == f"demo-teacher-{TINY.key()}"
    assert sorted(f for f in os.listdir(path)) == ["config.json", INFO_FILE, "model.safetensors"]
    with open(os.path.join(path, INFO_FILE)) as f:
        info = json.load(f)
    # 10 classes: chance is 0.1; even this 40-step toy recipe is far above it on the held-out half
    assert info["heldout_accuracy"] > 0.5, info
    assert info["token_grid"] == [2, 2] and info["input_size"] == 16

    # the numbers are those of the saved folder, re-loaded through timm's local-dir path
    images, labels = digits_images(32)
    _, held = split_halves(len(images), TINY.split_seed)
    assert abs(evaluate_folder(path, images[held], labels[held], 32) - info["heldout_accuracy"]) < 1e-9

    # and the pipeline's loader (repa-preprocess --enc-type timm:local-dir:PATH) reads it: 2x2 tokens of dim 32
    from repa.preprocess.teachers import load_teacher
    teacher = load_teacher(f"timm:local-dir:{path}", 32)
    feats = teacher(images[:5])
    assert feats.shape == (5, 4, 32) and torch.isfinite(feats).all()
    assert teacher.num_prefix_tokens == 0 and tuple(teacher.input_size) == (16, 16)
    # frozen pretrained features differ between different digits (not a constant or random-init map)
    assert (feats[0] - feats[1]).abs().mean() > 1e-3

    # a second call reuses the cached folder
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    assert ensure_teacher(str(tmp_path), TINY, log=None) == path
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime
