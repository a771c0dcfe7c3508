"""Pure checks of what people type and upload: phone numbers, names, GB 11643 ID numbers, document photos."""

import datetime as dt
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from cloud.accounts import identity as i
from tests.cloudkit import id_photo, resident_id

TODAY = dt.date(2026, 11, 25)


def test_the_standard_example_number_passes():
    # the worked example of GB 11643-1999 annex: 11010519491231002X
    assert i.check_resident_id("11010519491231002X", TODAY).birth_date == dt.date(1949, 12, 31)
    assert i.check_resident_id("11010519491231002x", TODAY).number == "11010519491231002X"
    assert i.check_digit("11010519491231002") == "X"
    assert i.WEIGHTS == (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


@pytest.mark.parametrize(("number", "why"), [
    ("11010519491231002", "18 characters"),
    ("1101051949123100211", "18 characters"),
    ("11010519491231002A", "17 digits followed"),
    ("1101051949123100X2", "17 digits followed"),
    ("99010519491231002X", "province"),
    ("11010519491331002X", "date of birth"),
    ("11010518991231002X", "impossible"),
    ("11010520271231002X", "impossible"),
    ("110105194912310021", "check digit"),
])
def test_bad_resident_ids_say_what_is_wrong(number, why):
    with pytest.raises(ValueError, match=why):
        i.check_resident_id(number, TODAY)


@given(st.integers(0, 999), st.dates(dt.date(1900, 1, 1), TODAY))
def test_every_generated_number_passes_and_any_single_digit_change_fails(seq, born):
    good = resident_id(seq, born.strftime("%Y%m%d"))
    assert i.check_resident_id(good, TODAY).number == good
    for pos in (0, 7, 14, 16):                       # a typo in any weighted position changes the check digit
        wrong = good[:pos] + str((int(good[pos]) + 1) % 10) + good[pos + 1:]
        with pytest.raises(ValueError):
            i.check_resident_id(wrong, TODAY)


def test_masks_never_show_the_whole_number():
    assert i.mask_document("11010519491231002X") == "11**************2X"
    assert i.mask_phone("13812345678") == "138****5678"
    assert i.mask_name("张三丰") == "张**"


@pytest.mark.parametrize("raw", ["13812345678", "+86 138-1234-5678", "0086 13812345678", " 138 1234 5678 "])
def test_phone_numbers_are_normalised(raw):
    assert i.normalize_phone(raw) == "13812345678"


@pytest.mark.parametrize("raw", ["", "12812345678", "1381234567", "138123456789", "+1 4155550100", "abc"])
def test_bad_phone_numbers_are_refused(raw):
    with pytest.raises(ValueError, match="11 digits"):
        i.normalize_phone(raw)


@pytest.mark.parametrize(("raw", "ok"), [("张三", True), ("阿依古丽·买买提", True), ("Li  Wei", True),
                                         ("张", False), ("张3", False), ("<script>", False), ("x" * 41, False)])
def test_names(raw, ok):
    if ok:
        assert i.normalize_name(raw)
    else:
        with pytest.raises(ValueError):
            i.normalize_name(raw)


def test_other_documents_get_a_format_check():
    assert i.normalize_document("passport", "e 1234 5678", TODAY) == "E12345678"
    with pytest.raises(ValueError):
        i.normalize_document("passport", "E1", TODAY)


# ---------------------------------------------------------------- photos

def test_photos_are_reencoded_without_metadata():
    raw = id_photo()
    assert b"SecretCam" in raw
    jpeg, w, h = i.reencode_photo(raw)
    assert jpeg.startswith(i.JPEG_MAGIC) and b"SecretCam" not in jpeg and b"Exif" not in jpeg[:200]
    assert (w, h) == (900, 570)
    with Image.open(io.BytesIO(jpeg)) as img:
        assert not img.getexif()


def test_exif_orientation_is_applied_before_it_is_dropped():
    img = Image.new("RGB", (800, 400), "white")
    ex = Image.Exif()
    ex[0x0112] = 6                              # rotate 90 degrees to display
    out = io.BytesIO()
    img.save(out, format="JPEG", exif=ex.tobytes())
    _jpeg, w, h = i.reencode_photo(out.getvalue())
    assert (w, h) == (400, 800)


def test_png_is_accepted_and_big_photos_are_scaled_down():
    jpeg, w, h = i.reencode_photo(id_photo(4000, 2500, fmt="PNG"))
    assert jpeg.startswith(i.JPEG_MAGIC) and max(w, h) == i.STORED_LONG_SIDE_PX


@pytest.mark.parametrize(("data", "code"), [
    (b"hello, this is not a picture", "not_an_image"),
    (b"GIF89a" + b"\0" * 100, "not_an_image"),
    (b"\xff\xd8\xff\xe0" + b"\0" * 50, "not_an_image"),                       # a JPEG header and nothing else
    (id_photo()[:3000], "not_an_image"),                                       # truncated
    (id_photo(200, 150), "photo_too_small"),
    (id_photo(9000, 400, fmt="PNG"), "photo_too_many_pixels"),
    (b"\xff\xd8\xff" + b"\0" * (i.MAX_PHOTO_BYTES + 1), "photo_too_large"),
])
def test_bad_uploads_are_refused_with_a_reason(data, code):
    with pytest.raises(i.PhotoRejected) as e:
        i.reencode_photo(data)
    assert e.value.code == code and str(e.value)


def test_a_decompression_bomb_is_refused_before_decoding():
    # a PNG whose header claims 30000 x 30000 pixels: refused from the header alone
    img = Image.new("1", (30000, 30000))
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    assert len(out.getvalue()) < i.MAX_PHOTO_BYTES
    with pytest.raises(i.PhotoRejected) as e:
        i.reencode_photo(out.getvalue())
    assert e.value.code in ("photo_too_many_pixels", "not_an_image")
