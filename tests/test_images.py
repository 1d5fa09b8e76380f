"""Input discovery and image decoding on real photographs (scikit-image) and deliberately broken files."""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from mdsd3_cli.util.images import (
    ImageError,
    LoadedImage,
    Source,
    discover_sources,
    iter_loaded,
    load_image,
    unsafe_key_reason,
)

from .helpers import png_header


def save(path: Path, pixels: np.ndarray, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **options)
    return path


def keys(discovery) -> list[str]:
    return [source.key for source in discovery.sources]


# --- discovery -----------------------------------------------------------------------------------------


def test_folder_keys_are_relative_sorted_and_skip_hidden_and_non_images(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    save(root / "b.jpg", data.astronaut())
    save(root / "a.PNG", data.coffee())
    save(root / "sub" / "deeper" / "c.v2.jpeg", data.chelsea())
    save(root / ".hidden.jpg", data.rocket())
    save(root / ".cache" / "d.jpg", data.rocket())
    (root / "notes.txt").write_text("not a list input here")
    (root / "weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")

    found = discover_sources([root])
    assert keys(found) == ["a", "b", "sub/deeper/c.v2"]
    assert found.sources[0] == Source("a", root / "a.PNG")
    assert found.errors == []
    assert keys(discover_sources([root], recursive=False)) == ["a", "b"]


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    save(tmp_path / "photos" / "x.png", data.coffee())
    assert discover_sources(["photos"], base_dir=tmp_path).sources == [Source("x", tmp_path / "photos" / "x.png")]


def test_glob_keys_are_relative_to_the_folder_before_the_first_wildcard(tmp_path: Path) -> None:
    save(tmp_path / "photos" / "2021" / "one.jpg", data.astronaut())
    save(tmp_path / "photos" / "2021" / "deep" / "two.jpg", data.coffee())
    save(tmp_path / "photos" / "three.png", data.chelsea())
    save(tmp_path / "photos" / ".trash" / "four.jpg", data.rocket())

    assert keys(discover_sources(["photos/**/*.jpg"], base_dir=tmp_path)) == ["2021/deep/two", "2021/one"]
    assert keys(discover_sources([tmp_path / "photos" / "*.png"])) == ["three"]
    assert keys(discover_sources([tmp_path / "photos" / "*"])) == ["three"]  # folders are not files


def test_list_file_lines_resolve_against_its_folder(tmp_path: Path) -> None:
    save(tmp_path / "lists" / "imgs" / "a.jpg", data.astronaut())
    outside = save(tmp_path / "elsewhere" / "b.png", data.coffee())
    listing = tmp_path / "lists" / "train.txt"
    listing.write_text(f"# training split\n\nimgs/a.jpg\n  {outside}  \nimgs/missing.jpg\n")

    found = discover_sources([listing])
    assert [(s.key, s.path) for s in found.sources] == [
        ("b", outside),
        ("imgs/a", tmp_path / "lists" / "imgs" / "a.jpg"),
        ("imgs/missing", tmp_path / "lists" / "imgs" / "missing.jpg"),
    ]
    with pytest.raises(ImageError, match="cannot read file"):  # a listed file that is gone fails at decoding
        load_image(found.sources[2].path, 64, "center_crop")


def test_several_roots_prefix_keys_with_the_root_folder_name(tmp_path: Path) -> None:
    save(tmp_path / "div2k" / "0001.png", data.astronaut())
    save(tmp_path / "flickr" / "0001.png", data.coffee())
    found = discover_sources([tmp_path / "div2k", tmp_path / "flickr" / "*.png"])
    assert keys(found) == ["div2k/0001", "flickr/0001"]


def test_two_roots_with_the_same_folder_name_are_a_fatal_error(tmp_path: Path) -> None:
    save(tmp_path / "a" / "photos" / "x.png", data.astronaut())
    save(tmp_path / "b" / "photos" / "y.png", data.coffee())
    found = discover_sources([tmp_path / "a" / "photos", tmp_path / "b" / "photos"])
    assert keys(found) == ["photos/x"]
    [error] = found.errors
    assert error.fatal and "same folder name" in error.reason and str(tmp_path / "b" / "photos") in error.path


def test_same_root_given_twice_shares_a_prefix_and_same_file_counts_once(tmp_path: Path) -> None:
    save(tmp_path / "photos" / "x.png", data.astronaut())
    save(tmp_path / "photos" / "y.jpg", data.coffee())
    found = discover_sources([tmp_path / "photos" / "*.png", tmp_path / "photos"])
    assert keys(found) == ["photos/x", "photos/y"] and found.errors == []


def test_duplicate_keys_drop_both_files(tmp_path: Path) -> None:
    first = save(tmp_path / "photos" / "a.jpg", data.astronaut())
    second = save(tmp_path / "photos" / "a.png", data.coffee())
    save(tmp_path / "photos" / "b.png", data.chelsea())
    found = discover_sources([tmp_path / "photos"])
    assert keys(found) == ["b"]
    assert sorted(error.path for error in found.errors) == [str(first), str(second)]
    assert all(e.reason.startswith("duplicate key") and e.key == "a" and not e.fatal for e in found.errors)


def test_missing_inputs_and_empty_matches_are_fatal(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    found = discover_sources(["nope", "empty", "empty/*.jpg", "gone.txt"], base_dir=tmp_path)
    assert found.sources == []
    assert [(e.path, e.fatal) for e in found.errors] == [
        ("nope", True),
        ("empty", True),
        (str(tmp_path / "empty" / "*.jpg"), True),
        ("gone.txt", True),
    ]
    assert "does not exist" in found.errors[0].reason and "no image files" in found.errors[1].reason


def test_unsafe_file_names_are_dropped_with_a_reason(tmp_path: Path) -> None:
    save(tmp_path / "photos" / "bad\nname.png", data.astronaut())
    save(tmp_path / "photos" / "good.png", data.coffee())
    found = discover_sources([tmp_path / "photos"])
    assert keys(found) == ["good"]
    [error] = found.errors
    assert error.reason == "control character in key" and not error.fatal


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "empty key"),
        ("/etc/passwd", "absolute key"),
        ("../up", "'..'"),
        ("a//b", "empty"),
        ("a/./b", "'.'"),
        ("tab\there", "control character"),
        ("x" * 201, "longer than 200 bytes"),
        ("bad\udcff", "not valid UTF-8"),
    ],
)
def test_unsafe_key_reason(key: str, problem: str) -> None:
    assert problem in (unsafe_key_reason(key) or "")


