"""The demo teacher: trained (not random) on the digits, saved in timm's folder format, loadable by the pipeline."""
import json
import os

import torch

from repa.preprocess.demo_teacher import (INFO_FILE, TeacherRecipe, digits_images, ensure_teacher, evaluate_folder,
                                     split_halves)

# a toy recipe at 32 px (patch 8: a 16 px input, 2x2 grid) that learns in 40 steps
TINY = TeacherRecipe(resolution=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, steps=40, batch_size=64,
                     learning_rate=3e-3)


def test_default_recipe_grid_equals_the_demo_student_grid():
    """R=64, patch 2: an 8 px input (the digits' own resolution) and 4x4 tokens, the grid of SiT-/2 on the
    demo autoencoder's 8x8 latent (64 / 8 / 2 = 4)."""
    from repa.preprocess.teachers import teacher_input_size
    r = TeacherRecipe()
    assert (r.resolution, r.patch_size) == (64, 2)
    assert teacher_input_size(r.patch_size, r.resolution) == 8 and r.resolution // 16 == 64 // 8 // 2 == 4


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
    assert info["token_grid"] == [2, 2] and info["input_size"] == 16 and info["num_classes"] == 10

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


def test_source_images_reads_an_image_folder(tmp_path):
    """Any repa-preprocess source: an image folder (class = subfolder) through the same reader and crop."""
    from PIL import Image

    from repa.preprocess.demo_teacher import source_images
    for c, name in enumerate(["cats", "dogs"]):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 20), (40 * i + 100 * c, 0, 255)).save(tmp_path / name / f"{i}.png")
    x, y, k = source_images(f"imagefolder:{tmp_path}", 16)
    assert k == 2 and y.tolist() == [0, 0, 0, 1, 1, 1] and x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8
    assert x[4, 0].unique().tolist() == [140] and x[4, 2].unique().tolist() == [255]  # dogs/1.png: (140, 0, 255)


def test_demo_vae_saves_loads_and_scales(tmp_path):
    """The demo autoencoder: a diffusers AutoencoderKL folder that repa-preprocess --vae DIR loads, 8x down,
    with the per-channel latent statistics in its config (so the stored latents are scaled to unit std)."""
    from repa.preprocess.demo_teacher import VAERecipe, ensure_vae
    from repa.preprocess.vae import load_vae
    recipe = VAERecipe(resolution=16, steps=3, crop=16, batch_size=4)
    old = os.umask(0o022)
    try:
        path = ensure_vae(str(tmp_path), recipe, log=None)
    finally:
        os.umask(old)
    assert os.path.basename(path) == f"demo-vae-{recipe.key()}"
    assert os.stat(path).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    with open(os.path.join(path, "demo_vae.json")) as f:
        info = json.load(f)
    assert info["latent_shape"] == [4, 2, 2] and info["psnr_db"] > 0
    vae = load_vae(path)
    assert vae.downsample == 8 and vae.latent_channels == 4
    images, _ = digits_images(16)
    x = images[:64].float() / 127.5 - 1
    m = vae.encode_moments(x)
    assert m.shape == (64, 8, 2, 2)
    z = m[:, :4] * torch.tensor(vae.scale).view(1, 4, 1, 1) + torch.tensor(vae.bias).view(1, 4, 1, 1)
    # scale/bias come from the statistics of all 1,797 digits; 64 of them are close to mean 0, std 1
    assert z.mean().abs() < 0.5 and 0.5 < z.std() < 1.5
    assert ensure_vae(str(tmp_path), recipe, log=None) == path  # reused
