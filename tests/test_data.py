"""Loading FER2013 in every layout, the parse cache, and every kind of bad input."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipeline import data as fer
from tests.conftest import csv_text, make_faces, run_cli


def test_three_layouts_give_identical_arrays(kaggle_csv, kaggle_gz, icml_csv, image_folder, faces):
    images, labels, usage = faces
    by_row = np.lexsort((labels, usage))  # the folder edition comes back sorted by path
    for path in (kaggle_csv, kaggle_gz, icml_csv):
        d = fer.load(path)
        assert d.images.dtype == np.uint8 and d.images.shape == (len(labels), 48, 48)
        np.testing.assert_array_equal(d.images, images)
        np.testing.assert_array_equal(d.labels, labels)
        assert list(d.usage) == list(usage)
    f = fer.load(image_folder)
    order = np.lexsort((f.labels, f.usage))
    np.testing.assert_array_equal(f.images[order], images[by_row])
    np.testing.assert_array_equal(f.labels[order], labels[by_row])
    assert sorted(set(f.usage)) == ["PrivateTest", "PublicTest", "Training"]


def test_parse_handles_all_widths_and_extra_spaces():
    rows = [b" ".join(str(v).encode() for v in np.arange(2304) % 256),
            b"  " + b"  ".join(b"7" for _ in range(2304)) + b" "]
    out = fer.parse_pixels(rows)
    np.testing.assert_array_equal(out[0].ravel(), np.arange(2304) % 256)
    assert (out[1] == 7).all()


def test_cache_hit_skips_parsing(kaggle_csv, monkeypatch):
    first = fer.load(kaggle_csv)
    assert list(fer.cache_dir().glob("*.npz"))

    def boom(*a, **k):
        raise AssertionError("parsed again despite a cache entry")

    monkeypatch.setattr(fer, "_load_csv", boom)
    again = fer.load(kaggle_csv)
    np.testing.assert_array_equal(again.images, first.images)
    assert again.digest == first.digest


def test_changed_file_is_never_served_stale(kaggle_csv):
    first = fer.load(kaggle_csv)
    images, labels, usage = make_faces(seed=1)
    labels = (labels + 1) % 7
    kaggle_csv.write_text(csv_text(images, labels, usage))
    second = fer.load(kaggle_csv)
    assert second.digest != first.digest
    np.testing.assert_array_equal(second.labels, labels)
    np.testing.assert_array_equal(second.images, images)


@pytest.mark.parametrize("labels", [[7], [-1], [255], "float", "object"])
def test_a_well_formed_cache_entry_with_labels_outside_the_emotions_is_a_miss(kaggle_csv,
                                                                              labels):
    first = fer.load(kaggle_csv)
    (entry,) = fer.cache_dir().glob("*.npz")
    bad = first.labels.copy()
    if labels == "float":
        bad = bad.astype(np.float64) + 0.5
    elif labels == "object":
        bad = bad.astype(str)
    else:
        bad[len(bad) // 2] = labels[0]
    with open(entry, "wb") as fh:  # as another user of a shared FER_CACHE_DIR could write it
        np.savez(fh, images=first.images, labels=bad, usage=first.usage)
    d = fer.load(kaggle_csv)
    assert not d.from_cache
    np.testing.assert_array_equal(d.labels, first.labels)
    assert fer.load(kaggle_csv).from_cache  # rewritten from the source


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated", "flip_header",
                                    "flip_images", "flip_directory"])
def test_damaged_cache_is_a_miss_and_is_rewritten(kaggle_csv, damage):
    first = fer.load(kaggle_csv)
    (entry,) = fer.cache_dir().glob("*.npz")
    good = entry.read_bytes()
    raw = bytearray(good)
    if damage == "garbage":
        raw = bytearray(b"not an npz")
    elif damage == "empty":
        raw = bytearray()
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # one bit-flipped byte: in an array header, in the pixel data, in the zip directory
        pos = {"flip_header": 100, "flip_images": len(raw) // 3,
               "flip_directory": bytes(raw).rindex(b"usage.npy")}[damage]
        raw[pos] ^= 0xFF
    entry.write_bytes(bytes(raw))
    d = fer.load(kaggle_csv)
    np.testing.assert_array_equal(d.images, first.images)
    np.testing.assert_array_equal(d.labels, first.labels)
    assert entry.read_bytes() == good, "the damaged entry must be replaced by a good one"


def _row(label="3", pixels=None, usage="Training"):
    pixels = pixels if pixels is not None else " ".join(["128"] * 2304)
    return f"{label},{pixels},{usage}"


GOOD = _row()
BAD_CASES = {
    "short_row": (_row(pixels=" ".join(["1"] * 2303)), ["line 3", "2303 pixel values", "2304"]),
    "non_numeric": (_row(pixels=" ".join(["1"] * 2000 + ["abc"] + ["1"] * 303)),
                    ["line 3", "'abc'", "not an integer"]),
    "out_of_range": (_row(pixels=" ".join(["1"] * 10 + ["256"] + ["1"] * 2293)),
                     ["line 3", "'256'", "0..255"]),
    "negative": (_row(pixels=" ".join(["-4"] + ["1"] * 2303)), ["line 3", "'-4'"]),
    "huge": (_row(pixels=" ".join(["1"] * 5 + ["99999"] + ["1"] * 2298)), ["line 3", "'99999'"]),
    "bad_label": (_row(label="9"), ["line 3", "emotion '9'", "0..6"]),
    "text_label": (_row(label="happy"), ["line 3", "'happy'"]),
    "empty_usage": (_row(usage=""), ["line 3", "empty Usage"]),
    "too_many_fields": (GOOD + ",extra", ["line 3", "4 fields"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_name_file_line_and_value(tmp_path, case):
    row, needles = BAD_CASES[case]
    p = tmp_path / f"{case}.csv"
    p.write_text(f"emotion,pixels,Usage\n{GOOD}\n{row}\n{GOOD}\n")
    with pytest.raises(fer.DataError) as e:
        fer.load(p)
    msg = str(e.value)
    assert str(p) in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not list(fer.cache_dir().glob("*.npz")), "a failed parse must not leave a cache entry"


def test_bad_row_in_a_later_chunk_reports_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fer, "_CHUNK_BYTES", 20_000)  # a few rows per chunk
    rows = [GOOD] * 40 + [_row(label="7")] + [GOOD] * 5
    p = tmp_path / "late.csv"
    p.write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    with pytest.raises(fer.DataError, match="line 42: emotion '7'"):
        fer.load(p)


def test_file_level_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(fer.DataError, match="no such file"):
        fer.load(missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(fer.DataError, match="empty"):
        fer.load(empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("emotion,pixels,Usage\n")
    with pytest.raises(fer.DataError, match="no data rows"):
        fer.load(header_only)
    wrong_header = tmp_path / "wrong.csv"
    wrong_header.write_text("label,image\n3,1 2 3\n")
    with pytest.raises(fer.DataError, match=r"lacks \['emotion', 'pixels'\]"):
        fer.load(wrong_header)
    corrupt = tmp_path / "corrupt.csv.gz"
    whole = gzip.compress(csv_text(*make_faces()).encode())
    corrupt.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(fer.DataError, match="corrupt or truncated gzip"):
        fer.load(corrupt)
    assert not list(fer.cache_dir().glob("*.npz"))


def test_folder_errors(image_folder):
    bad = next((image_folder / "train" / "happy").iterdir())
    bad.write_bytes(b"this is not a png")
    with pytest.raises(fer.DataError) as e:
        fer.load(image_folder)
    assert str(bad) in str(e.value) and "unreadable image" in str(e.value)
    bad.unlink()
    odd = image_folder / "train" / "bored"
    odd.mkdir()
    (image_folder / "train" / "happy" / next(iter(sorted(
        p.name for p in (image_folder / "train" / "happy").iterdir())))).rename(odd / "x.png")
    with pytest.raises(fer.DataError, match="unknown emotion folder 'bored'"):
        fer.load(image_folder)


def test_folder_resizes_and_greys_colour_images(tmp_path):
    from PIL import Image

    d = tmp_path / "imgs" / "train" / "sad"
    d.mkdir(parents=True)
    Image.new("RGB", (96, 96), (200, 10, 10)).save(d / "a.jpg")
    data = fer.load(tmp_path / "imgs")
    assert data.images.shape == (1, 48, 48) and data.labels.tolist() == [4]
    assert data.usage.tolist() == ["Training"]


@pytest.mark.slow
def test_cli_bad_input_is_one_paragraph_without_traceback(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text(f"emotion,pixels,Usage\n{_row(label='x')}\n")
    r = run_cli("pipeline.split", "--data", str(p))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "line 2" in r.stderr and str(p) in r.stderr.replace("\n", " ")


@pytest.mark.slow
def test_parse_speed_note_on_real_file(dev_data):
    """The real dev file parses to the documented shape (timings live in pipeline.bench)."""
    d = fer.load(dev_data, use_cache=False)
    assert d.images.shape == (32298, 48, 48)
    assert (d.usage == "Training").sum() == 28709 and (d.usage == "PublicTest").sum() == 3589
    assert np.bincount(d.labels[d.usage == "Training"]).tolist() == [
        3995, 436, 4097, 7215, 4830, 3171, 4965]


@pytest.mark.slow
def test_a_truncated_gzip_names_the_last_intact_line(tmp_path):
    text = csv_text(*make_faces({"Training": 60}))  # 420 rows
    whole = gzip.compress(text.encode())
    p = tmp_path / "cut.csv.gz"
    p.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(fer.DataError) as e:
        fer.load(p)
    n = int(str(e.value).split("after line ")[1].split(" ")[0])
    # About half the rows are intact, and the message says so (not "after line 1").
    assert 100 < n < 421


def test_a_fifo_given_as_data_is_refused_at_once(tmp_path):
    import os

    os.mkfifo(tmp_path / "fer2013.csv")
    with pytest.raises(fer.DataError, match="not a regular file or a folder"):
        fer.load(tmp_path / "fer2013.csv")


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root reads any file")
def test_a_file_without_read_permission_is_one_line_naming_it(kaggle_csv):
    kaggle_csv.chmod(0)
    with pytest.raises(fer.DataError, match=f"{kaggle_csv}: cannot be read"):
        fer.load(kaggle_csv)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (the pixels never follow): what a
    decompression bomb looks like to a reader before it decodes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body +
                struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
            chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_in_an_image_folder_is_one_line_naming_it(image_folder):
    bomb = image_folder / "train" / "happy" / "huge.png"
    bomb.write_bytes(_bomb_png(20000, 20000))
    with pytest.raises(fer.DataError) as e:
        fer.load(image_folder)
    assert str(e.value).startswith(f"{bomb}: unreadable image") and len(str(e.value)) < 400


def test_pixels_with_another_separator_say_so_in_a_short_line(tmp_path):
    images, labels, usage = make_faces({"Training": 1})
    rows = ["emotion,pixels,Usage"] + [f"{l},{chr(9).join(map(str, im.ravel()))},{u}"
                                       for im, l, u in zip(images, labels, usage)]
    p = tmp_path / "tabs.csv"
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(fer.DataError) as e:
        fer.load(p)
    assert str(e.value) == (f"{p}: line 2: pixel values separated by '\\t'; expected 2304 "
                            f"integers 0..255 separated by spaces.")


def test_a_long_bad_value_is_quoted_to_forty_characters(tmp_path):
    images, labels, usage = make_faces({"Training": 1})
    rows = ["emotion,pixels,Usage", f"{'x' * 5000},{' '.join(map(str, images[0].ravel()))},"
                                    f"Training"]
    p = tmp_path / "long.csv"
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(fer.DataError) as e:
        fer.load(p)
    assert f"emotion {'x' * 40!r}... (5000 characters) is not a label" in str(e.value)
    assert len(str(e.value)) < 300


def test_training_without_a_class_warns(tmp_path, capsys):
    p = tmp_path / "no_disgust.csv"
    p.write_text(csv_text(*make_faces(classes=[0, 2, 3, 4, 5, 6])))
    fer.load_training(p)
    assert f"warning: {p}: no Training rows of disgust" in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_load(kaggle_csv, tmp_path,
                                                                     monkeypatch, capsys):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FER_CACHE_DIR", str(blocker / "sub"))
    data = fer.load(kaggle_csv)
    assert len(data) == 7 * 15
    err = capsys.readouterr().err
    assert f"warning: the parse cache in {blocker / 'sub'} (FER_CACHE_DIR) cannot be written" \
        in err and "will be parsed again next time" in err
