"""Tests of the ROS image <-> numpy conversion, on real sensor_msgs messages."""

import array
import struct
from types import SimpleNamespace

import cv2
from hypothesis import example, given, settings
from hypothesis import strategies as st
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from sam_gap_ros.image_conversion import (
    check_rgb_compressed_msg,
    check_rgb_image_msg,
    compressed_msg_to_numpy,
    compressed_msg_to_rgb,
    image_msg_to_numpy,
    image_msg_to_rgb,
    MAX_IMAGE_SIDE,
    numpy_to_compressed_msg,
    numpy_to_image_msg,
    parse_compressed_format,
    RGB_SOURCE_ENCODINGS,
    SUPPORTED_ENCODINGS,
)
from sam_gap_ros.mask_ops import label_image

# Small shapes and a modest example count keep the file fast on 2 shared cores; the
# deadline is off because a busy CI machine makes per-example timings meaningless.
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)

# Independent statement of each colour encoding's channels, for expected values.
RGB_INDEX = {'rgb8': [0, 1, 2], 'bgr8': [2, 1, 0], 'rgba8': [0, 1, 2], 'bgra8': [2, 1, 0]}
CHANNEL_ORDER_ENCODINGS = tuple(sorted([*RGB_INDEX, 'mono8']))
# Where each filter colour sits in a 2x2 Bayer tile, read row by row, as the names say.
BAYER_TILES = {'bayer_rggb8': 'RGGB', 'bayer_bggr8': 'BGGR', 'bayer_gbrg8': 'GBRG',
               'bayer_grbg8': 'GRBG'}
# Byte order of a YUV 4:2:2 pixel pair: U Y0 V Y1 (UYVY) or Y0 U Y1 V (YUYV).
YUV422_ORDERS = {'uyvy': 'UYVY', 'yuv422': 'UYVY', 'yuyv': 'YUYV', 'yuv422_yuy2': 'YUYV'}
ALL_ENCODINGS = tuple(sorted(SUPPORTED_ENCODINGS))
CV_BRIDGE_SKIP_REASON = (
    'cv_bridge not installable in this environment (PyPI cv-bridge is a ROS1 port)')


def _shape(encoding, height, width):
    channels = SUPPORTED_ENCODINGS[encoding].channels
    return (height, width) if channels == 1 else (height, width, channels)


@st.composite
def images(draw, encodings=ALL_ENCODINGS, max_height=6, max_width=9):
    """Draw ``(encoding, pixels)`` with odd and even sizes and the full value range."""
    encoding = draw(st.sampled_from(encodings))
    height = draw(st.integers(1, max_height))
    width = draw(st.integers(1, max_width))
    if encoding in YUV422_ORDERS:  # pixels come in pairs sharing chroma
        width = 2 * draw(st.integers(1, max_width // 2))
    pixels = draw(hnp.arrays(SUPPORTED_ENCODINGS[encoding].dtype,
                             _shape(encoding, height, width)))
    return encoding, pixels


def raw_image_msg(pixels, encoding, padding=0, big_endian=False, filler=0xA5):
    """Build an Image by hand, with ``padding`` filler bytes after every row."""
    spec = SUPPORTED_ENCODINGS[encoding]
    height, width = pixels.shape[:2]
    row_bytes = width * spec.bytes_per_pixel
    ordered = pixels.astype(spec.dtype.newbyteorder('>' if big_endian else '<'))
    rows = np.frombuffer(ordered.tobytes(), dtype=np.uint8).reshape(height, row_bytes)
    padded = np.full((height, row_bytes + padding), filler, dtype=np.uint8)
    padded[:, :row_bytes] = rows
    return Image(height=height, width=width, encoding=encoding,
                 is_bigendian=int(big_endian), step=row_bytes + padding,
                 data=array.array('B', padded.tobytes()))


def _message_buffer(msg):
    return np.frombuffer(msg.data, dtype=np.uint8)


# --- Image -> numpy ---------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(image=images(), padding=st.integers(0, 7), big_endian=st.booleans())
def test_image_msg_to_numpy_round_trips_padding_and_endianness(image, padding, big_endian):
    encoding, pixels = image
    msg = raw_image_msg(pixels, encoding, padding, big_endian)

    result = image_msg_to_numpy(msg)

    assert result.shape == pixels.shape
    assert result.dtype == SUPPORTED_ENCODINGS[encoding].dtype
    assert result.dtype.isnative
    assert result.flags.c_contiguous
    np.testing.assert_array_equal(result, pixels)
    assert not np.shares_memory(result, _message_buffer(msg))


def test_image_msg_to_numpy_does_not_alias_the_message():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    msg = raw_image_msg(pixels, 'mono8')

    result = image_msg_to_numpy(msg)
    result[:] = 0
    msg.data[0] = 200

    assert result[0, 0] == 0
    np.testing.assert_array_equal(image_msg_to_numpy(msg)[1:], pixels[1:])
    assert image_msg_to_numpy(msg)[0, 0] == 200


def test_built_messages_store_their_data_array_without_a_per_publish_copy():
    """Kilted's uint8[] setter copies an array.array unless the message checks its fields."""
    for msg in (numpy_to_image_msg(np.zeros((4, 6), np.uint16), 'mono16'),
                numpy_to_compressed_msg(np.zeros((4, 6, 3), np.uint8), 'png')):
        data = array.array('B', b'\x01\x02')
        msg.data = data
        assert msg.data is data


@pytest.mark.parametrize('big_endian, expected', [(1, 0x0102), (0, 0x0201)])
def test_is_bigendian_selects_byte_order(big_endian, expected):
    msg = Image(height=1, width=1, encoding='mono16', is_bigendian=big_endian, step=2,
                data=array.array('B', [0x01, 0x02]))

    assert image_msg_to_numpy(msg)[0, 0] == expected


def test_big_endian_float_depth():
    depth = np.array([[0.5, -2.25, np.inf], [np.nan, 1e-3, 7.0]], dtype=np.float32)
    msg = Image(height=2, width=3, encoding='32FC1', is_bigendian=1, step=12,
                data=array.array('B', depth.astype('>f4').tobytes()))

    np.testing.assert_array_equal(image_msg_to_numpy(msg), depth)


def test_duck_typed_message_with_bytes_data():
    class FakeImage:
        height, width, encoding, is_bigendian, step = 2, 2, 'rgb8', 0, 7
        data = bytes(range(14))

    result = image_msg_to_numpy(FakeImage())

    expected = np.array(
        [[[0, 1, 2], [3, 4, 5]], [[7, 8, 9], [10, 11, 12]]], dtype=np.uint8)
    np.testing.assert_array_equal(result, expected)


# --- Image -> RGB for the engines -------------------------------------------------------

@PROPERTY_SETTINGS
@given(image=images(encodings=CHANNEL_ORDER_ENCODINGS), padding=st.integers(0, 5))
def test_image_msg_to_rgb_orders_channels(image, padding):
    encoding, pixels = image
    msg = raw_image_msg(pixels, encoding, padding)

    rgb = image_msg_to_rgb(msg)

    if encoding == 'mono8':
        expected = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)
    else:
        expected = pixels[:, :, RGB_INDEX[encoding]]
    assert rgb.dtype == np.uint8
    assert rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, expected)
    assert not np.shares_memory(rgb, _message_buffer(msg))


