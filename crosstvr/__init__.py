"""crosstvr: CrossTVR two-stage text-video retrieval for Hugging Face `transformers`.

Importing the package registers the model with the `Auto` classes, so local checkpoints load without
`trust_remote_code`; checkpoints carry their own copy of the modelling code for everyone else.
"""

from transformers import AutoConfig, AutoModel, AutoProcessor

from .configuration_crosstvr import CrossTVRConfig
from .modeling_crosstvr import (
    CrossTVRModel,
    CrossTVROutput,
    CrossTVRPreTrainedModel,
    CrossTVRRerankOutput,
    CrossTVRRetrievalOutput,
    CrossTVRVideoOutput,
)
from .processing_crosstvr import (
    CrossTVRProcessor,
    TextVideoRetrievalPipeline,
    VideoDecodeError,
    read_video,
    sample_frame_indices,
)


__version__ = "0.1.0"

AutoConfig.register(CrossTVRConfig.model_type, CrossTVRConfig, exist_ok=True)
AutoModel.register(CrossTVRConfig, CrossTVRModel, exist_ok=True)
AutoProcessor.register(CrossTVRConfig, CrossTVRProcessor, exist_ok=True)

__all__ = [
    "CrossTVRConfig",
    "CrossTVRModel",
    "CrossTVROutput",
    "CrossTVRPreTrainedModel",
    "CrossTVRProcessor",
    "CrossTVRRerankOutput",
    "CrossTVRRetrievalOutput",
    "CrossTVRVideoOutput",
    "TextVideoRetrievalPipeline",
    "VideoDecodeError",
    "read_video",
    "sample_frame_indices",
]