def test_safe_keys_pass() -> None:
    assert unsafe_key_reason("div2k/sub/0001.x2") is None and unsafe_key_reason("фото/снимок") is None


def test_symlinks_keep_the_listed_key_and_read_the_target(tmp_path: Path) -> None:
    target = save(tmp_path / "store" / "real_name.png", data.coffee())
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "alias.png").symlink_to(target)
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")  # a cycle must not hang discovery
    found = discover_sources([tmp_path / "photos"])
    assert found.sources == [Source("alias", tmp_path / "photos" / "alias.png")]
    assert load_image(found.sources[0].path, 64, "center_crop").original_size == (600, 400)


# --- decoding and resize policies -----------------------------------------------------------------------


def test_center_crop_scales_the_short_side_then_crops_the_middle(tmp_path: Path) -> None:
    path = save(tmp_path / "coffee.png", data.coffee())  # 600 x 400
    loaded = load_image(path, 128, "center_crop")
    assert loaded.pixels.shape == (128, 128, 3) and loaded.pixels.dtype == np.uint8
    assert loaded.pixels.flags["C_CONTIGUOUS"]
    assert loaded.crop_box == (100, 0, 500, 400) and loaded.original_size == (600, 400)
    reference = np.asarray(Image.fromarray(data.coffee()).crop(loaded.crop_box).resize((128, 128), Image.LANCZOS))
    assert np.abs(loaded.pixels.astype(int) - reference).mean() < 2


