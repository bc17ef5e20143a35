"""Sources read any accepted input in index order, a chunk at a time, in bounded memory."""
import io
import tarfile
import tracemalloc

import numpy as np
import pytest

from models.imageio import InputError, LimitExceeded, LoadLimits, load_collection, scan_collection
from models.sources import ArchiveShardsSource, ArraySource, CollectionSource, open_source


def _digits(n, h=9, w=7, seed=0):
    return (np.random.default_rng(seed).random((n, h, w)) * 255).astype(np.uint8)


def test_a_folder_of_array_shards_reads_as_one_collection_in_shard_order(tmp_path):
    a = _digits(10)
    d = tmp_path / "shards"
    (d / "sub").mkdir(parents=True)
    np.save(d / "s0.npy", a[:4])
    np.save(d / "sub" / "s1.npy", a[4:7].astype(np.float32) / 255)  # floats in 0-1
    np.savez(d / "s2.npz", x=a[7:9], y=np.moveaxis(np.stack([a[9:10]] * 3, -1), -1, 1))  # NCHW colour
    src = open_source(d)
    assert isinstance(src, ArraySource) and src.n == 10 and src.channels == 3 and src.uniform_size == (9, 7)
    # Sorted by path: s0.npy, s2.npz (its members in name order), sub/s1.npy.
    assert src.names() == ([f"s0/{i:06d}.png" for i in range(4)] + ["s2/x/000000.png", "s2/x/000001.png",
                           "s2/y/000000.png"] + [f"sub/s1/{i:06d}.png" for i in range(3)])
    x = src.read(0, 10)  # grey shards repeated to 3 channels beside a colour one
    assert x.shape == (10, 9, 7, 3) and (x[..., 0] == x[..., 2]).all()
    assert (x[:4, ..., 0] == a[:4]).all() and (x[4:6, ..., 0] == a[7:9]).all() and (x[6] == a[9][..., None]).all()
    assert np.abs(x[7:10, ..., 0].astype(int) - a[4:7]).max() == 0  # 0-1 floats scaled back exactly
    # Chunks straddling shard boundaries give the same images.
    again = np.concatenate([c for _, c in src.chunks(3)])
    assert (again == x).all()
    assert [(n, s) for n, s in scan_collection(d)][:1] == [("s0/000000.png", (9, 7, 3))]


def test_array_inputs_that_cannot_be_used_are_named(tmp_path):
    np.savez(tmp_path / "z.npz", a=_digits(3))
    (tmp_path / "z.npz").rename(tmp_path / "z.npy")
    with pytest.raises(InputError, match="z.npy: this is an .npz archive"):
        open_source(tmp_path / "z.npy")
    bad = _digits(3).astype(np.float32)
    bad[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(InputError, match="NaN"):
        open_source(tmp_path / "nan.npy")
    np.save(tmp_path / "short.npy", _digits(50))
    raw = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(raw[:-100])
    with pytest.raises(InputError, match="shorter than its header"):
        open_source(tmp_path / "short.npy")
    d = tmp_path / "mixed"
    d.mkdir()
    np.save(d / "a.npy", _digits(2, 9, 7))
    np.save(d / "b.npy", _digits(2, 8, 8))
    with pytest.raises(InputError, match="different sizes"):
        open_source(d)
    np.save(tmp_path / "three.npy", _digits(3))
    with pytest.raises(LimitExceeded, match="3 images, above the limit of 2"):
        open_source(tmp_path / "three.npy", LoadLimits(max_images=2))


def test_reading_a_large_array_holds_one_chunk_not_the_array(tmp_path):
    n = 64 * 1024  # 64k images of 32x32: 64 MiB on disk
    mm = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32))
    mm[:] = 7
    mm.flush()
    del mm
    src = open_source(tmp_path / "big.npy")
    tracemalloc.start()
    total = 0
    for _, c in src.chunks(2048):  # 2 MiB a chunk
        total += int(c[:, 0, 0].sum())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert total == 7 * n
    assert peak < 8 * 1024**2, peak  # a few chunks at most, never the 64 MiB array


def _tar(path, members):
    from PIL import Image

    with tarfile.open(path, "w") as tf:
        for name, arr in members:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)


def test_archive_shards_are_read_one_shard_at_a_time_under_their_stems(tmp_path):
    a = _digits(7)
    d = tmp_path / "tars"
    d.mkdir()
    _tar(d / "part-0.tar", [(f"img{i}.png", a[i]) for i in range(4)])
    _tar(d / "part-1.tar", [(f"img{i}.png", a[i]) for i in range(4, 7)])
    src = open_source(d)
    assert isinstance(src, ArchiveShardsSource) and src.n == 7 and src.channels == 1
    assert src.names() == [f"part-0/img{i}.png" for i in range(4)] + [f"part-1/img{i}.png" for i in range(4, 7)]
    got = [im for _, ims in src.chunks(3) for im in ims]
    assert all((g == a[i]).all() for i, g in enumerate(got))
    assert src._cache[0] == 1  # one shard decoded at a time


def test_image_folders_and_single_arrays_read_as_before(tmp_path, tiny_folder):
    d, _ = tiny_folder
    src = open_source(d)
    assert isinstance(src, CollectionSource) and src.names() == load_collection(d).names
    np.save(tmp_path / "one.npy", _digits(5))
    src = open_source(tmp_path / "one.npy")
    assert src.names() == [f"{i:06d}.png" for i in range(5)] and (src.read(0, 5) == _digits(5)).all()