@PROPERTY_SETTINGS
@given(image=images(encodings=tuple(sorted(RGB_SOURCE_ENCODINGS))), padding=st.integers(0, 5))
def test_image_msg_to_rgb_without_copy_gives_the_same_pixels(image, padding):
    encoding, pixels = image
    msg = raw_image_msg(pixels, encoding, padding)

    view = image_msg_to_rgb(msg, copy=False)

    np.testing.assert_array_equal(view, image_msg_to_rgb(msg))
    assert view.dtype == np.uint8 and view.flags.c_contiguous
    # Only rgb8 rows that follow each other without padding (or a single row) already are
    # the engines' layout; everything else is converted into a new array.
    in_place = encoding == 'rgb8' and (padding == 0 or pixels.shape[0] == 1)
    assert np.shares_memory(view, _message_buffer(msg)) == in_place


def test_image_msg_to_rgb_view_of_immutable_data_is_read_only():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    msg = SimpleNamespace(height=2, width=3, encoding='rgb8', is_bigendian=0, step=9,
                          data=pixels.tobytes())

    view = image_msg_to_rgb(msg, copy=False)

    np.testing.assert_array_equal(view, pixels)
    assert not view.flags.writeable  # the engines only read frames; a write would raise


@pytest.mark.parametrize('encoding', ['mono16', '16UC1', '32FC1', '16UC3', '8UC1', '8UC3'])
def test_image_msg_to_rgb_rejects_non_colour_encodings(encoding):
    spec = SUPPORTED_ENCODINGS[encoding]
    msg = raw_image_msg(np.zeros(_shape(encoding, 2, 3), dtype=spec.dtype), encoding)

    with pytest.raises(ValueError, match=f"'{encoding}' images cannot be fed to the engines"):
        image_msg_to_rgb(msg)


def _bayer_mosaic(rgb, tile):
    """Keep, at each pixel, the one channel its filter passes (``tile`` row by row)."""
    mosaic = np.empty(rgb.shape[:2], np.uint8)
    for (dy, dx), colour in zip([(0, 0), (0, 1), (1, 0), (1, 1)], tile, strict=True):
        channel = 'RGB'.index(colour)
        mosaic[dy::2, dx::2] = rgb[dy::2, dx::2, channel]
    return mosaic


@pytest.mark.parametrize('encoding', sorted(BAYER_TILES))
@pytest.mark.parametrize('size', [(6, 8), (5, 7)])
def test_bayer_mosaics_are_demosaiced_with_their_own_pattern(encoding, size):
    # A flat colour with three distinct channels: reading the mosaic with another pattern
    # swaps red and blue or mixes green in, everywhere.
    rgb = np.empty(size + (3,), np.uint8)
    rgb[:] = (200, 110, 30)
    msg = raw_image_msg(_bayer_mosaic(rgb, BAYER_TILES[encoding]), encoding, padding=3)

    check_rgb_image_msg(msg)
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)
    np.testing.assert_array_equal(image_msg_to_rgb(msg, copy=False), rgb)


