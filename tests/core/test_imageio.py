"""Reading collections: formats, names, and hostile input refused with a clear error."""
import io
import re
import struct
import tarfile
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from models.imageio import InputError, LoadLimits, decode_image, load_collection, working_size


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def _img(seed=0, shape=(12, 10)):
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


def test_folder_with_formats_names_and_skips(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(_img(0)).save(tmp_path / "a.png")
    Image.fromarray(_img(1)).save(tmp_path / "sub" / "b.bmp")
    Image.fromarray(_img(2)).save(tmp_path / "c.tif")
    Image.fromarray(np.stack([_img(3)] * 3, -1)).save(tmp_path / "d.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    col = load_collection(tmp_path)
    assert col.names == ["a.png", "c.tif", "d.jpg", "sub/b.bmp"]
    assert np.array_equal(col.images[0], _img(0))
    assert col.images[2].ndim == 2  # a JPEG of equal channels is stored as grayscale
    assert set(col.skipped) == {"notes.txt", ".DS_Store"}


def test_zip_tar_and_npy_round_trip(tmp_path):
    ims = [_img(i) for i in range(3)]
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as z:
        for i, a in enumerate(ims):
            z.writestr(f"d/{i}.png", _png(a))
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as t:
        for i, a in enumerate(ims):
            data = _png(a)
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    np.save(tmp_path / "x.npy", np.stack(ims))
    for name, expect_names in (("x.zip", ["d/0.png", "d/1.png", "d/2.png"]),
                               ("x.tar.gz", ["0.png", "1.png", "2.png"]),
                               ("x.npy", ["000000.png", "000001.png", "000002.png"])):
        col = load_collection(tmp_path / name)
        assert col.names == expect_names
        for a, b in zip(col.images, ims):
            assert np.array_equal(a, b)


def test_rgb_and_alpha_and_16bit(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 200
    rgba = np.dstack([rgb, np.full((4, 4), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray((np.arange(16).reshape(4, 4) * 4000).astype(np.uint16)).save(tmp_path / "b.png")
    col = load_collection(tmp_path)
    assert col.images[0].shape == (4, 4, 3) and abs(int(col.images[0][0, 0, 0]) - 100) <= 1
    assert col.images[1].dtype == np.uint8 and col.images[1].max() > 200
    assert col.channels == 3


@pytest.mark.parametrize("data,match", [
    (b"", "empty file"),
    (b"this is text, not an image", "not a readable image"),
    (_png(_img())[:60], "corrupt or truncated|not a readable"),
])
def test_bad_images_name_the_file(data, match):
    with pytest.raises(InputError, match=match) as e:
        decode_image(data, "bad.png")
    assert str(e.value).startswith("bad.png:")


def _png_header_only(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_from_header():
    with pytest.raises(InputError, match="too large to decode safely|above the limit"):
        decode_image(_png_header_only(100_000, 100_000), "bomb.png")
    with pytest.raises(InputError, match="above the limit"):
        decode_image(_png_header_only(5000, 5000), "big.png", LoadLimits(max_pixels=1_000_000))


def test_zip_bomb_and_unsafe_paths(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", b"\0" * (50 * 1024**2))
    with pytest.raises(InputError, match="zip bomb"):
        load_collection(bomb)
    for evil in ("../evil.png", "/abs/evil.png"):
        p = tmp_path / "evil.zip"
        with zipfile.ZipFile(p, "w") as z:
            z.writestr(evil, _png(_img()))
        with pytest.raises(InputError, match="absolute path|escapes"):
            load_collection(p)


def test_tar_links_and_traversal_refused(tmp_path):
    p = tmp_path / "link.tar"
    with tarfile.open(p, "w") as t:
        info = tarfile.TarInfo("a.png")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        t.addfile(info)
    with pytest.raises(InputError, match="link"):
        load_collection(p)
    p = tmp_path / "dots.tar"
    with tarfile.open(p, "w") as t:
        data = _png(_img())
        info = tarfile.TarInfo("../../x.png")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="escapes"):
        load_collection(p)


def test_empty_and_missing_inputs(tmp_path):
    with pytest.raises(InputError, match="no images found"):
        load_collection(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        load_collection(tmp_path / "nope")
    with zipfile.ZipFile(tmp_path / "e.zip", "w"):
        pass
    with pytest.raises(InputError, match="no images found"):
        load_collection(tmp_path / "e.zip")
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(InputError, match="not a readable zip"):
        load_collection(tmp_path / "broken.zip")


def test_npy_refuses_objects_and_bad_shapes(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a plain numeric"):
        load_collection(tmp_path / "o.npy")
    np.save(tmp_path / "s.npy", np.zeros((3, 4)))
    with pytest.raises(InputError, match="shape"):
        load_collection(tmp_path / "s.npy")


def test_working_size_rule():
    assert working_size([(28, 28)] * 3) == (28, 28)
    assert working_size([(250, 250), (240, 260), (260, 250)], max_side=128) == (128, 128)
    assert working_size([(100, 200)], max_side=50) == (25, 50)
    assert working_size([(3, 3)]) == (8, 8)


def test_limits_raise_the_limit_subclass_and_scan_keeps_no_pixels(tmp_path):
    from models.imageio import LimitExceeded, scan_collection

    for i in range(3):
        Image.fromarray(_img(i)).save(tmp_path / f"{i}.png")
    assert scan_collection(tmp_path) == [("0.png", (12, 10)), ("1.png", (12, 10)), ("2.png", (12, 10))]
    with pytest.raises(LimitExceeded, match="more than 2 images"):
        scan_collection(tmp_path, LoadLimits(max_images=2))
    with pytest.raises(LimitExceeded):
        decode_image(_png_header_only(5000, 5000), "big.png", LoadLimits(max_pixels=1_000_000))
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(InputError, match="bad.png") as e:
        scan_collection(tmp_path)
    assert not isinstance(e.value, LimitExceeded)


def test_allowed_formats_are_checked_by_content_not_name(tmp_path):
    b = io.BytesIO()
    Image.fromarray(_img()).save(b, format="TIFF")
    with pytest.raises(InputError, match="format TIFF is not accepted; use PNG"):
        decode_image(b.getvalue(), "looks_like.png", LoadLimits(allowed_formats=("PNG",)))
    p = tmp_path / "a.zip"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.png", b.getvalue())
    with pytest.raises(InputError, match="x.png: format TIFF"):
        load_collection(p, LoadLimits(allowed_formats=("PNG",)))
    assert load_collection(p).names == ["x.png"]


def _tar_bytes(members, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_duplicate_image_names_are_refused_naming_them(tmp_path):
    # Two members under one name would become one output file: one image silently lost.
    a, b = _png(_img(0)), _png(_img(1))
    z = tmp_path / "d.zip"
    with zipfile.ZipFile(z, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("x/a.png", a)
        zf.writestr("x/a.png", b)
    (tmp_path / "d.tar").write_bytes(_tar_bytes([("x/a.png", a), ("y.png", a), ("x\\a.png", b)]))
    (tmp_path / "d.tar.xz").write_bytes(_tar_bytes([("./a.png", a), ("a.png", b)], "w:xz"))
    folder = tmp_path / "folder"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "a.png").write_bytes(a)
    (folder / "x\\a.png").write_bytes(b)  # a plain file name on Linux; 'x/a.png' once read as a path
    for src, named in ((z, "x/a.png"), (tmp_path / "d.tar", "x\\a.png"), (tmp_path / "d.tar.xz", "a.png"),
                       (folder, "x\\a.png")):
        with pytest.raises(InputError, match=re.escape(repr(named))) as e:
            load_collection(src)
        assert "unique" in str(e.value)


@pytest.mark.parametrize("mode", ["gz", "bz2", "xz"])
def test_compressed_tar_bombs_are_refused_while_reading(tmp_path, mode):
    import tracemalloc

    from models.imageio import LimitExceeded

    member = 40_000_000
    p = tmp_path / f"b.tar.{mode}"
    p.write_bytes(_tar_bytes([("a.png", _png(_img(0))), ("bomb.png", b"\0" * member)], f"w:{mode}"))
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded, match="'bomb.png' expands"):
            load_collection(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < member / 2, peak  # refused early in the member, not after reading it whole
    ok = tmp_path / f"ok.tar.{mode}"  # incompressible data is never taken for a bomb
    noise = np.random.default_rng(0).integers(0, 255, (1200, 1000), dtype=np.uint8)
    ok.write_bytes(_tar_bytes([("a.png", _png(noise)), ("b.png", _png(noise[::-1]))], f"w:{mode}"))
    assert len(load_collection(ok)) == 2


def test_an_npz_named_npy_is_an_input_error(tmp_path):
    p = tmp_path / "arr.npy"
    with open(p, "wb") as f:
        np.savez(f, a=np.zeros((3, 28, 28), "u1"))
    with pytest.raises(InputError, match="arr.npy"):
        load_collection(p)
