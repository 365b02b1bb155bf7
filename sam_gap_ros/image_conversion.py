"""The one conversion between ROS image messages and numpy arrays.

cv_bridge cannot be installed from PyPI for ROS 2, so this module replaces it for the
encodings this package meets. It works on real ``sensor_msgs.msg.Image`` and
``CompressedImage`` messages, or on any object with the same fields; the message
classes are only imported when a message has to be built.

Array layout follows cv_bridge: single-channel encodings give ``(H, W)`` arrays,
multi-channel ones ``(H, W, C)`` in the channel order the encoding names. Every array
returned is C-contiguous and in native byte order, and is a copy that does not alias the
message, except where a caller that owns the message asks ``image_msg_to_rgb`` for a
view (``copy=False``).
"""

from __future__ import annotations

import array
import re
import struct
from types import MappingProxyType
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple, TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:  # the message classes are imported lazily, only to build messages
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import Header

# Frames wider or taller than this are refused before any buffer is touched: such a
# message is almost certainly corrupt, and converting it would allocate gigabytes.
MAX_IMAGE_SIDE = 8192


class EncodingSpec(NamedTuple):
    """Element type and channel count of one ROS image encoding."""

    dtype: np.dtype
    channels: int

    @property
    def bytes_per_pixel(self) -> int:
        """Return the size of one pixel in bytes."""
        return self.dtype.itemsize * self.channels


SUPPORTED_ENCODINGS: Mapping[str, EncodingSpec] = MappingProxyType({
    'rgb8': EncodingSpec(np.dtype(np.uint8), 3),
    'bgr8': EncodingSpec(np.dtype(np.uint8), 3),
    'rgba8': EncodingSpec(np.dtype(np.uint8), 4),
    'bgra8': EncodingSpec(np.dtype(np.uint8), 4),
    'mono8': EncodingSpec(np.dtype(np.uint8), 1),
    '8UC1': EncodingSpec(np.dtype(np.uint8), 1),
    '8UC3': EncodingSpec(np.dtype(np.uint8), 3),
    'mono16': EncodingSpec(np.dtype(np.uint16), 1),
    '16UC1': EncodingSpec(np.dtype(np.uint16), 1),
    '16UC3': EncodingSpec(np.dtype(np.uint16), 3),
    '32FC1': EncodingSpec(np.dtype(np.float32), 1),
    # Raw sensor layouts: a Bayer mosaic (one byte per pixel, the colour of the pixel's
    # filter) as industrial GigE/USB3 cameras send it, and YUV 4:2:2 (two bytes per pixel,
    # chroma shared by pixel pairs) as UVC webcams and v4l2 drivers send it. 'yuv422' and
    # 'yuv422_yuy2' are the older names of 'uyvy' and 'yuyv'.
    'bayer_rggb8': EncodingSpec(np.dtype(np.uint8), 1),
    'bayer_bggr8': EncodingSpec(np.dtype(np.uint8), 1),
    'bayer_gbrg8': EncodingSpec(np.dtype(np.uint8), 1),
    'bayer_grbg8': EncodingSpec(np.dtype(np.uint8), 1),
    'uyvy': EncodingSpec(np.dtype(np.uint8), 2),
    'yuv422': EncodingSpec(np.dtype(np.uint8), 2),
    'yuyv': EncodingSpec(np.dtype(np.uint8), 2),
    'yuv422_yuy2': EncodingSpec(np.dtype(np.uint8), 2),
})

# Channel layout of the encodings that carry colour meaning; generic ones (8UC3 ...)
# have no channel order, so, as in cv_bridge, they are never colour-converted.
_COLOUR_LAYOUTS: Mapping[str, str] = MappingProxyType({
    'rgb8': 'RGB',
    'bgr8': 'BGR',
    'rgba8': 'RGBA',
    'bgra8': 'BGRA',
    'mono8': 'GRAY',
    'bayer_rggb8': 'BAYER_RGGB',
    'bayer_bggr8': 'BAYER_BGGR',
    'bayer_gbrg8': 'BAYER_GBRG',
    'bayer_grbg8': 'BAYER_GRBG',
    'uyvy': 'UYVY',
    'yuv422': 'UYVY',
    'yuyv': 'YUYV',
    'yuv422_yuy2': 'YUYV',
})