def _yuv422(rgb, order):
    """Encode RGB as BT.601 video-range YUV 4:2:2 (chroma of each pixel pair averaged)."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    u = (u[:, 0::2] + u[:, 1::2]) / 2
    v = (v[:, 0::2] + v[:, 1::2]) / 2
    planes = {'Y0': y[:, 0::2], 'Y1': y[:, 1::2], 'U': u, 'V': v}
    byte_order = {'UYVY': ('U', 'Y0', 'V', 'Y1'), 'YUYV': ('Y0', 'U', 'Y1', 'V')}[order]
    pairs = np.stack([planes[name] for name in byte_order], axis=-1)
    return np.round(pairs).astype(np.uint8).reshape(rgb.shape[0], rgb.shape[1], 2)


@pytest.mark.parametrize('encoding', sorted(YUV422_ORDERS))
def test_yuv422_is_decoded_in_its_byte_order(encoding):
    colours = np.array([(200, 110, 30), (30, 160, 220), (90, 90, 90), (240, 20, 120)],
                       np.uint8)
    rgb = np.repeat(np.repeat(colours[np.newaxis], 2, axis=1), 3, axis=0)  # 3 x 8 pixels
    msg = raw_image_msg(_yuv422(rgb, YUV422_ORDERS[encoding]), encoding, padding=2)

    check_rgb_image_msg(msg)
    decoded = image_msg_to_rgb(msg)

    assert decoded.shape == rgb.shape
    # Video range rounds to about one level per channel; a swapped U/V or byte order is off
    # by tens.
    assert np.abs(decoded.astype(int) - rgb).max() <= 2, decoded[0, ::2]


@pytest.mark.parametrize('encoding', sorted(YUV422_ORDERS))
def test_yuv422_of_odd_width_is_refused(encoding):
    msg = raw_image_msg(np.zeros((2, 5, 2), np.uint8), encoding)

    for convert in (check_rgb_image_msg, image_msg_to_rgb):
        with pytest.raises(ValueError, match=f'{encoding} images need an even width .* 5'):
            convert(msg)


def test_compressed_raw_sensor_encodings():
    rgb = np.empty((4, 6, 3), np.uint8)
    rgb[:] = (200, 110, 30)
    # A Bayer image is compressed as its single-channel mosaic and demosaiced after decoding.
    mosaic = _bayer_mosaic(rgb, 'GRBG')
    msg = CompressedImage(format='bayer_grbg8; png compressed ', data=_png(mosaic))
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), rgb)
    # compressed_image_transport turns a YUV image into bgr8 before compressing it.
    msg = CompressedImage(format='yuyv; png compressed bgr8', data=_png(rgb[..., ::-1]))
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), rgb)


# --- Image validation -------------------------------------------------------------------

def _msg(**fields):
    base = dict(height=2, width=3, encoding='rgb8', is_bigendian=0, step=9,
                data=array.array('B', bytes(18)))
    base.update(fields)
    return Image(**base)


def test_rejects_data_length_mismatch():
    msg = _msg(data=array.array('B', bytes(17)))

    with pytest.raises(ValueError, match=r'has 17 bytes, expected height \* step = 2 \* 9 = 18'):
        image_msg_to_numpy(msg)


def test_rejects_extra_data():
    with pytest.raises(ValueError, match=r'has 19 bytes, expected .* = 18'):
        image_msg_to_numpy(_msg(data=array.array('B', bytes(19))))


def test_rejects_step_smaller_than_row():
    msg = _msg(step=8, data=array.array('B', bytes(16)))

    with pytest.raises(ValueError, match=r'step 8 is smaller than .* = 3 \* 3 = 9'):
        image_msg_to_numpy(msg)


def test_rejects_step_smaller_than_row_for_16_bit():
    msg = _msg(encoding='mono16', step=5, data=array.array('B', bytes(10)))

    with pytest.raises(ValueError, match=r'step 5 is smaller than .* = 3 \* 2 = 6'):
        image_msg_to_numpy(msg)


@pytest.mark.parametrize('height, width', [(0, 3), (2, 0), (0, 0)])
def test_rejects_zero_size(height, width):
    msg = _msg(height=height, width=width, step=width * 3, data=array.array('B'))

    with pytest.raises(ValueError, match=f'zero size: height={height}, width={width}'):
        image_msg_to_numpy(msg)


@pytest.mark.parametrize('height, width', [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1)])
def test_rejects_side_over_default_limit(height, width):
    # The limit is checked before the buffer, so no huge message is needed.
    msg = _msg(height=height, width=width, step=width * 3, data=array.array('B'))

    with pytest.raises(ValueError, match=f'{width}x{height} pixels exceeds the 8192-pixel'):
        image_msg_to_numpy(msg)


def test_side_limit_is_a_parameter():
    pixels = np.zeros((4, 17), dtype=np.uint8)
    msg = raw_image_msg(pixels, 'mono8')

    with pytest.raises(ValueError, match='17x4 pixels exceeds the 16-pixel side limit'):
        image_msg_to_numpy(msg, max_side=16)
    assert image_msg_to_numpy(msg, max_side=17).shape == (4, 17)


@pytest.mark.parametrize('encoding', ['nv12', 'rgb16', 'bayer_rggb16', '', 'RGB8'])
def test_rejects_unknown_encoding(encoding):
    with pytest.raises(ValueError, match=f"unsupported image encoding '{encoding}'"):
        image_msg_to_numpy(_msg(encoding=encoding))


def test_rejects_out_of_range_list_data():
    class FakeImage:
        height, width, encoding, is_bigendian, step = 1, 1, 'mono8', 0, 1
        data = [300]

    with pytest.raises(ValueError, match='not a sequence of bytes'):
        image_msg_to_numpy(FakeImage())


# --- the callback's checks: the conversion's refusals, before any pixel is read ---------

@pytest.mark.parametrize('fields, message', [
    (dict(data=array.array('B', bytes(17))), 'has 17 bytes'),
    (dict(step=8, data=array.array('B', bytes(16))), 'step 8 is smaller'),
    (dict(height=0, data=array.array('B')), 'zero size'),
    (dict(width=MAX_IMAGE_SIDE + 1, step=3 * (MAX_IMAGE_SIDE + 1), data=array.array('B')),
     'exceeds the 8192-pixel side limit'),
    (dict(encoding='nv12'), "unsupported image encoding 'nv12'"),
    (dict(encoding='mono16', step=6, data=array.array('B', bytes(12))),
     "'mono16' images cannot be fed to the engines"),
])
def test_check_rgb_image_msg_refuses_what_the_conversion_refuses(fields, message):
    msg = _msg(**fields)

    with pytest.raises(ValueError, match=message):
        image_msg_to_rgb(msg)
    with pytest.raises(ValueError, match=message):
        check_rgb_image_msg(msg)


def test_check_rgb_image_msg_side_limit_is_a_parameter():
    msg = raw_image_msg(np.zeros((4, 17, 3), np.uint8), 'rgb8')

    with pytest.raises(ValueError, match='17x4 pixels exceeds the 16-pixel side limit'):
        check_rgb_image_msg(msg, max_side=16)
    check_rgb_image_msg(msg, max_side=17)


@pytest.mark.parametrize('encoding', sorted(RGB_SOURCE_ENCODINGS))
def test_check_rgb_image_msg_passes_every_convertible_image(encoding):
    msg = raw_image_msg(np.zeros(_shape(encoding, 2, 4), np.uint8), encoding, padding=2)

    check_rgb_image_msg(msg)
    assert image_msg_to_rgb(msg).shape == (2, 4, 3)


def _png(pixels):
    return cv2.imencode('.png', pixels)[1].tobytes()


def _png_claiming_width(width):
    data = bytearray(_png(np.zeros((2, 2), np.uint8)))
    data[16:20] = struct.pack('>I', width)  # IHDR width
    return bytes(data)


@pytest.mark.parametrize('data, fmt, message', [
    (b'', 'rgb8; jpeg compressed bgr8', 'has no data'),
    (_png_claiming_width(MAX_IMAGE_SIDE + 1), 'mono8; png compressed ',
     '8193x2 pixels exceeds the 8192-pixel side limit'),
    (_png(np.ones((3, 3), np.uint16)), 'mono16; png compressed ',
     "'mono16' images cannot be fed to the engines"),
    (struct.pack('<iff', 0, 0.0, 0.0) + _png(np.ones((3, 3), np.uint16)),
     '16UC1; compressedDepth png', "'16UC1' images cannot be fed to the engines"),
    (_png(np.zeros((3, 3, 3), np.uint8)), 'nv12; png compressed ',
     "unsupported image encoding 'nv12'"),
])
def test_check_rgb_compressed_msg_refuses_what_the_conversion_refuses(data, fmt, message):
    msg = _compressed(data, fmt)

    with pytest.raises(ValueError, match=message):
        compressed_msg_to_rgb(msg)
    with pytest.raises(ValueError, match=message):
        check_rgb_compressed_msg(msg)


@pytest.mark.parametrize('fmt', ['rgb8; jpeg compressed bgr8', 'bgr8; png compressed bgr8',
                                 'png', 'jpeg'])
def test_check_rgb_compressed_msg_passes_decodable_colour(fmt):
    codec = 'jpeg' if 'jpeg' in fmt else 'png'
    msg = _compressed(numpy_to_compressed_msg(_smooth_rgb(), codec).data, fmt)

    check_rgb_compressed_msg(msg)
    assert compressed_msg_to_rgb(msg).shape == (24, 33, 3)


def test_check_rgb_compressed_msg_leaves_undecodable_data_to_the_decoder():
    msg = _compressed(_png(_smooth_rgb())[:60], 'png')  # a whole header, a cut-off image

    check_rgb_compressed_msg(msg)  # the check reads no pixel data...
    with pytest.raises(ValueError, match='could not decode'):
        compressed_msg_to_rgb(msg)  # ...so the conversion still refuses it


# --- numpy -> Image ---------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(image=images())
def test_numpy_to_image_msg_round_trip(image):
    encoding, pixels = image
    spec = SUPPORTED_ENCODINGS[encoding]

    msg = numpy_to_image_msg(pixels, encoding)

    assert isinstance(msg, Image)
    assert (msg.height, msg.width, msg.encoding) == (pixels.shape[0], pixels.shape[1], encoding)
    assert msg.is_bigendian == 0
    assert msg.step == pixels.shape[1] * spec.bytes_per_pixel
    assert bytes(msg.data) == pixels.astype(spec.dtype.newbyteorder('<')).tobytes()
    np.testing.assert_array_equal(image_msg_to_numpy(msg), pixels)


def test_numpy_to_image_msg_copies_header_and_accepts_trailing_channel_axis():
    header = Header(frame_id='orchard_cam')
    header.stamp.sec, header.stamp.nanosec = 12, 345
    labels = np.array([[0, 1, 65535]], dtype=np.uint16)[:, :, np.newaxis]

    msg = numpy_to_image_msg(labels, 'mono16', header=header)

    assert msg.header.frame_id == 'orchard_cam'
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (12, 345)
    np.testing.assert_array_equal(image_msg_to_numpy(msg), labels[:, :, 0])


def test_numpy_to_image_msg_of_non_contiguous_and_big_endian_arrays():
    base = np.arange(40, dtype='>u2').reshape(5, 8)
    view = base[::2, 1::3]

    msg = numpy_to_image_msg(view, '16UC1')

    np.testing.assert_array_equal(image_msg_to_numpy(msg), view)


@pytest.mark.parametrize('pixels, encoding, message', [
    (np.zeros((2, 2), np.int32), 'mono16', 'mono16 needs uint16 data, got int32'),
    (np.zeros((2, 2), np.int16), 'mono16', 'mono16 needs uint16 data, got int16'),
    (np.zeros((2, 2), bool), 'mono8', 'mono8 needs uint8 data, got bool'),
    (np.zeros((2, 2), np.float64), '32FC1', '32FC1 needs float32 data, got float64'),
    (np.zeros((2, 2, 3), np.uint16), 'mono16', r'shape \(H, W\), got \(2, 2, 3\)'),
    (np.zeros((2, 2), np.uint8), 'rgb8', r'shape \(H, W, 3\), got \(2, 2\)'),
    (np.zeros((2, 2, 3), np.uint8), 'rgba8', r'shape \(H, W, 4\), got \(2, 2, 3\)'),
    (np.zeros((0, 2, 3), np.uint8), 'rgb8', 'zero size: height=0, width=2'),
    (np.zeros((2, 2), np.uint8), 'nv12', "unsupported image encoding 'nv12'"),
])
def test_numpy_to_image_msg_validates(pixels, encoding, message):
    with pytest.raises(ValueError, match=message):
        numpy_to_image_msg(pixels, encoding)


def test_numpy_to_image_msg_rejects_non_arrays():
    with pytest.raises(TypeError, match='expected a numpy array, got list'):
        numpy_to_image_msg([[1, 2]], 'mono8')


# --- CompressedImage --------------------------------------------------------------------

@PROPERTY_SETTINGS
@given(labels=hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, max_side=17)))
@example(labels=np.array([[0, 65535, 1], [256, 255, 65280]], dtype=np.uint16))
def test_mono16_png_round_trip_is_lossless(labels):
    msg = numpy_to_compressed_msg(labels, 'png')

    decoded = compressed_msg_to_numpy(msg)

    assert isinstance(msg, CompressedImage)
    assert msg.format == 'mono16; png compressed '
    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, labels)


def test_label_image_png_round_trip():
    masks = [np.zeros((9, 13), bool) for _ in range(3)]
    masks[0][1:4, 2:7] = True
    masks[1][3:8, 5:12] = True
    masks[2][0, 0] = True
    labels = label_image(masks, [7, 40000, 65535], (9, 13), scores=[0.9, 0.5, 0.1])

    decoded = compressed_msg_to_numpy(
        numpy_to_compressed_msg(labels, 'png', encoding='16UC1'))

    np.testing.assert_array_equal(decoded, labels)


@pytest.mark.parametrize('pixels, encoding', [
    (np.zeros((4, 4), np.uint16), None),
    (np.zeros((4, 4), np.uint16), 'mono16'),
    (np.zeros((4, 4), np.uint16), '16UC1'),
    (np.zeros((4, 4), np.uint8), 'mono8'),
    (np.zeros((4, 4), np.uint8), None),
])
@pytest.mark.parametrize('fmt', ['jpeg', 'jpg', 'JPEG'])
def test_jpeg_refused_for_labels_and_masks(pixels, encoding, fmt):
    with pytest.raises(ValueError, match='jpeg is lossy .* must be sent as png'):
        numpy_to_compressed_msg(pixels, fmt, encoding=encoding)


def _smooth_rgb(height=24, width=33):
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 90)],
                    axis=2).astype(np.uint8)


@pytest.mark.parametrize('encoding', ['rgb8', 'bgr8'])
def test_jpeg_overlay_keeps_channel_order(encoding):
    rgb = _smooth_rgb()
    rgb[:8, :8] = (255, 0, 0)
    pixels = rgb if encoding == 'rgb8' else np.ascontiguousarray(rgb[:, :, ::-1])
    header = Header(frame_id='overlay')

    msg = numpy_to_compressed_msg(pixels, 'jpeg', header=header, encoding=encoding)
    decoded_rgb = compressed_msg_to_rgb(msg)

    assert msg.format == f'{encoding}; jpeg compressed bgr8'
    assert msg.header.frame_id == 'overlay'
    assert bytes(msg.data[:2]) == b'\xff\xd8'
    assert decoded_rgb.shape == rgb.shape
    assert np.abs(decoded_rgb.astype(int) - rgb).mean() < 4.0
    red = decoded_rgb[2:6, 2:6].reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 50 and red[2] < 50
    assert compressed_msg_to_numpy(msg).shape == pixels.shape


@PROPERTY_SETTINGS
@given(image=images(encodings=('rgb8', 'bgr8', 'mono8'), max_height=7, max_width=11))
def test_png_colour_round_trip_is_exact(image):
    encoding, pixels = image

    msg = numpy_to_compressed_msg(pixels, 'png', encoding=encoding)

    np.testing.assert_array_equal(compressed_msg_to_numpy(msg), pixels)
    expected_rgb = (np.repeat(pixels[:, :, np.newaxis], 3, axis=2) if encoding == 'mono8'
                    else pixels[:, :, RGB_INDEX[encoding]])
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg), expected_rgb)


def test_png_of_rgba_keeps_colour_and_makes_alpha_opaque():
    # image_transport stores colour as 3-channel BGR, so alpha does not survive.
    rgba = np.random.default_rng(3).integers(0, 256, (5, 6, 4), dtype=np.uint8)

    decoded = compressed_msg_to_numpy(numpy_to_compressed_msg(rgba, 'png'))

    np.testing.assert_array_equal(decoded[:, :, :3], rgba[:, :, :3])
    assert (decoded[:, :, 3] == 255).all()


def _compressed(data, fmt):
    return CompressedImage(format=fmt, data=array.array('B', bytes(data)))


def test_decodes_image_transport_formats():
    rgb = np.random.default_rng(5).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    _, png_bgr = cv2.imencode('.png', bgr)
    gray = rgb[:, :, 1].copy()
    _, png_gray = cv2.imencode('.png', gray)

    np.testing.assert_array_equal(
        compressed_msg_to_numpy(_compressed(png_bgr, 'rgb8; png compressed bgr8')), rgb)
    np.testing.assert_array_equal(
        compressed_msg_to_numpy(_compressed(png_bgr, 'bgr8; png compressed bgr8')), bgr)
    bgra = compressed_msg_to_numpy(_compressed(png_bgr, 'bgra8; png compressed bgr8'))
    np.testing.assert_array_equal(bgra[:, :, :3], bgr)
    np.testing.assert_array_equal(
        compressed_msg_to_numpy(_compressed(png_gray, 'mono8; png compressed ')), gray)
    # Legacy publishers (and cv_bridge's cv2_to_compressed_imgmsg) write a bare codec name;
    # the data is then in OpenCV's BGR order.
    np.testing.assert_array_equal(compressed_msg_to_numpy(_compressed(png_bgr, 'png')), bgr)
    np.testing.assert_array_equal(compressed_msg_to_rgb(_compressed(png_bgr, 'png')), rgb)
    np.testing.assert_array_equal(compressed_msg_to_numpy(_compressed(png_gray, '')), gray)


def test_compressed_rgb_rejects_depth():
    msg = numpy_to_compressed_msg(np.ones((3, 3), np.uint16), 'png')

    with pytest.raises(ValueError, match="'mono16' images cannot be fed to the engines"):
        compressed_msg_to_rgb(msg)


def test_compressed_channel_mismatch_is_reported():
    _, png_gray = cv2.imencode('.png', np.zeros((3, 3), np.uint8))

    with pytest.raises(ValueError, match='decoded to 1 channels, expected 3'):
        compressed_msg_to_numpy(_compressed(png_gray, '8UC3; png compressed '))
    with pytest.raises(ValueError, match='decoded to uint8, expected uint16'):
        compressed_msg_to_numpy(_compressed(png_gray, 'mono16; png compressed '))


def test_compressed_depth_16uc1():
    depth_mm = np.random.default_rng(1).integers(0, 65536, (5, 9), dtype=np.uint16)
    _, png = cv2.imencode('.png', depth_mm)
    data = struct.pack('<iff', 0, 0.0, 0.0) + png.tobytes()

    decoded = compressed_msg_to_numpy(_compressed(data, '16UC1; compressedDepth png'))

    assert decoded.dtype == np.uint16
    np.testing.assert_array_equal(decoded, depth_mm)


def test_compressed_depth_32fc1_inverse_quantisation():
    # Encode the way compressed_depth_image_transport does: inverse depth, 0 = no depth.
    depth = np.array([[0.5, 1.0, 2.0], [4.0, 9.5, 20.0]], dtype=np.float32)
    depth_max, depth_quantization = 10.0, 100.0
    quant_a = np.float32(depth_quantization * (depth_quantization + 1.0))
    quant_b = np.float32(1.0 - quant_a / depth_max)
    inverse = np.where(depth < depth_max, quant_a / depth + quant_b, 0).astype(np.uint16)
    _, png = cv2.imencode('.png', inverse)
    data = struct.pack('<iff', 0, quant_a, quant_b) + png.tobytes()

    decoded = compressed_msg_to_numpy(_compressed(data, '32FC1; compressedDepth png'))

    assert decoded.dtype == np.float32
    valid = depth < depth_max
    np.testing.assert_allclose(decoded[valid], depth[valid], rtol=2e-3)
    assert np.isnan(decoded[~valid]).all()


def test_compressed_depth_rvl_and_truncated_data_rejected():
    with pytest.raises(ValueError, match="compressedDepth codec 'rvl' is not supported"):
        compressed_msg_to_numpy(_compressed(bytes(40), '16UC1; compressedDepth rvl'))
    with pytest.raises(ValueError, match='has 12 bytes, not even its 12-byte header'):
        compressed_msg_to_numpy(_compressed(bytes(12), '16UC1; compressedDepth png'))


@pytest.mark.parametrize('data, fmt, message', [
    (_png(np.zeros((4, 4), np.uint8))[:48], 'png', "could not decode 48 bytes .*format 'png'"),
    (b'not an image at all', 'png', "'png'.* not a PNG or JPEG .*starts with b'not an i'"),
    (b'\xff\xd8\xff\xe0 truncated jpeg', 'rgb8; jpeg compressed bgr8',
     'not a PNG or JPEG with a readable header'),
    (b'', 'rgb8; jpeg compressed bgr8', 'has no data'),
])
def test_undecodable_compressed_data(data, fmt, message):
    with pytest.raises(ValueError, match=message):
        compressed_msg_to_numpy(_compressed(data, fmt))


def test_oversized_png_refused_before_decoding():
    _, png = cv2.imencode('.png', np.zeros((2, 2), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = struct.pack('>II', MAX_IMAGE_SIDE + 1, 2)  # IHDR width, height

    with pytest.raises(ValueError, match='8193x2 pixels exceeds the 8192-pixel side limit'):
        compressed_msg_to_numpy(_compressed(data, 'mono8; png compressed '))


def test_compressed_side_limit_is_a_parameter():
    msg = numpy_to_compressed_msg(_smooth_rgb(12, 20), 'jpeg')

    with pytest.raises(ValueError, match='20x12 pixels exceeds the 16-pixel side limit'):
        compressed_msg_to_rgb(msg, max_side=16)


def _jpeg(pixels, *params):
    return cv2.imencode('.jpg', pixels, list(params))[1].tobytes()


def _jpeg_claiming_size(width, height):
    data = bytearray(_jpeg(np.zeros((16, 16, 3), np.uint8)))
    frame = data.index(b'\xff\xc0')  # baseline start of frame: length, precision, height, width
    data[frame + 5:frame + 9] = struct.pack('>HH', height, width)
    return bytes(data)


def _refuse_decoding(monkeypatch):
    def imdecode(*args):
        raise AssertionError('decoded data that the size check should have refused')
    monkeypatch.setattr(cv2, 'imdecode', imdecode)


@pytest.mark.parametrize('width', [MAX_IMAGE_SIDE + 1, 65535])
def test_oversized_jpeg_refused_before_decoding(monkeypatch, width):
    # A 600-byte JPEG can name 20000x20000 pixels: decoding it first costs gigabytes and
    # seconds, and the callback's check would let it take the frame slot.
    msg = _compressed(_jpeg_claiming_size(width, 2), 'rgb8; jpeg compressed bgr8')
    _refuse_decoding(monkeypatch)

    for convert in (check_rgb_compressed_msg, compressed_msg_to_rgb, compressed_msg_to_numpy):
        with pytest.raises(ValueError, match=f'{width}x2 pixels exceeds the 8192-pixel side'):
            convert(msg)


@pytest.mark.parametrize('extra', [
    b'',
    # An EXIF thumbnail in APP1 has a start of frame of its own, naming 65535x65535 here.
    b'\xff\xe1\x00\x0fExif\xff\xc0\x00\x11\x08\xff\xff\xff\xff',
    b'\xff\xff',  # fill bytes before the next marker
    b'\x12\x34',  # stray bytes between segments, which libjpeg skips with a warning
])
@pytest.mark.parametrize('params', [(), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
                                    (cv2.IMWRITE_JPEG_RST_INTERVAL, 2),
                                    (cv2.IMWRITE_JPEG_OPTIMIZE, 1)])
def test_jpeg_size_is_read_from_its_frame_header(extra, params):
    jpeg = _jpeg(_smooth_rgb(12, 20), *params)
    assert jpeg[2:6] == b'\xff\xe0\x00\x10'  # SOI, then a 16-byte APP0 (JFIF) segment
    msg = _compressed(jpeg[:20] + extra + jpeg[20:], 'bgr8; jpeg compressed bgr8')

    for convert in (check_rgb_compressed_msg, compressed_msg_to_rgb):
        with pytest.raises(ValueError, match='20x12 pixels exceeds the 16-pixel side limit'):
            convert(msg, max_side=16)
    check_rgb_compressed_msg(msg, max_side=20)
    bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg, max_side=20), bgr[:, :, ::-1])


@pytest.mark.parametrize('extension', ['.webp', '.tiff', '.bmp', '.ppm'])
def test_data_other_than_png_or_jpeg_refused_before_decoding(monkeypatch, extension):
    # OpenCV decodes these too, but their size is not read first: a 6 kB lossless WebP
    # decodes to 12000x12000 pixels. compressed_image_transport writes png and jpeg (and
    # tiff, meant for float depth).
    msg = _compressed(cv2.imencode(extension, _smooth_rgb())[1], 'rgb8; jpeg compressed bgr8')
    _refuse_decoding(monkeypatch)

    for convert in (check_rgb_compressed_msg, compressed_msg_to_rgb):
        with pytest.raises(ValueError, match='not a PNG or JPEG with a readable header'):
            convert(msg)


@pytest.mark.parametrize('encoding', [*sorted(BAYER_TILES), 'yuv422', 'yuv422_yuy2'])
def test_grey_jpeg_of_a_raw_sensor_layout_is_not_demosaiced(encoding):
    # JPEG holds grey or colour only, so compressed_image_transport has cv_bridge turn a
    # Bayer mosaic (and, in Humble, YUV) into mono8 first: the pixels are grey.
    grey = np.zeros((24, 33), np.uint8)
    grey[5:15, 7:20] = 200  # edges, where demosaicing grey paints false colour
    jpeg = _jpeg(grey, cv2.IMWRITE_JPEG_QUALITY, 100)
    msg = _compressed(jpeg, f'{encoding}; jpeg compressed mono8')

    check_rgb_compressed_msg(msg)
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(compressed_msg_to_rgb(msg),
                                  cv2.cvtColor(decoded, cv2.COLOR_GRAY2RGB))


@pytest.mark.parametrize('pixels, fmt, encoding, message', [
    (np.zeros((2, 2, 3), np.uint8), 'bmp', None, "unsupported compression format 'bmp'"),
    (np.zeros((2, 2), np.float32), 'png', None, 'cannot compress a float32 array'),
    (np.zeros((2, 2), np.float32), 'png', '32FC1', "cannot compress '32FC1' images"),
    (np.zeros((2, 2), np.int32), 'png', 'mono16', 'mono16 needs uint16 data, got int32'),
])
def test_numpy_to_compressed_msg_validates(pixels, fmt, encoding, message):
    with pytest.raises(ValueError, match=message):
        numpy_to_compressed_msg(pixels, fmt, encoding=encoding)


@pytest.mark.parametrize('fmt, expected', [
    ('rgb8; jpeg compressed bgr8', ('rgb8', 'jpeg', True, False)),
    ('mono16; png compressed ', ('mono16', 'png', False, False)),
    ('bgr8; png compressed rgb8', ('bgr8', 'png', False, False)),
    ('16UC1; compressedDepth png', ('16UC1', 'png', False, True)),
    ('32FC1; compressedDepth', ('32FC1', 'png', False, True)),
    ('16UC1; compressedDepth rvl', ('16UC1', 'rvl', False, True)),
    ('jpeg', (None, 'jpeg', True, False)),
    ('PNG', (None, 'png', True, False)),
])
def test_parse_compressed_format(fmt, expected):
    assert tuple(parse_compressed_format(fmt)) == expected


# --- cv_bridge reference ----------------------------------------------------------------

def test_matches_cv_bridge():
    try:
        from cv_bridge import CvBridge
    except ImportError:
        pytest.skip(CV_BRIDGE_SKIP_REASON)
    bridge = CvBridge()
    rng = np.random.default_rng(11)
    for encoding, spec in sorted(SUPPORTED_ENCODINGS.items()):
        shape = _shape(encoding, 5, 8)  # an even width: YUV 4:2:2 pixels come in pairs
        if spec.dtype.kind == 'f':
            pixels = rng.standard_normal(shape).astype(spec.dtype)
        else:
            pixels = rng.integers(0, np.iinfo(spec.dtype).max, shape, dtype=spec.dtype)
        ours = numpy_to_image_msg(pixels, encoding)
        np.testing.assert_array_equal(bridge.imgmsg_to_cv2(ours), image_msg_to_numpy(ours))
        theirs = bridge.cv2_to_imgmsg(pixels, encoding)
        np.testing.assert_array_equal(image_msg_to_numpy(theirs), pixels)
        # cv_bridge releases differ on the newer YUV names (uyvy, yuyv); the older ones
        # name the same layouts.
        if encoding in RGB_SOURCE_ENCODINGS - {'uyvy', 'yuyv'}:
            np.testing.assert_array_equal(bridge.imgmsg_to_cv2(ours, 'rgb8'),
                                          image_msg_to_rgb(ours))
