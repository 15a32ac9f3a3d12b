"""Loading the model a command or a service should use: a saved checkpoint (folder or Hub id), or the embedded default."""

from .modeling_crosstvr import CrossTVRModel
from .processing_crosstvr import CrossTVRProcessor


def load_model(model_name_or_path: str | None = None) -> tuple[CrossTVRModel, CrossTVRProcessor]:
    """A saved CrossTVR checkpoint (local folder or Hub id) with its processor, or the embedded default when None."""
    if model_name_or_path is None:
        from .default_model import load_default_model

        return load_default_model()
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(model_name_or_path)
    return model.eval(), AutoProcessor.from_pretrained(model_name_or_path)