def test_resize_policy_squashes_the_whole_image(tmp_path: Path) -> None:
    loaded = load_image(save(tmp_path / "rocket.png", data.rocket()), 64, "resize")
    assert loaded.pixels.shape == (64, 64, 3) and loaded.crop_box == (0, 0, 640, 427)


def test_native_keeps_resolution_cropped_to_multiples_of_16(tmp_path: Path) -> None:
    path = save(tmp_path / "rocket.png", data.rocket())  # 640 x 427
    loaded = load_image(path, 512, "native")
    assert loaded.crop_box == (0, 5, 640, 421) and loaded.pixels.shape == (416, 640, 3)
    np.testing.assert_array_equal(loaded.pixels, data.rocket()[5:421])
    with pytest.raises(ImageError, match=r"larger than max_side 512 \(native\)"):
        load_image(path, 512, "native", max_side=512)


def test_upscales_small_images(tmp_path: Path) -> None:
    small = data.chelsea()[:40, :60]
    assert load_image(save(tmp_path / "small.png", small), 256, "center_crop").pixels.shape == (256, 256, 3)


def test_loading_is_deterministic(tmp_path: Path) -> None:
    path = save(tmp_path / "chelsea.jpg", data.chelsea(), quality=90)
    first, second = load_image(path, 96, "center_crop"), load_image(path, 96, "center_crop")
    assert first.pixels.tobytes() == second.pixels.tobytes()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    path = save(tmp_path / "rotated.png", data.chelsea(), exif=exif)  # stored 451 x 300
    loaded = load_image(path, 64, "native")
    upright = np.rot90(data.chelsea(), k=-1)  # 300 wide, 451 high
    assert loaded.original_size == (300, 451) and loaded.crop_box == (6, 1, 294, 449)
    np.testing.assert_array_equal(loaded.pixels, upright[1:449, 6:294])


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    loaded = load_image(save(tmp_path / "camera.png", data.camera()), 64, "native")
    for channel in range(3):
        np.testing.assert_array_equal(loaded.pixels[..., channel], data.camera())


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    logo = data.logo()  # RGBA 500 x 500 with transparent background
    loaded = load_image(save(tmp_path / "logo.png", logo), 64, "native")
    source = logo[2:498, 2:498].astype(float)
    alpha = source[..., 3:] / 255
    expected = np.rint(source[..., :3] * alpha + 255 * (1 - alpha))
    assert np.abs(loaded.pixels - expected).max() <= 1
    assert (loaded.pixels[source[..., 3] == 0] == 255).all()


def test_gray_with_alpha_and_palette_with_transparency(tmp_path: Path) -> None:
    gray = data.camera()
    alpha = np.where(np.arange(512)[None, :] < 256, 0, 255).astype(np.uint8).repeat(512, axis=0)
    la = Image.fromarray(np.dstack([gray, alpha]), "LA")
    la.save(tmp_path / "la.png")
    loaded = load_image(tmp_path / "la.png", 64, "native")
    assert (loaded.pixels[:, :256] == 255).all()
    np.testing.assert_array_equal(loaded.pixels[:, 256:, 0], gray[:, 256:])

    palette = Image.fromarray(data.astronaut()).quantize(16)
    transparent_index = int(np.asarray(palette)[0, 0])
    palette.save(tmp_path / "p.png", transparency=transparent_index)
    loaded = load_image(tmp_path / "p.png", 64, "native")
    assert (loaded.pixels[np.asarray(palette) == transparent_index] == 255).all()


