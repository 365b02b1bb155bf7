"""synthetic_camera and video_source nodes publish well-formed, consistently stamped frames."""

import os
from pathlib import Path
import select
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import CameraInfo, Image

from node_harness import Harness
from sam_gap_ros.image_conversion import image_msg_to_numpy, image_msg_to_rgb
from sam_gap_ros.nodes.video_source import FrameReader, VideoSourceNode


@pytest.fixture
def ros():
    harness = Harness()
    yield harness
    harness.close()


def test_synthetic_camera_publishes_image_depth_and_info_with_one_header(ros):
    from sam_gap_ros.nodes.synthetic_camera import SyntheticCameraNode
    params = {'rate_hz': 50.0, 'width': 128, 'height': 96, 'seed': 3, 'n_frames': 5}
    camera = ros.add(SyntheticCameraNode(
        context=ros.context, namespace=ros.ns,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()]))
    images = ros.subscribe(Image, f'{ros.ns}/image')
    depths = ros.subscribe(Image, f'{ros.ns}/depth')
    infos = ros.subscribe(CameraInfo, f'{ros.ns}/camera_info')
    assert ros.spin_until(lambda: len(images) >= 3 and len(depths) >= 3 and len(infos) >= 3)
    image, depth, info = images[1], depths[1], infos[1]
    assert image.header == depth.header == info.header
    rgb = image_msg_to_rgb(image)
    assert rgb.shape == (96, 128, 3) and image.encoding == 'rgb8'
    expected = camera.video[1]
    np.testing.assert_array_equal(rgb, expected.image)
    assert depth.encoding == '16UC1'
    np.testing.assert_array_equal(image_msg_to_numpy(depth), expected.depth_mm)
    assert list(info.k) == pytest.approx(expected.camera.k)
    assert (info.width, info.height) == (128, 96)


def test_synthetic_camera_scene_parameter_sets_the_field_of_view(ros):
    from sam_gap_ros.nodes.synthetic_camera import SyntheticCameraNode
    camera = ros.add(SyntheticCameraNode(
        context=ros.context, namespace=ros.ns, parameter_overrides=[
            Parameter('width', value=128), Parameter('height', value=96),
            Parameter('scene', value='{hfov_deg: 30.0, n_apples: [3, 6]}')]))
    assert camera.video.config.hfov_deg == 30.0 and camera.video.config.n_apples == (3, 6)
    # fx of a 30 deg pinhole over 128 px: 64 / tan(15 deg)
    assert camera.video[0].camera.k[0] == pytest.approx(64 / np.tan(np.radians(15)), rel=1e-3)
    with pytest.raises(ValueError, match='hfov'):
        SyntheticCameraNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
            Parameter('scene', value='{hfov: 30}')])
    # The image size has parameters of its own (with their range); the scene cannot bypass it.
    with pytest.raises(ValueError, match=r"cannot set \['height', 'width'\]"):
        SyntheticCameraNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
            Parameter('scene', value='{width: 6000, height: 40}')])


