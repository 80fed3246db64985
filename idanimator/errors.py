"""Typed errors users can hit. Each message is one plain sentence a non-expert can act on;
the CLI and the app only translate these, they never show a traceback."""


class IDAnimatorError(Exception):
    """Base class of every error idanimator raises on purpose."""


class InvalidImageError(IDAnimatorError):
    """The file is not a usable image (corrupt, unsupported, too large, too small)."""


class NoFaceError(IDAnimatorError):
    """No face was found in a reference photo."""


class FaceTooSmallError(IDAnimatorError):
    """A face was found but is too small to identify the person."""


class InvalidRequestError(IDAnimatorError):
    """A generation setting is out of range (frames, steps, size, guidance, seed, prompt)."""


class WeightsUnavailableError(IDAnimatorError):
    """A model weight is not on disk and cannot be downloaded."""


class CheckpointError(IDAnimatorError):
    """A checkpoint file is corrupt, unsafe, or does not match the expected layout."""


class DetectorUnavailableError(IDAnimatorError):
    """No face detector back end can be loaded."""


class GPUOutOfMemoryError(IDAnimatorError):
    """The GPU ran out of memory during a request (caches were freed)."""


class GenerationCancelled(IDAnimatorError):
    """The caller asked to stop; raised at the next denoising step (or before the first)."""


class UnreadableVideoError(IDAnimatorError):
    """A video file is missing, corrupt, has no frames, or is not a media file the reader accepts."""


class VideoTooLargeError(UnreadableVideoError):
    """A video's frames are larger, or it has more of them, than the reader's limits allow (settings)."""


class ModelUnavailableError(IDAnimatorError):
    """A metric's model cannot be loaded (not installed, not on disk, or broken): eval reports that metric as
    null and goes on with the others."""
