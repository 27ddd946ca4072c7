"""ADM center crop (docs/reference.md §5.1) and RGB conversion of odd image modes."""
import numpy as np
import pytest
from PIL import Image

from repa.preprocess.crop import adm_center_crop, check_resolution, load_rgb, to_rgb


def _reference_crop(img: Image.Image, S: int) -> np.ndarray:
    """docs/reference.md §5.1 written out step by step (PIL crop box instead of array slicing)."""
    img = img.convert("RGB")
    W, H = img.size
    while min(W, H) >= 2 * S:
        W, H = W // 2, H // 2
        img = img.resize((W, H), resample=Image.BOX)
    scale = S / min(W, H)
    W, H = round(W * scale), round(H * scale)
    img = img.resize((W, H), resample=Image.BICUBIC)
    top, left = (H - S) // 2, (W - S) // 2
    return np.asarray(img.crop((left, top, left + S, top + S)))


def _random_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("w,h,S", [(500, 375, 256), (1000, 600, 256), (70, 64, 48), (37, 100, 16),
                                   (2048, 2048, 512), (16, 16, 16), (300, 17, 32)])
def test_adm_crop_matches_reference(w, h, S):
    img = _random_image(w, h, seed=w * h)
    out = adm_center_crop(img, S)
    assert out.shape == (S, S, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, _reference_crop(img, S))


def test_adm_crop_resize_sequence(monkeypatch):
    """BOX halving while min side >= 2S, then BICUBIC to banker's-rounded size."""
    calls = []
    orig = Image.Image.resize

    def spy(self, size, resample=None, *a, **k):
        calls.append((tuple(size), resample))
        return orig(self, size, resample, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    adm_center_crop(_random_image(1000, 600), 256)
    # 600 >= 512 -> halve once to 500x300; scale 256/300: 500*0.8533 = 426.67 -> 427
    assert calls == [((500, 300), Image.BOX), ((427, 256), Image.BICUBIC)]
    calls.clear()
    adm_center_crop(_random_image(70, 64), 48)
    # 70 * 48/64 = 52.5 exactly: Python round() is banker's -> 52 (round-half-up would give 53)
    assert calls == [((52, 48), Image.BICUBIC)]
    calls.clear()
    adm_center_crop(_random_image(2100, 4400), 256)
    # min side 2100 -> 1050 -> 525 -> 262 (each step had min >= 512); 262 < 512 stops
    assert calls[:3] == [((1050, 2200), Image.BOX), ((525, 1100), Image.BOX), ((262, 550), Image.BOX)]
    assert calls[3] == ((256, round(550 * 256 / 262)), Image.BICUBIC)


def test_crop_offsets_are_floor_centered():
    # a 20x16 image with a unique value per column: S=16 keeps columns (20-16)//2 = 2 .. 17
    arr = np.zeros((16, 20, 3), np.uint8)
    arr[:, :, 0] = np.arange(20, dtype=np.uint8)[None, :] * 10
    out = adm_center_crop(Image.fromarray(arr), 16)  # scale 1: bicubic at identical size is the identity
    np.testing.assert_array_equal(out[0, :, 0], np.arange(2, 18) * 10)


def test_check_resolution():
    assert check_resolution(256) == 256 and check_resolution(16) == 16
    for bad in (0, 100, 250, -16):
        with pytest.raises(ValueError, match="--res"):
            check_resolution(bad)


def test_mode_conversions(tmp_path):
    g = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    # L: grey repeated to three channels
    rgb = np.asarray(to_rgb(Image.fromarray(g, "L")))
    assert rgb.shape == (16, 16, 3) and (rgb == g[..., None]).all()
    # RGBA: alpha dropped, colour kept (reference .convert('RGB'))
    rgba = np.dstack([g, 255 - g, g // 2, np.full_like(g, 7)])
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))), rgba[..., :3])
    # P with a transparent palette entry: colours come from the palette
    p = Image.new("P", (4, 4))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    out = np.asarray(to_rgb(p))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (200, 100, 50)
    # CMYK: PIL's conversion (C=255 -> no red)
    cmyk = Image.new("CMYK", (2, 2), (255, 0, 0, 0))
    assert tuple(np.asarray(to_rgb(cmyk))[0, 0]) == (0, 255, 255)
    # 16-bit grey: scaled by 1/257 (not clipped at 255 as PIL's convert would)
    v = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(v).save(path)
    out = np.asarray(load_rgb(path))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, round(1000 / 257)])
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_transpose(tmp_path):
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[0, 0] = 255  # top-left marker
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rot.png"
    img.save(path, exif=exif)
    out = np.asarray(load_rgb(path))
    assert out.shape == (20, 10, 3)
    assert out[0, -1, 0] == 255  # the top-left pixel ends up top-right
    assert np.asarray(load_rgb(path, exif_transpose=False)).shape == (10, 20, 3)