def test_video_source_reads_a_folder_and_a_video_file(ros, tmp_path):
    folder = tmp_path / 'frames'
    folder.mkdir()
    frames = [np.full((40, 60, 3), 40 * i, dtype=np.uint8) for i in range(3)]
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f'{i:03d}.png'), frame)
    (folder / 'notes.txt').write_text('ignored')
    reader = FrameReader(str(folder), loop=False)
    assert [int(reader.read()[0, 0, 0]) for _ in range(3)] == [0, 40, 80]
    assert reader.read() is None

    video = tmp_path / 'clip.avi'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'MJPG'), 12.0, (60, 40))
    for frame in frames:
        writer.write(frame)
    writer.release()
    looping = FrameReader(str(video), loop=True)
    assert looping.fps == pytest.approx(12.0)
    # Loops past the end, from the first frame again (MJPG is lossy: grey levels +-3).
    looped = [int(looping.read()[20, 30].mean()) for _ in range(7)]
    assert np.allclose(looped, [0, 40, 80] * 2 + [0], atol=3), looped
    looping.close()
    with pytest.raises(ValueError):
        FrameReader(str(tmp_path / 'missing.mp4'))

    node = ros.add(VideoSourceNode(
        context=ros.context, namespace=ros.ns, parameter_overrides=[
            Parameter('path', value=str(folder)), Parameter('rate_hz', value=100.0),
            Parameter('loop', value=False), Parameter('fx', value=50.0)]))
    images = ros.subscribe(Image, f'{ros.ns}/image')
    infos = ros.subscribe(CameraInfo, f'{ros.ns}/camera_info')
    assert ros.spin_until(lambda: node.finished and len(images) == 3 and len(infos) == 3)
    assert [int(image_msg_to_numpy(m)[0, 0, 0]) for m in images] == [0, 40, 80]
    assert images[0].encoding == 'bgr8' and infos[0].header == images[0].header
    assert list(infos[0].k)[:3] == [50.0, 0.0, 29.5]


def _write_png(path, grey):
    cv2.imwrite(str(path), np.full((8, 10, 3), grey, dtype=np.uint8))


def test_frame_reader_plays_a_folder_in_natural_order_and_skips_broken_files(tmp_path):
    for number in (1, 2, 10):
        _write_png(tmp_path / f'frame_{number}.png', number)
    (tmp_path / 'frame_3.png').write_bytes(b'not a png')  # e.g. a half-copied file
    unreadable = []
    reader = FrameReader(str(tmp_path), loop=True, on_unreadable=unreadable.append)

    greys = [int(reader.read()[0, 0, 0]) for _ in range(7)]

    assert greys == [1, 2, 10, 1, 2, 10, 1]  # not frame_1, frame_10, frame_2
    assert unreadable == reader.unreadable == [tmp_path / 'frame_3.png']  # reported once


def test_frame_reader_needs_a_path():
    for path in ('', '  '):
        with pytest.raises(ValueError, match="set 'path'"):
            FrameReader(path)  # Path('') would be the working directory


def test_video_source_stops_when_nothing_can_be_decoded(ros, tmp_path):
    for name in ('a.png', 'b.jpg'):
        (tmp_path / name).write_bytes(b'junk')
    node = ros.add(VideoSourceNode(
        context=ros.context, namespace=ros.ns, parameter_overrides=[
            Parameter('path', value=str(tmp_path)), Parameter('rate_hz', value=100.0)]))

    assert ros.spin_until(lambda: node.finished)

    # Looping, but with no frame to show the timer stops instead of re-reading every file.
    assert node.timer.is_canceled() and node.published == 0
    assert sorted(p.name for p in node.reader.unreadable) == ['a.png', 'b.jpg']


def test_video_source_caps_a_high_speed_video_rate(ros, tmp_path):
    video = tmp_path / 'fast.avi'
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*'MJPG'), 1000.0, (10, 8))
    writer.write(np.zeros((8, 10, 3), np.uint8))
    writer.release()
    node = ros.add(VideoSourceNode(context=ros.context, namespace=ros.ns,
                                   parameter_overrides=[Parameter('path', value=str(video))]))

    assert node.reader.fps == pytest.approx(1000.0)
    assert node.timer.timer_period_ns == 5_000_000  # 200 Hz, not a 1 ms busy loop


def test_video_source_refuses_a_principal_point_off_any_image(ros, tmp_path):
    """cx/cy have a range like fx/fy: inf or NaN would go out in every camera_info."""
    from rclpy.exceptions import InvalidParameterValueException
    _write_png(tmp_path / 'a.png', 0)
    for name in ('cx', 'cy'):
        for value in (float('inf'), float('nan'), -2.0):
            with pytest.raises(InvalidParameterValueException, match=name):
                VideoSourceNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
                    Parameter('path', value=str(tmp_path)), Parameter('fx', value=50.0),
                    Parameter(name, value=value)])
    node = ros.add(VideoSourceNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
        Parameter('path', value=str(tmp_path)), Parameter('fx', value=50.0),
        Parameter('cx', value=4.5), Parameter('cy', value=-1.0)]))
    assert node.describe_parameter('cx').floating_point_range
    info = node._camera_info(Image(width=10, height=8), 50.0)
    assert (info.k[2], info.k[5]) == (4.5, 3.5)


