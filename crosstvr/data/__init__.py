"""Text-video retrieval benchmarks as `datasets.DatasetDict`s: MSR-VTT, MSVD, VATEX, LSMDC and DiDeMo.

One call per benchmark reads the annotation files in the layout the CLIP4Clip family distributes and a folder of
videos, and returns caption rows whose frames are decoded lazily with [`VideoTextTransform`]. See
`crosstvr.data.annotations` for the file formats and `crosstvr.data.builder` for the handling of missing and
unreadable videos.
"""

from functools import partial

from .annotations import AnnotationFormatError, CaptionRecord, load_plain_pickle
from .builder import FORMATS, DatasetIntegrityError, Problem, load_retrieval_dataset, probe_video
from .fixtures import Fixture, write_fixture
from .transforms import VideoTextTransform, unique_videos


load_msrvtt = partial(load_retrieval_dataset, "msrvtt")
load_msvd = partial(load_retrieval_dataset, "msvd")
load_vatex = partial(load_retrieval_dataset, "vatex")
load_lsmdc = partial(load_retrieval_dataset, "lsmdc")
load_didemo = partial(load_retrieval_dataset, "didemo")

__all__ = [
    "FORMATS",
    "AnnotationFormatError",
    "CaptionRecord",
    "DatasetIntegrityError",
    "Fixture",
    "Problem",
    "VideoTextTransform",
    "load_didemo",
    "load_lsmdc",
    "load_msrvtt",
    "load_msvd",
    "load_plain_pickle",
    "load_retrieval_dataset",
    "load_vatex",
    "probe_video",
    "unique_videos",
    "write_fixture",
]