@pytest.mark.parametrize("w,h,S", [(1000, 600, 256), (70, 64, 48), (2100, 4400, 256), (1, 1, 16), (300, 17, 32),
                                   (1, 2000, 64), (513, 1025, 256)])
def test_adm_resize_size_is_the_crops_resize(w, h, S, monkeypatch):
    """The size limit is checked on arithmetic, before any pixels: it must be the size the crop really makes."""
    from repa.preprocess.crop import adm_resize_size
    calls = []
    orig = Image.Image.resize

    def spy(self, size, resample=None, *a, **k):
        calls.append(tuple(size))
        return orig(self, size, resample, *a, **k)

    monkeypatch.setattr(Image.Image, "resize", spy)
    adm_center_crop(Image.new("RGB", (w, h)), S)
    assert calls[-1] == adm_resize_size((w, h), S)


def test_size_limits(monkeypatch):
    from repa.preprocess.crop import ImageLimits, ImageTooLargeError, check_image_size
    lim = ImageLimits(max_side=100, max_pixels=5000, max_resized_pixels=64 * 3200)
    check_image_size((100, 50), lim)                           # at the limits: admitted
    check_image_size((1, 50), lim, res=64)                     # resized to 64 x 3200: at the limit, admitted
    with pytest.raises(ImageTooLargeError, match=r"x\.png: image of 101 x 2 px \(side 101\) is over the limit "
                                                 r"REPA_MAX_IMAGE_SIDE=100 .* REPA_MAX_IMAGE_SIDE=200 "):
        check_image_size((101, 2), lim, name="x.png")
    with pytest.raises(ImageTooLargeError, match=r"image of 100 x 51 px \(5100 px\) .* REPA_MAX_IMAGE_PIXELS=5000"):
        check_image_size((100, 51), lim)
    with pytest.raises(ImageTooLargeError, match=r"resizes to 64 x 3200 px \(204800 px\), is over the limit "
                                                 r"REPA_MAX_RESIZED_PIXELS=12800"):
        check_image_size((1, 50), ImageLimits(max_resized_pixels=12800), res=64)
    # the crop itself refuses before resizing (image given as pixels: no header to check)
    with pytest.raises(ImageTooLargeError, match="REPA_MAX_RESIZED_PIXELS=12800"):
        adm_center_crop(Image.new("RGB", (1, 50)), 64, ImageLimits(max_resized_pixels=12800))
    monkeypatch.setenv("REPA_MAX_RESIZED_PIXELS", "12800")
    with pytest.raises(ImageTooLargeError, match="REPA_MAX_RESIZED_PIXELS=12800"):
        adm_center_crop(Image.new("RGB", (1, 50)), 64)
    assert ImageLimits.from_env().max_resized_pixels == 12800 and ImageLimits.from_env().max_side == 65535
    monkeypatch.setenv("REPA_MAX_IMAGE_SIDE", "-3")
    with pytest.raises(ValueError, match="REPA_MAX_IMAGE_SIDE='-3': expected a positive integer"):
        ImageLimits.from_env()