def test_natural_key_takes_names_with_superscript_or_circled_digits(tmp_path):
    """isdigit() accepts '²' and '①' but int() refuses them: the folder could not start."""
    for name in ('²1.png', '①.png', 'a.png'):
        _write_png(tmp_path / name, 0)

    reader = FrameReader(str(tmp_path), loop=False)

    assert [p.name for p in reader._files] == ['a.png', '²1.png', '①.png']


def test_video_source_refuses_a_rate_that_would_never_publish(ros, tmp_path, monkeypatch):
    """A rate below 0.1 Hz is refused, and a video claiming one plays at 0.1 Hz.

    ``rate_hz`` admits 0 (the video's rate), but 1e-6 Hz waits 11 days for its first frame
    and 1e-11 Hz overflows the timer period (an unreadable TypeError from rclpy).
    """
    _write_png(tmp_path / 'a.png', 0)
    for rate in (1e-11, 1e-6, 0.05):
        with pytest.raises(ValueError, match='rate_hz .* is below 0.1 Hz'):
            VideoSourceNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
                Parameter('path', value=str(tmp_path)), Parameter('rate_hz', value=rate)])
    node = ros.add(VideoSourceNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
        Parameter('path', value=str(tmp_path)), Parameter('rate_hz', value=0.1)]))
    assert node.timer.timer_period_ns == 10_000_000_000
    # A video whose header claims a rate near 0 plays at the lowest rate, with a warning.
    monkeypatch.setattr(FrameReader, 'fps', property(lambda self: 1e-4))
    slow = ros.add(VideoSourceNode(context=ros.context, namespace=ros.ns, parameter_overrides=[
        Parameter('path', value=str(tmp_path))]))
    assert slow.timer.timer_period_ns == 10_000_000_000


def test_video_source_plays_file_names_that_are_not_utf8(tmp_path):
    """File names that are not UTF-8 are played and logged.

    A Latin-1 name (FAT stick, old archive) crashed the node: cv2.imread segfaults on it
    and rclpy's logger raises on the lone surrogates Python holds such a name as.
    """
    folder = os.fsencode(tmp_path)
    for name, grey in ((b'a_1.png', 1), (b'\xc4pfel_2.png', 2)):
        _, png = cv2.imencode('.png', np.full((8, 10, 3), grey, dtype=np.uint8))
        with open(os.path.join(folder, name), 'wb') as file:
            file.write(png.tobytes())
    with open(os.path.join(folder, b'\xc4pfel_3.png'), 'wb') as file:
        file.write(b'junk')  # an undecodable one is named in the warning
    # In a process of its own: the old reader took pytest down with it.
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env['PYTHONPATH'] = os.pathsep.join(p for p in (repo, env.get('PYTHONPATH')) if p)
    process = subprocess.Popen(
        [sys.executable, '-m', 'sam_gap_ros.nodes.video_source', '--ros-args',
         '-p', f'path:={tmp_path}', '-p', 'loop:=false', '-p', 'rate_hz:=50.0'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, deadline = b'', time.monotonic() + 60
    try:
        while b'end of' not in output and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 1.0)[0]:
                chunk = os.read(process.stdout.fileno(), 65536)  # unbuffered, unlike readline
                if not chunk:  # the process died
                    break
                output += chunk
    finally:
        process.terminate()
        output = (output + process.communicate(timeout=30)[0]).decode(errors='replace')
    assert 'after 2 frames' in output, output
    assert "cannot decode '" in output and '\\xc4pfel_3.png' in output, output
    assert 'Traceback' not in output and 'Segmentation fault' not in output, output