def test_sixteen_bit_int_and_float_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    camera = data.camera()
    Image.fromarray(camera.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(camera.astype(np.int32) * 257).save(tmp_path / "int.tif")
    Image.fromarray(camera.astype(np.int32)).save(tmp_path / "small_int.tif")
    Image.fromarray(camera.astype(np.float32) / 255).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    for name in ("deep.png", "int.tif", "small_int.tif", "float.tif"):
        np.testing.assert_array_equal(load_image(tmp_path / name, 64, "native").pixels[..., 1], camera, err_msg=name)


def test_cmyk_and_bilevel(tmp_path: Path) -> None:
    Image.fromarray(data.astronaut()).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    loaded = load_image(tmp_path / "cmyk.jpg", 64, "native")
    assert np.abs(loaded.pixels.astype(int) - data.astronaut()).mean() < 3

    Image.fromarray(data.horse()).save(tmp_path / "horse.png")  # mode "1"
    assert set(np.unique(load_image(tmp_path / "horse.png", 64, "native").pixels)) == {0, 255}


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"hello, I am not a photo\n" * 10, "not an image"),
        ("cut.png", png_header(64, 64), "truncated or corrupt image"),
        ("tiny.png", png_header(1, 1), "too small: 1x1, need at least 16x16"),
        ("bomb.png", png_header(20000, 20000), "decompression bomb guard: 400 MP exceeds max_pixels (89 MP)"),
        ("big.png", png_header(10000, 10000), "decompression bomb guard: 10000x10000 = 100 MP exceeds max_pixels"),
    ],
    ids=["empty", "not-image", "truncated", "too-small", "bomb", "big"],
)
def test_bad_files_raise_image_error_with_a_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape either
        with pytest.raises(ImageError) as caught:
            load_image(path, 64, "center_crop")
    assert reason in caught.value.reason and isinstance(caught.value, ValueError)


def test_truncated_jpeg_fails_when_decoded(tmp_path: Path) -> None:
    whole = save(tmp_path / "whole.jpg", data.astronaut()).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        load_image(tmp_path / "cut.jpg", 64, "center_crop")


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path) -> None:
    path = save(tmp_path / "astronaut.png", data.astronaut())
    with pytest.raises(ImageError, match=r"512x512 = 0 MP exceeds max_pixels"):
        load_image(path, 64, "center_crop", max_pixels=100_000)


def test_bomb_between_pillow_limits_emits_no_warning(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(png_header(10000, 10000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError):
            load_image(tmp_path / "big.png", 64, "center_crop")
    assert [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)] == []


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read file"):
        load_image(tmp_path / "gone.png", 64, "center_crop")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path, 64, "center_crop")


# --- background loading --------------------------------------------------------------------------------


def test_iter_loaded_keeps_input_order_and_yields_errors_as_values(tmp_path: Path) -> None:
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    paths = [save(tmp_path / f"{index}.png", pixels) for index, pixels in enumerate(photos)]
    (tmp_path / "broken.png").write_bytes(b"broken")
    items = [*paths[:2], tmp_path / "broken.png", *paths[2:]]

    results = list(iter_loaded(items, lambda path: load_image(path, 32, "center_crop"), workers=3, prefetch=2))
    assert [item for item, _ in results] == items
    assert isinstance(results[2][1], ImageError)
    assert [r.original_size for _, r in results if isinstance(r, LoadedImage)] == [
        (512, 512),
        (600, 400),
        (451, 300),
        (640, 427),
    ]


def test_iter_loaded_bounds_prefetch_and_stops_early() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def slow_load(index: int) -> LoadedImage:
        with lock:
            started.append(index)
        time.sleep(0.02)
        return LoadedImage(np.zeros((16, 16, 3), np.uint8), (0, 0, 16, 16), (16, 16))

    stream = iter_loaded(range(1000), slow_load, workers=2, prefetch=3)
    assert next(stream)[0] == 0
    time.sleep(0.2)
    assert len(started) <= 1 + 3  # the item being consumed + at most `prefetch` ahead
    begin = time.monotonic()
    stream.close()
    assert time.monotonic() - begin < 1
    assert len(started) < 10


def test_iter_loaded_propagates_unexpected_errors() -> None:
    def broken_load(index: int) -> LoadedImage:
        raise RuntimeError(f"bug at {index}")

    with pytest.raises(RuntimeError, match="bug at 0"):
        list(iter_loaded(range(5), broken_load, workers=2, prefetch=2))
