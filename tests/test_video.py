"""Video input: sampling, resizing, decoding real .mp4 files, in-memory frames and every bad input."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import finger_reward.video as video_module
from tests.conftest import random_frames
from finger_reward.errors import VideoError
from finger_reward.synthetic import write_video
from finger_reward.video import PATCH_FACTOR, Clip, fit_size, load_video, sample_indices


def expect_video_error(video, expected_name: str, /, *problem: str, **options) -> VideoError:
    """load_video must raise exactly VideoError, naming `expected_name` and every part of `problem`."""
    with pytest.raises(VideoError) as info:
        load_video(video, **options)
    err = info.value
    message = str(err)
    assert err.video == expected_name
    assert message.startswith(f"video {expected_name}: "), message
    for part in problem:
        assert part in message, f"{part!r} not in {message!r}"
    return err


def expect_value_error(video, *problem: str, **options) -> None:
    """An invalid argument is a plain ValueError, not a VideoError blaming the video."""
    with pytest.raises(ValueError) as info:
        load_video(video, **options)
    assert type(info.value) is ValueError, type(info.value)
    for part in problem:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


# ---- sample_indices -----------------------------------------------------------------------------


def test_sample_indices_picks_evenly_spread_frames_at_the_target_fps():
    indices, fps = sample_indices(16, 8.0, 2.0, 48)
    assert indices == [2, 6, 10, 14]  # 2 s of video at 2 fps: one frame from the middle of each 0.5 s
    assert fps == 2.0


def test_sample_indices_cap_thins_frames_and_reports_their_real_rate():
    indices, fps = sample_indices(24, 8.0, 8.0, 6)  # 3 s of video, 24 frames wanted, 6 allowed
    assert len(indices) == 6
    assert set(np.diff(indices)) == {4}
    assert indices == [2, 6, 10, 14, 18, 22]
    assert fps == pytest.approx(6 / 3.0)

    indices, fps = sample_indices(100, 25.0, 10.0, 7)
    assert len(indices) == 7 and indices == sorted(set(indices))
    assert fps == pytest.approx(7 / (100 / 25.0))


def test_sample_indices_keeps_every_frame_of_a_clip_slower_than_the_target():
    indices, fps = sample_indices(9, 8.0, 16.0, 48)
    assert indices == list(range(9))
    assert fps == pytest.approx(8.0)


# ---- fit_size -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, max_pixels",
    [
        (64, 96, 448 * 448),
        (480, 640, 448 * 448),
        (720, 1280, 448 * 448),
        (1080, 1920, 448 * 448),
        (1920, 1080, 448 * 448),
        (1000, 1000, 448 * 448),
        (100, 1000, 448 * 448),
        (37, 53, 28 * 28 * 4),
        (1080, 1920, 28 * 28 * 20),
    ],
)
def test_fit_size_gives_patch_multiples_under_the_budget_keeping_aspect(height, width, max_pixels):
    h, w = fit_size(height, width, max_pixels)
    assert h % PATCH_FACTOR == 0 and w % PATCH_FACTOR == 0
    assert h >= PATCH_FACTOR and w >= PATCH_FACTOR
    assert h * w <= max_pixels
    # both sides are the same scaling of the input, each off by less than one patch
    scale = max(1.0, math.sqrt(height * width / max_pixels))
    assert abs(h - height / scale) <= PATCH_FACTOR, (h, height / scale)
    assert abs(w - width / scale) <= PATCH_FACTOR, (w, width / scale)


def test_fit_size_leaves_a_fitting_size_alone_and_grows_tiny_inputs_to_one_patch():
    assert fit_size(56, 84, 448 * 448) == (56, 84)
    assert fit_size(448, 448, 448 * 448) == (448, 448)
    assert fit_size(10, 10, 448 * 448) == (28, 28)
    assert fit_size(1, 3, 448 * 448) == (28, 28)
    assert fit_size(10, 120, 448 * 448) == (28, 112)


def test_fit_size_keeps_the_budget_when_the_short_side_is_raised_to_one_patch():
    h, w = fit_size(100, 1000, 28 * 28 * 4)  # aspect 10 under a 4-patch budget
    assert h * w <= 28 * 28 * 4
    assert (h, w) == (28, 112)
    h, w = fit_size(1000, 100, 28 * 28 * 4)
    assert (h, w) == (112, 28)


def test_fit_size_rejects_extreme_aspect_ratio_and_empty_frames():
    with pytest.raises(ValueError, match="aspect ratio of 2010x10 is over 200"):
        fit_size(10, 2010, 448 * 448)
    with pytest.raises(ValueError, match="aspect ratio of 10x2010 is over 200"):
        fit_size(2010, 10, 448 * 448)
    assert fit_size(10, 2000, 448 * 448)[0] == 28  # exactly 200 is allowed
    with pytest.raises(ValueError, match="frame size 8x0 is empty"):
        fit_size(0, 8, 448 * 448)


# ---- decoding real .mp4 files -------------------------------------------------------------------


def test_decoded_clip_is_uint8_tchw_patch_multiple_at_the_target_fps(mp4_paths):
    clip = load_video(mp4_paths[0], fps=2.0)
    assert isinstance(clip, Clip)
    assert clip.frames.dtype == torch.uint8
    assert tuple(clip.frames.shape) == (4, 3, 56, 84)  # 16 frames at 8 fps -> 4 at 2 fps; 64x96 -> 56x84
    assert clip.fps == 2.0
    assert clip.name == str(mp4_paths[0])

    short = load_video(mp4_paths[1], fps=2.0)  # 9 frames at 8 fps: 1.125 s -> 2 frames
    assert short.frames.shape[0] == 2
    assert short.fps == pytest.approx(2 / 1.125)
    assert short.frames.shape[2] % PATCH_FACTOR == 0 and short.frames.shape[3] % PATCH_FACTOR == 0

    full = load_video(mp4_paths[2], fps=8.0)  # the clip's own rate keeps all 24 frames
    assert tuple(full.frames.shape) == (24, 3, 56, 56)
    assert full.fps == pytest.approx(8.0)

    capped = load_video(mp4_paths[2], fps=8.0, max_frames=6)
    assert capped.frames.shape[0] == 6
    assert capped.fps == pytest.approx(2.0)
    assert torch.equal(capped.frames, full.frames[[2, 6, 10, 14, 18, 22]])


def test_decoded_frames_show_what_was_encoded(mp4_paths):
    decoded = load_video(mp4_paths[0], fps=2.0)
    original = load_video(random_frames(0, 16, 64, 96), fps=2.0, source_fps=8.0)
    assert decoded.frames.shape == original.frames.shape
    diff = (decoded.frames.float() - original.frames.float()).abs().mean().item()
    assert diff < 8, diff
    other = load_video(random_frames(5, 16, 64, 96), fps=2.0, source_fps=8.0)
    assert (decoded.frames.float() - other.frames.float()).abs().mean().item() > 40


def test_path_and_bytes_of_the_same_file_decode_identically(mp4_paths):
    data = mp4_paths[0].read_bytes()
    from_path = load_video(mp4_paths[0])
    from_str = load_video(str(mp4_paths[0]))
    from_bytes = load_video(data)
    from_bytearray = load_video(bytearray(data))
    from_view = load_video(memoryview(data), name="clip0")
    assert torch.equal(from_path.frames, from_bytes.frames)
    assert torch.equal(from_path.frames, from_str.frames)
    assert torch.equal(from_path.frames, from_bytearray.frames)
    assert torch.equal(from_path.frames, from_view.frames)
    assert from_path.fps == from_bytes.fps
    assert from_bytes.name == "#0 (bytes)"
    assert from_view.name == "clip0"


def _decord_fails(source):
    raise RuntimeError("decord injected failure")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_pyav_fallback_matches_decord(mp4_paths, monkeypatch, index):
    options = dict(fps=8.0, max_frames=48)
    with_decord = load_video(mp4_paths[index], **options)
    pyav_calls = []
    real_pyav = video_module._open_pyav

    def counting_pyav(source):
        pyav_calls.append(source)
        return real_pyav(source)

    monkeypatch.setattr(video_module, "_open_decord", _decord_fails)
    monkeypatch.setattr(video_module, "_open_pyav", counting_pyav)
    with_pyav = load_video(mp4_paths[index], **options)
    with_pyav_bytes = load_video(mp4_paths[index].read_bytes(), **options)

    assert len(pyav_calls) == 2
    assert with_pyav.frames.shape == with_decord.frames.shape
    assert with_pyav.frames.shape[0] == (16, 9, 24)[index]
    assert with_pyav.fps == pytest.approx(with_decord.fps)
    diff = (with_pyav.frames.float() - with_decord.frames.float()).abs().mean().item()
    assert diff < 2, diff
    assert torch.equal(with_pyav.frames, with_pyav_bytes.frames)


def test_clip_metadata_describes_the_sampled_frames(mp4_paths):
    clip = load_video(mp4_paths[0], fps=2.0)
    meta = clip.metadata
    assert meta["total_num_frames"] == 4
    assert meta["fps"] == 2.0
    assert meta["frames_indices"] == [0, 1, 2, 3]
    assert (meta["height"], meta["width"]) == (56, 84)


# ---- in-memory frames ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames_uint8() -> np.ndarray:
    """uint8 (T, H, W, 3) with H, W already multiples of 28, so no resize blurs the comparison."""
    return random_frames(7, num_frames=6, height=112, width=224)


def test_all_in_memory_forms_give_the_same_frames(frames_uint8):
    reference = load_video(frames_uint8)
    expected = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2)
    assert reference.frames.dtype == torch.uint8
    assert torch.equal(reference.frames, expected)
    assert reference.fps == 2.0 and reference.name == "#0"

    unit = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).float() / 255
    signed = unit * 2 - 1
    pil = [Image.fromarray(frame) for frame in frames_uint8]
    variants = {
        "float [0, 1]": load_video(unit),
        "float64 [0, 1]": load_video(unit.double()),
        "float [-1, 1]": load_video(signed, value_range=(-1, 1)),
        "float16 [-1, 1]": load_video(signed.half(), value_range=(-1.0, 1.0)),
        "float array [0, 1]": load_video(frames_uint8.astype(np.float32) / 255),
        "uint8 tensor": load_video(expected.clone()),
        "PIL list": load_video(pil),
        "PIL tuple": load_video(tuple(pil)),
    }
    for label, clip in variants.items():
        assert clip.frames.dtype == torch.uint8, label
        assert clip.frames.shape == reference.frames.shape, label
        worst = (clip.frames.int() - reference.frames.int()).abs().max().item()
        assert worst <= 1, (label, worst)


def test_in_memory_frames_are_resized_to_patch_multiples():
    frames = random_frames(3, num_frames=4, height=64, width=96)
    clip = load_video(frames)
    assert tuple(clip.frames.shape) == (4, 3, 56, 84)
    small = load_video(frames, max_pixels=28 * 28 * 3)
    assert tuple(small.frames.shape) == (4, 3, 28, 56)
    # a resized float input matches the resized uint8 input
    as_float = load_video(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255)
    assert (as_float.frames.int() - clip.frames.int()).abs().max().item() <= 1


def test_grayscale_frames_become_rgb(frames_uint8):
    gray = frames_uint8[..., :1]
    clip = load_video(gray)
    assert clip.frames.shape[1] == 3
    assert torch.equal(clip.frames[:, 0], clip.frames[:, 2])
    pil = load_video([Image.fromarray(frame[..., 0], mode="L") for frame in gray])
    assert torch.equal(pil.frames, clip.frames)


def test_source_fps_resamples_in_memory_frames():
    frames = random_frames(4, num_frames=16, height=112, width=112)
    as_is = load_video(frames, fps=2.0)
    assert as_is.frames.shape[0] == 16 and as_is.fps == 2.0  # taken as already sampled at 2 fps

    resampled = load_video(frames, fps=2.0, source_fps=8.0)
    assert resampled.fps == 2.0
    expected = torch.from_numpy(frames[[2, 6, 10, 14]]).permute(0, 3, 1, 2)
    assert torch.equal(resampled.frames, expected)

    slower = load_video(frames, fps=8.0, source_fps=4.0)
    assert slower.frames.shape[0] == 16 and slower.fps == pytest.approx(4.0)


# ---- bad inputs: each a VideoError naming the video and the problem -----------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.mp4"
    expect_video_error(path, str(path), "file not found")
    expect_video_error(str(path), str(path), "file not found")


def test_directory_path(tmp_path):
    expect_video_error(tmp_path, str(tmp_path), "is not a file")


def test_undecodable_and_empty_bytes(capfd):
    err = expect_video_error(b"this is not a video at all", "#0 (bytes)", "cannot be decoded", "not a video file",
                             "holds text")
    assert err.problem.startswith("cannot be decoded")
    expect_video_error(bytes(range(256)) * 8, "#0 (bytes)", "not a video file", "no container format")
    expect_video_error(b"", "#0 (bytes)", "is empty (0 bytes)")
    expect_video_error(bytearray(), "#0 (bytes)", "is empty (0 bytes)")
    expect_video_error(b"", "upload.mp4", "is empty (0 bytes)", name="upload.mp4")
    assert capfd.readouterr().err == ""  # no decoder printed anything


def test_file_with_garbage_content(tmp_path, capfd):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    err = expect_video_error(path, str(path), "cannot be decoded: not a video file")
    assert "\\x" not in str(err) and all(c.isprintable() for c in str(err))
    text = tmp_path / "notes.mp4"
    text.write_text("hello, I am not a video\n")
    expect_video_error(text, str(text), "not a video file (it holds text)")
    assert capfd.readouterr().err == ""


def test_truncated_mp4(mp4_paths, tmp_path, capfd):
    data = mp4_paths[0].read_bytes()
    path = tmp_path / "truncated.mp4"
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: cut off
    expect_video_error(path, str(path), "cannot be decoded: truncated", "moov")

    import av

    fast = tmp_path / "fast.mp4"  # the index first, then the frames' data: cut in the data
    with av.open(str(mp4_paths[0])) as source, av.open(str(fast), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for packet in source.demux(source.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = fast.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    expect_video_error(path, str(path), "cannot be decoded: truncated", "of its 16 frames")
    assert capfd.readouterr().err == ""


def test_file_without_a_video_stream(tmp_path, capfd):
    import av

    path = tmp_path / "voice.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    expect_video_error(path, str(path), "cannot be decoded: no video stream", "holds: audio")
    assert capfd.readouterr().err == ""


def test_file_neither_decoder_can_open_names_both_failures(mp4_paths, monkeypatch):
    def pyav_fails(source):
        raise RuntimeError("pyav injected failure \x00\xd9" + "x" * 500)

    monkeypatch.setattr(video_module, "_open_decord", _decord_fails)
    monkeypatch.setattr(video_module, "_open_pyav", pyav_fails)
    err = expect_video_error(mp4_paths[0], str(mp4_paths[0]), "cannot be decoded", "decord injected failure",
                             "pyav injected failure")
    assert "\x00" not in str(err) and "\xd9" not in str(err) and len(str(err)) < 400  # never raw bytes in a log


def test_zero_frames():
    expect_video_error(np.zeros((0, 56, 56, 3), np.uint8), "#0", "has zero frames")
    expect_video_error(torch.zeros(0, 3, 56, 56), "gen_3", "has zero frames", name="gen_3")
    expect_video_error([], "#0", "has zero frames")


def test_empty_frames():
    expect_video_error(np.zeros((2, 0, 56, 3), np.uint8), "#0", "empty frames", "height 0")
    expect_video_error(torch.zeros(2, 3, 56, 0), "#0", "empty frames", "width 0")


def test_wrong_rank():
    expect_video_error(np.zeros((56, 56, 3), np.uint8), "#0", "has 3 dims (56, 56, 3)", "expected 4", "(T, H, W, C)")
    expect_video_error(torch.zeros(3, 56, 56), "#0", "has 3 dims (3, 56, 56)", "(T, C, H, W)")
    for batch in (np.zeros((2, 4, 56, 56, 3), np.uint8), torch.zeros(2, 4, 3, 56, 56)):
        expect_video_error(batch, "#0", "has 5 dims", "batch", "finger_reward.integrations.diffusers")


def test_wrong_channel_count():
    expect_video_error(np.zeros((2, 56, 56, 4), np.uint8), "#0", "has 4 channels", "C=3")
    expect_video_error(torch.zeros(2, 2, 56, 56), "#0", "has 2 channels", "(T, C, H, W)")
    # a (T, H, W, C) tensor read as (T, C, H, W) has H channels
    expect_video_error(torch.zeros(2, 56, 56, 3), "#0", "has 56 channels")


@pytest.mark.parametrize(
    "frames, dtype",
    [
        (np.zeros((2, 56, 56, 3), np.int64), "int64"),
        (np.zeros((2, 56, 56, 3), bool), "bool"),
        (np.zeros((2, 56, 56, 3), np.uint16), "uint16"),
        (np.zeros((2, 56, 56, 3), object), "object"),
        (np.zeros((2, 56, 56, 3), "U1"), "<U1"),
        (torch.zeros(2, 3, 56, 56, dtype=torch.int64), "int64"),
        (torch.zeros(2, 3, 56, 56, dtype=torch.bool), "bool"),
    ],
)
def test_wrong_dtype(frames, dtype):
    err = expect_video_error(frames, "#0", "is not supported", "uint8 or a float")
    assert re.search(rf"dtype (torch\.)?{re.escape(dtype)} is not supported", str(err)), str(err)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values(bad):
    frames = torch.full((2, 3, 56, 56), 0.5)
    frames[1, 2, 3, 4] = bad
    expect_video_error(frames, "#0", "NaN or infinite")
    array = np.full((2, 56, 56, 3), 0.5, np.float32)
    array[0, 0, 0, 0] = bad
    expect_video_error(array, "clip_nan", "NaN or infinite", name="clip_nan", value_range=(-1, 1))


def test_signed_floats_with_the_default_range_suggest_value_range():
    frames = torch.linspace(-1, 1, 2 * 3 * 56 * 56).reshape(2, 3, 56, 56)
    expect_video_error(frames, "#0", "values span [-1, 1]", "outside value_range (0.0, 1.0)",
                       "value_range=(-1, 1)")
    assert load_video(frames, value_range=(-1, 1)).frames.shape == (2, 3, 56, 56)


@pytest.mark.parametrize("value_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_floats_in_0_255_are_rejected(value_range):
    frames = torch.from_numpy(random_frames(1, 2, 56, 56)).permute(0, 3, 1, 2).float()
    err = expect_video_error(frames, "#0", "outside value_range", "uint8 in [0, 255]", value_range=value_range)
    assert "value_range=(-1, 1)" not in str(err)  # the (-1, 1) hint would be wrong here
    assert re.search(r"values span \[\d+(\.\d+)?, 2\d\d\]", str(err))


def test_values_just_outside_the_range_are_rejected():
    frames = torch.full((2, 3, 56, 56), 0.5)
    frames[0, 0, 0, 0] = 1.01
    expect_video_error(frames, "#0", "outside value_range")
    frames[0, 0, 0, 0] = 1.0005  # within rounding tolerance
    assert load_video(frames).frames.max().item() == 255


def test_list_with_a_non_pil_item():
    image = Image.new("RGB", (56, 56))
    expect_video_error([image, np.zeros((56, 56, 3), np.uint8)], "#0", "list item 1 is ndarray", "PIL images")
    expect_video_error(["a.png"], "#0", "list item 0 is str")


def test_pil_frames_of_different_sizes():
    images = [Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56))]
    expect_video_error(images, "#0", "different sizes", "(56, 56)", "(84, 56)")


@pytest.mark.parametrize("value, type_name", [({"frames": []}, "dict"), (42, "int"), (None, "NoneType")])
def test_unsupported_type(value, type_name):
    expect_video_error(value, "#0", f"unsupported type {type_name}", "a path, bytes", "list of PIL images")


def test_extreme_aspect_ratio_names_the_video():
    expect_video_error(np.zeros((1, 2, 500, 3), np.uint8), "strip", "aspect ratio of 500x2 is over 200", name="strip")


def test_error_is_a_value_error_for_callers_that_catch_value_error():
    with pytest.raises(ValueError):
        load_video({})


# ---- invalid arguments: ValueError, whatever the input ------------------------------------------


def test_invalid_value_range(mp4_paths, frames_uint8):
    for video in (torch.rand(2, 3, 56, 56), frames_uint8, mp4_paths[0]):
        expect_value_error(video, "value_range=(0, 255)", value_range=(0, 255))
    expect_value_error(frames_uint8, "must be one of", value_range=(-1, 0))


@pytest.mark.parametrize(
    "options, text",
    [
        (dict(fps=0), "fps=0"),
        (dict(fps=-2.0), "fps=-2.0"),
        (dict(fps=float("nan")), "fps=nan"),
        (dict(max_frames=0), "max_frames=0"),
        (dict(max_pixels=100), "max_pixels=100"),
        (dict(source_fps=0), "source_fps"),
        (dict(source_fps=-8.0), "source_fps"),
    ],
)
def test_invalid_sampling_arguments(frames_uint8, mp4_paths, options, text):
    expect_value_error(frames_uint8, text, **options)
    if "source_fps" not in options:
        expect_value_error(mp4_paths[0], text, **options)


def test_write_video_round_trip_of_an_odd_frame_rate(tmp_path):
    path = write_video(random_frames(2, 10, 32, 32), tmp_path / "five.mp4", fps=5)
    clip = load_video(path, fps=5.0)
    assert clip.frames.shape[0] == 10
    assert clip.fps == pytest.approx(5.0)
    assert tuple(clip.frames.shape[2:]) == (28, 28)
