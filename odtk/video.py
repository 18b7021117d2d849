"""Video files in and out through PyAV (`pip install 'odtk[video]'`): frames as uint8 RGB [3, H, W] tensors, and an
annotated copy written as H.264 in an .mp4 at the source's frame rate and size."""
import contextlib
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor

from .utils import OdtkError, atomic_path

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DEFAULT_FPS = Fraction(25)      # for a stream that states no frame rate


def is_video(path) -> bool:
    """A path whose extension is a video container's."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(VIDEO_EXTENSIONS)


def require_av(path: str):
    """The `av` module, or a one-line error naming the video and the install command."""
    try:
        import av
    except ImportError:
        raise OdtkError(f"{path}: video needs PyAV: pip install 'odtk[video]'") from None
    return av


@dataclass
class VideoInfo:
    fps: Fraction
    size: Tuple[int, int]       # (height, width)
    frames: Optional[int]       # None when the container does not say


@contextlib.contextmanager
def _opened(path: str, mode: str = "r", **kwargs):
    """av.open with its errors (missing file, not a video, corrupt data) as one-line OdtkErrors."""
    av = require_av(path)
    try:
        container = av.open(path, mode, **kwargs)
    except (av.error.FFmpegError, OSError) as e:
        raise OdtkError(f"{path}: cannot open video ({e.__class__.__name__}: {e})") from None
    with container:
        if mode == "r" and not container.streams.video:
            raise OdtkError(f"{path}: has no video stream")
        try:
            yield container
        except av.error.FFmpegError as e:
            raise OdtkError(f"{path}: cannot {'read' if mode == 'r' else 'write'} video "
                            f"({e.__class__.__name__}: {e})") from None


def video_info(path: str) -> VideoInfo:
    """Frame rate, size and (when stated) frame count of a video's first video stream."""
    with _opened(path) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        return VideoInfo(Fraction(fps), (stream.height, stream.width), stream.frames or None)


def read_frames(path: str) -> Iterator[Tuple[Tensor, float]]:
    """Each frame of a video's first video stream as uint8 RGB [3, H, W], with its time in seconds."""
    with _opened(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"         # decode on several threads
        fps = float(stream.average_rate or stream.guessed_rate or DEFAULT_FPS)
        for i, frame in enumerate(container.decode(stream)):
            image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
            yield image, frame.time if frame.time is not None else i / fps


@contextlib.contextmanager
def video_writer(path: str, *, fps: Fraction, size: Tuple[int, int]) -> Iterator[Callable[[Tensor], None]]:
    """A function that appends a uint8 RGB [3, H, W] frame to an H.264 .mp4 at `path`; the file appears (whole)
    when the block ends without an error, and is never left half-written."""
    av = require_av(path)
    height, width = size
    with atomic_path(path, ".mp4") as tmp, _opened(tmp, "w", format="mp4") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=fps)
        stream.width, stream.height = width, height
        # 4:2:0 needs even sides; odd-sized videos keep their size in 4:4:4
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"

        def write(image: Tensor) -> None:
            frame = av.VideoFrame.from_ndarray(image.permute(1, 2, 0).numpy(), format="rgb24")
            container.mux(stream.encode(frame))

        yield write
        container.mux(stream.encode(None))     # flush the encoder's delayed frames