# Raw sensor layouts and their OpenCV conversion to RGB (they are only ever a source).
# OpenCV names a Bayer pattern after the second row's second and third pixels, so ROS's
# RGGB (red at the top-left) is OpenCV's BayerBG, as in cv_bridge. Demosaicing is bilinear,
# as cv_bridge and image_proc's default do; YUV 4:2:2 decodes as BT.601 video range.
_RAW_TO_RGB: Mapping[str, int] = MappingProxyType({
    'BAYER_RGGB': cv2.COLOR_BayerBG2RGB,
    'BAYER_BGGR': cv2.COLOR_BayerRG2RGB,
    'BAYER_GBRG': cv2.COLOR_BayerGR2RGB,
    'BAYER_GRBG': cv2.COLOR_BayerGB2RGB,
    'UYVY': cv2.COLOR_YUV2RGB_UYVY,
    'YUYV': cv2.COLOR_YUV2RGB_YUY2,
})
_PIXEL_PAIR_LAYOUTS = frozenset(('UYVY', 'YUYV'))

# Encodings image_msg_to_rgb / compressed_msg_to_rgb accept: what the engines can be fed.
RGB_SOURCE_ENCODINGS = frozenset(_COLOUR_LAYOUTS)

# Encodings numpy_to_compressed_msg can write (OpenCV's PNG holds 8- and 16-bit integers).
COMPRESSIBLE_ENCODINGS = frozenset(
    ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', '8UC1', 'mono16', '16UC1'))

# compressed_depth_image_transport prefixes its PNG with a 12-byte ConfigHeader:
# int32 format, float32 depthQuantA, float32 depthQuantB (host order, little-endian in
# practice).
_DEPTH_HEADER = struct.Struct('<iff')
_PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
_JPEG_SIGNATURE = b'\xff\xd8'
# A JPEG marker is 0xFF, any number of 0xFF fill bytes, then the marker's code.
_JPEG_MARKER_PREFIX = re.compile(rb'\xff+')
# Start-of-frame codes (they hold the image size): 0xC0-0xCF but DHT, JPG and DAC.
_JPEG_FRAME_CODES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Codes of markers without a length field: stuffed 0x00, TEM, RST0-7 and SOI.
_JPEG_BARE_CODES = frozenset((0x00, 0x01, *range(0xD0, 0xD9)))
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA


class CompressedFormat(NamedTuple):
    """Parsed ``CompressedImage.format`` string."""

    encoding: Optional[str]
    codec: str
    compressed_bgr: bool
    depth: bool


def _encoding_spec(encoding: str) -> EncodingSpec:
    spec = SUPPORTED_ENCODINGS.get(encoding)
    if spec is None:
        raise ValueError(
            f'unsupported image encoding {encoding!r}; supported: '
            f'{", ".join(sorted(SUPPORTED_ENCODINGS))}')
    return spec


def _check_side_lengths(height: int, width: int, max_side: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f'image has zero size: height={height}, width={width}')
    if height > max_side or width > max_side:
        raise ValueError(
            f'image of {width}x{height} pixels exceeds the {max_side}-pixel side limit')


def _message_bytes(data: Any) -> np.ndarray:
    """Return the message's ``data`` as a flat uint8 array, without copying if possible."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        pass
    # A plain list of ints, as a duck-typed message may carry.
    try:
        return np.asarray(data, dtype=np.uint8).reshape(-1)
    except (OverflowError, TypeError) as error:
        raise ValueError(f'image data is not a sequence of bytes: {error}') from error


def _message_view(msg: Any, max_side: int) -> np.ndarray:
    """Return a validated ``(H, W, C)`` view of an Image message's buffer.

    The view may be read-only, padded between rows and in non-native byte order;
    callers copy it.
    """
    encoding = msg.encoding
    spec = _encoding_spec(encoding)
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    _check_side_lengths(height, width, max_side)
    row_bytes = width * spec.bytes_per_pixel
    if step < row_bytes:
        raise ValueError(
            f'{encoding} image step {step} is smaller than width * bytes_per_pixel = '
            f'{width} * {spec.bytes_per_pixel} = {row_bytes}')
    buffer = _message_bytes(msg.data)
    if buffer.size != height * step:
        raise ValueError(
            f'{encoding} image data has {buffer.size} bytes, expected height * step = '
            f'{height} * {step} = {height * step}')
    dtype = spec.dtype
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder('>' if msg.is_bigendian else '<')
    return np.ndarray(
        shape=(height, width, spec.channels), dtype=dtype, buffer=buffer,
        strides=(step, spec.bytes_per_pixel, dtype.itemsize))


def _squeeze_single_channel(image: np.ndarray) -> np.ndarray:
    return image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image


def _convert_layout(image: np.ndarray, source: str, target: str,
                    copy: bool = True) -> np.ndarray:
    """Return ``image``'s channels rearranged to ``target`` as a C-contiguous uint8 array.

    A new array, unless ``copy`` is False and ``image`` already has that layout and is
    contiguous: then ``image`` itself.
    """
    if source == target:
        return np.array(image, order='C', copy=True if copy else None)
    if source == 'GRAY' or source.startswith('BAYER'):
        image = _squeeze_single_channel(image)
    if source in _RAW_TO_RGB and target == 'RGB':
        return cv2.cvtColor(image, _RAW_TO_RGB[source])
    code = getattr(cv2, f'COLOR_{source}2{target}', None)
    if code is None:
        raise ValueError(f'no conversion from {source} to {target} channel layout')
    return cv2.cvtColor(image, code)


def _rgb_layout(encoding: str) -> str:
    layout = _COLOUR_LAYOUTS.get(encoding)
    if layout is None:
        _encoding_spec(encoding)
        raise ValueError(
            f'{encoding!r} images cannot be fed to the engines as RGB (depth, 16-bit or '
            f'generic encodings have no colour meaning); accepted: '
            f'{", ".join(sorted(RGB_SOURCE_ENCODINGS))}')
    return layout


def image_msg_to_numpy(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Return the pixels of a ``sensor_msgs/Image`` as a new numpy array.

    Single-channel encodings give ``(H, W)``, others ``(H, W, C)``, in the dtype of
    ``SUPPORTED_ENCODINGS[msg.encoding]``. Row padding (``step``) and ``is_bigendian`` are
    honoured. Raises ValueError for unsupported encodings, empty or oversized images, a
    too-small step, or a data length other than ``height * step``.
    """
    view = _message_view(msg, max_side)
    native = view.dtype.newbyteorder('=')
    return _squeeze_single_channel(view.astype(native, order='C', copy=True))


def image_msg_to_rgb(msg: Any, max_side: int = MAX_IMAGE_SIDE, *,
                     copy: bool = True) -> np.ndarray:
    """Return a ``sensor_msgs/Image`` as an ``(H, W, 3)`` uint8 RGB array for the engines.

    Accepts rgb8, bgr8, rgba8 (alpha dropped), bgra8, mono8, the 8-bit Bayer mosaics
    (demosaiced) and YUV 4:2:2 (uyvy/yuv422, yuyv/yuv422_yuy2; even widths); raises
    ValueError for depth, 16-bit and generic encodings, and for every case
    image_msg_to_numpy rejects.
    With ``copy=False`` an rgb8 message without row padding is returned as a view of its
    buffer (read-only when ``data`` is immutable), which saves a frame-sized copy; the
    caller must own the message and leave it unchanged while the array is in use.
    """
    layout = _rgb_layout(msg.encoding)
    view = _message_view(msg, max_side)
    _check_pixel_pairs(view, layout, msg.encoding)
    return _convert_layout(view, layout, 'RGB', copy=copy)


def _check_pixel_pairs(image: np.ndarray, layout: str, encoding: str) -> None:
    # YUV 4:2:2 stores the chroma of two neighbouring pixels once: a row of an odd width
    # has a pixel without chroma, which no camera sends and OpenCV refuses with an assert.
    if layout in _PIXEL_PAIR_LAYOUTS and image.shape[1] % 2:
        raise ValueError(f'{encoding} images need an even width (pixels come in pairs '
                         f'sharing chroma), got width {image.shape[1]}')


def check_rgb_image_msg(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> None:
    """Raise ValueError where image_msg_to_rgb would refuse ``msg``, without reading a pixel.

    The encoding, side-length, step and data-length checks only, in microseconds: for a
    subscription callback, so that a malformed frame is refused (and counted) where it
    arrives instead of displacing a good frame that waits for inference.
    """
    layout = _rgb_layout(msg.encoding)
    _check_pixel_pairs(_message_view(msg, max_side), layout, msg.encoding)


def _array_for_encoding(image: Any, encoding: str) -> np.ndarray:
    """Validate ``image`` against ``encoding`` and return it as an ``(H, W, C)`` array."""
    spec = _encoding_spec(encoding)
    if not isinstance(image, np.ndarray):
        raise TypeError(f'expected a numpy array, got {type(image).__name__}')
    if image.dtype.kind != spec.dtype.kind or image.dtype.itemsize != spec.dtype.itemsize:
        raise ValueError(
            f'{encoding} needs {spec.dtype.name} data, got {image.dtype}; convert explicitly '
            f'so that no value is silently wrapped or truncated')
    if image.ndim == 2 and spec.channels == 1:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or image.shape[2] != spec.channels:
        expected = '(H, W)' if spec.channels == 1 else f'(H, W, {spec.channels})'
        raise ValueError(f'{encoding} needs an array of shape {expected}, got {image.shape}')
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f'image has zero size: height={image.shape[0]}, width={image.shape[1]}')
    return image


def _storing_kwargs(msg_class: type) -> Dict[str, bool]:
    """Return the constructor kwargs that make ``msg_class`` keep an ``array.array`` as is.

    Since Jazzy the generated ``uint8[]`` setter copies its value with
    ``array.array('B', value)`` unless the message checks its fields (``check_fields``,
    off by default), and that copy is ~0.15 ms for a 640x480 mono16 image on every
    publish. With field checks on, an ``array.array('B')`` is stored without a copy (as
    Humble's setter always does; its messages have no ``check_fields``).
    """
    return {'check_fields': True} if '_check_fields' in getattr(msg_class, '__slots__', ()) \
        else {}


def numpy_to_image_msg(image: np.ndarray, encoding: str,
                       header: Optional[Header] = None) -> Image:
    """Return a ``sensor_msgs/Image`` holding a copy of ``image``.

    ``image`` must have the dtype and channel count of ``encoding`` (``(H, W)`` or
    ``(H, W, 1)`` for single-channel encodings); it is written little-endian with
    ``step = width * bytes_per_pixel``. ``header`` (a ``std_msgs/Header``) is copied in
    when given.
    """
    from sensor_msgs.msg import Image

    pixels = _array_for_encoding(image, encoding)
    spec = SUPPORTED_ENCODINGS[encoding]
    little = pixels.astype(spec.dtype.newbyteorder('<'), order='C', copy=False)
    msg = Image(**_storing_kwargs(Image))
    if header is not None:
        msg.header = header
    msg.height = int(pixels.shape[0])
    msg.width = int(pixels.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(pixels.shape[1] * spec.bytes_per_pixel)
    # Only a field-checking message stores an array.array('B') as is (see _storing_kwargs);
    # bytes or lists would be converted element by element in Python.
    data = array.array('B')
    data.frombytes(np.ascontiguousarray(little).reshape(-1).view(np.uint8))
    msg.data = data
    return msg


def parse_compressed_format(fmt: str) -> CompressedFormat:
    """Parse a ``CompressedImage.format`` as image_transport plugins write it.

    Understands ``'rgb8; jpeg compressed bgr8'``, ``'mono16; png compressed '``,
    ``'16UC1; compressedDepth png'`` and the legacy bare ``'jpeg'``/``'png'``;
    ``encoding`` is None when the string names none.
    """
    head, separator, tail = fmt.partition(';')
    if not separator:
        return CompressedFormat(None, fmt.strip().lower(), True, False)
    encoding = head.strip()
    words = tail.split()
    if words and words[0] == 'compressedDepth':
        codec = words[1].lower() if len(words) > 1 else 'png'
        return CompressedFormat(encoding, codec, False, True)
    codec = words[0].lower() if words else ''
    # image_transport only marks colour data it converted to BGR; for colour encodings
    # without that mark its subscriber treats the decoded channels as RGB.
    return CompressedFormat(encoding, codec, 'compressed bgr' in tail, False)


def _jpeg_size(data: memoryview) -> Optional[Tuple[int, int]]:
    """Return ``(width, height)`` from a JPEG's frame header, None if there is none.

    Walks the marker segments from the start of the image to its first start-of-frame
    marker, skipping stray bytes between segments as libjpeg does.
    """
    position = len(_JPEG_SIGNATURE)
    while True:
        prefix = _JPEG_MARKER_PREFIX.search(data, position)
        if prefix is None or prefix.end() >= len(data):
            return None
        code, position = data[prefix.end()], prefix.end() + 1
        if code in _JPEG_BARE_CODES:
            continue
        if code in (_JPEG_EOI, _JPEG_SOS) or position + 2 > len(data):
            return None  # no frame header before the scan data: libjpeg refuses it too
        if code in _JPEG_FRAME_CODES:
            # length (2 bytes), sample precision (1), height (2), width (2)
            if position + 7 > len(data):
                return None
            height, width = struct.unpack_from('>HH', data, position + 3)
            return width, height
        position += struct.unpack_from('>H', data, position)[0]


def _header_size(data: np.ndarray) -> Optional[Tuple[int, int]]:
    """Return ``(width, height)`` from a PNG or JPEG header, None if it names none."""
    if bytes(data[:8]) == _PNG_SIGNATURE:
        return struct.unpack('>II', bytes(data[16:24])) if data.size >= 24 else None
    if bytes(data[:2]) == _JPEG_SIGNATURE:
        return _jpeg_size(memoryview(data))
    return None


def _check_compressed_data(data: np.ndarray, fmt: str, max_side: int) -> None:
    """Refuse empty data, and data whose header names no size or one over ``max_side``.

    The size is read from the header so that a corrupt or hostile message cannot make the
    decoder allocate and fill a huge image first (a 600-byte JPEG naming 20000x20000
    pixels took 2.3 GB and 7 s to decode). Only PNG and JPEG, which image_transport
    writes for colour, are read; other formats OpenCV would decode (a 6 kB WebP holds
    12000x12000 pixels) are refused, as their size is not checked.
    """
    if data.size == 0:
        raise ValueError(f'compressed image ({fmt!r}) has no data')
    size = _header_size(data)
    if size is None:
        raise ValueError(
            f'compressed image ({fmt!r}) is not a PNG or JPEG with a readable header '
            f'(starts with {bytes(data[:8])!r}); its size cannot be checked before decoding')
    width, height = size
    try:
        _check_side_lengths(height, width, max_side)
    except ValueError as error:
        raise ValueError(f'compressed image ({fmt!r}): {error}') from None


def _decode(data: np.ndarray, fmt: str, max_side: int) -> np.ndarray:
    _check_compressed_data(data, fmt, max_side)
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ValueError(
            f'could not decode {data.size} bytes of compressed image data '
            f'(format {fmt!r}, starts with {bytes(data[:8])!r})')
    return decoded


def _decode_depth(data: np.ndarray, parsed: CompressedFormat, fmt: str,
                  max_side: int) -> np.ndarray:
    if parsed.codec != 'png':
        raise ValueError(
            f'compressedDepth codec {parsed.codec!r} is not supported (format {fmt!r}); '
            f'publish with compressedDepth png')
    if data.size <= _DEPTH_HEADER.size:
        raise ValueError(
            f'compressedDepth image ({fmt!r}) has {data.size} bytes, not even its '
            f'{_DEPTH_HEADER.size}-byte header and a PNG')
    _, quant_a, quant_b = _DEPTH_HEADER.unpack(data[:_DEPTH_HEADER.size].tobytes())
    decoded = _decode(data[_DEPTH_HEADER.size:], fmt, max_side)
    if decoded.dtype != np.uint16 or decoded.ndim != 2:
        raise ValueError(
            f'compressedDepth PNG ({fmt!r}) decoded to {decoded.dtype} {decoded.shape}, '
            f'expected a single-channel uint16 image')
    spec = _encoding_spec(parsed.encoding)
    if spec == EncodingSpec(np.dtype(np.uint16), 1):
        return decoded
    if spec == EncodingSpec(np.dtype(np.float32), 1):
        # compressed_depth_image_transport stores quantised inverse depth; 0 marks
        # "no depth" and decodes to NaN, as its own subscriber does.
        inverse = decoded.astype(np.float32)
        with np.errstate(divide='ignore', invalid='ignore'):
            depth = np.float32(quant_a) / (inverse - np.float32(quant_b))
        depth[decoded == 0] = np.nan
        return depth
    raise ValueError(
        f'compressedDepth images must be 16UC1, mono16 or 32FC1, got {parsed.encoding!r}')


def _inferred_encoding(decoded: np.ndarray) -> str:
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    by_layout = {
        (np.uint8, 1): 'mono8', (np.uint8, 3): 'bgr8', (np.uint8, 4): 'bgra8',
        (np.uint16, 1): 'mono16', (np.uint16, 3): '16UC3',
    }
    encoding = by_layout.get((decoded.dtype.type, channels))
    if encoding is None:
        raise ValueError(
            f'decoded compressed image is {decoded.dtype} with {channels} channels, '
            f'which no supported encoding holds')
    return encoding


def decode_compressed_msg(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> Tuple[np.ndarray, str]:
    """Return ``(array, encoding)`` for a CompressedImage (see compressed_msg_to_numpy)."""
    fmt = msg.format
    parsed = parse_compressed_format(fmt)
    data = _message_bytes(msg.data)
    if parsed.depth:
        decoded = _decode_depth(data, parsed, fmt, max_side)
        encoding = parsed.encoding
    else:
        decoded = _decode(data, fmt, max_side)
        encoding = parsed.encoding or _inferred_encoding(decoded)
        spec = _encoding_spec(encoding)
        channels = 1 if decoded.ndim == 2 else decoded.shape[2]
        if decoded.dtype != spec.dtype:
            raise ValueError(
                f'compressed {encoding} image ({fmt!r}) decoded to {decoded.dtype}, '
                f'expected {spec.dtype.name}')
        layout = _COLOUR_LAYOUTS.get(encoding)
        if layout in _RAW_TO_RGB and channels == 3:
            # compressed_image_transport converts YUV sources to bgr8 before compressing
            # (format 'yuyv; jpeg compressed bgr8'): the pixels are colour already.
            encoding = 'bgr8' if parsed.compressed_bgr else 'rgb8'
        elif layout in _RAW_TO_RGB and channels == 1 and 'compressed mono8' in fmt:
            # JPEG holds grey or colour only: compressed_image_transport has cv_bridge turn
            # other sources (a Bayer mosaic) into grey ('bayer_rggb8; jpeg compressed
            # mono8'). Demosaicing that grey would paint false colour on every edge.
            encoding = 'mono8'
        elif layout is not None and layout != 'GRAY' and channels in (3, 4):
            source = ('BGR' if parsed.compressed_bgr else 'RGB') + ('A' if channels == 4 else '')
            decoded = _convert_layout(decoded, source, layout)
        elif channels != spec.channels:
            raise ValueError(
                f'compressed {encoding} image ({fmt!r}) decoded to {channels} channels, '
                f'expected {spec.channels}')
    _check_side_lengths(decoded.shape[0], decoded.shape[1], max_side)
    return np.ascontiguousarray(decoded), encoding


def compressed_msg_to_numpy(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Return the decoded pixels of a ``sensor_msgs/CompressedImage``.

    The result is in the encoding named before the ``;`` of ``msg.format`` (as
    image_transport's subscriber restores it), or, for a bare ``'jpeg'``/``'png'``
    format, in OpenCV's layout (mono8, bgr8, bgra8, mono16); a YUV or Bayer source that
    the publisher converted to colour or grey before compressing comes back in that
    layout. compressedDepth PNG (16UC1 and 32FC1) is decoded too. Raises ValueError on
    undecodable data and on data other than PNG or JPEG.
    """
    return decode_compressed_msg(msg, max_side)[0]


def compressed_msg_to_rgb(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Return a ``sensor_msgs/CompressedImage`` as an ``(H, W, 3)`` uint8 RGB array."""
    decoded, encoding = decode_compressed_msg(msg, max_side)
    return _convert_layout(decoded, _rgb_layout(encoding), 'RGB')


def check_rgb_compressed_msg(msg: Any, max_side: int = MAX_IMAGE_SIDE) -> None:
    """Raise ValueError where compressed_msg_to_rgb would refuse ``msg`` before decoding.

    The format, encoding, emptiness and PNG/JPEG header size checks, in microseconds (see
    check_rgb_image_msg); data that passes can still fail to decode.
    """
    parsed = parse_compressed_format(msg.format)
    if parsed.encoding is not None:  # None: a bare 'jpeg'/'png', known once decoded
        _rgb_layout(parsed.encoding)
    _check_compressed_data(_message_bytes(msg.data), msg.format, max_side)


def _default_compressed_encoding(image: np.ndarray) -> str:
    # Frames handed around this package are RGB (what the engines take), labels mono16.
    channels = 1 if image.ndim == 2 else image.shape[2]
    by_layout = {
        (np.uint8, 1): 'mono8', (np.uint8, 3): 'rgb8', (np.uint8, 4): 'rgba8',
        (np.uint16, 1): 'mono16',
    }
    encoding = by_layout.get((image.dtype.type, channels))
    if encoding is None:
        raise ValueError(
            f'cannot compress a {image.dtype} array with {channels} channels; '
            f'pass encoding= one of {", ".join(sorted(COMPRESSIBLE_ENCODINGS))}')
    return encoding


def numpy_to_compressed_msg(image: np.ndarray, fmt: str = 'png',
                            header: Optional[Header] = None, encoding: Optional[str] = None,
                            jpeg_quality: int = 90, png_level: int = 3) -> CompressedImage:
    """Return a ``sensor_msgs/CompressedImage`` holding ``image`` encoded as png or jpeg.

    ``encoding`` names the array's layout; by default uint8 arrays are mono8/rgb8/rgba8
    and uint16 ones mono16. PNG is lossless and is the only format allowed for
    single-channel or 16-bit data (labels, masks, depth): jpeg raises ValueError there.
    ``format`` is written as image_transport does, e.g. ``'rgb8; jpeg compressed bgr8'``.
    """
    from sensor_msgs.msg import CompressedImage

    if not isinstance(image, np.ndarray):
        raise TypeError(f'expected a numpy array, got {type(image).__name__}')
    codec = fmt.strip().lower()
    if codec == 'jpg':
        codec = 'jpeg'
    if codec not in ('png', 'jpeg'):
        raise ValueError(f'unsupported compression format {fmt!r}; use png or jpeg')
    if encoding is None:
        encoding = _default_compressed_encoding(image)
    if encoding not in COMPRESSIBLE_ENCODINGS:
        raise ValueError(
            f'cannot compress {encoding!r} images; supported: '
            f'{", ".join(sorted(COMPRESSIBLE_ENCODINGS))}')
    pixels = _array_for_encoding(image, encoding)
    layout = _COLOUR_LAYOUTS.get(encoding)
    is_colour = layout is not None and layout != 'GRAY'
    if codec == 'jpeg' and not (is_colour and pixels.dtype == np.uint8):
        raise ValueError(
            f'jpeg is lossy and only allowed for 8-bit colour overlays; {encoding} '
            f'{pixels.dtype} data (labels, masks, depth) must be sent as png')
    if is_colour:
        # As image_transport does: colour is stored as 3-channel BGR, which every
        # decoder displays correctly; the original encoding is kept in the format.
        pixels = _convert_layout(pixels, layout, 'BGR')
        target = 'bgr8'
    else:
        pixels = np.ascontiguousarray(pixels[:, :, 0])
        target = ''
    if codec == 'jpeg':
        params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, int(png_level)]
    ok, encoded = cv2.imencode('.jpg' if codec == 'jpeg' else '.png', pixels, params)
    if not ok:
        raise ValueError(f'OpenCV could not encode a {encoding} {pixels.shape} image as {codec}')
    msg = CompressedImage(**_storing_kwargs(CompressedImage))
    if header is not None:
        msg.header = header
    msg.format = f'{encoding}; {codec} compressed {target}'
    data = array.array('B')
    data.frombytes(encoded.reshape(-1))
    msg.data = data
    return msg
