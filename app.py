"""The search page on the embedded default model and generated sample videos.

    python app.py            # http://127.0.0.1:7860 (pip install -e ".[app]" first)

The same file runs a Hugging Face Space (`hub_scripts/push_space.py` assembles and uploads one): Spaces set
GRADIO_SERVER_NAME=0.0.0.0, which this honours; elsewhere the page listens on loopback only. The samples and their
index go to CROSSTVR_APP_DIR (default `crosstvr-app/`), are written once and reused; the index is brought up to date
at every start (resumable, incremental).
"""

import logging
import os

from crosstvr.default_model import load_default_model
from crosstvr.indexing import VideoIndex
from crosstvr.search import find_videos
from crosstvr.serve import LibraryService, serve
from crosstvr.synthetic import write_sample_library


NUM_SAMPLES = 24


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = os.environ.get("CROSSTVR_APP_DIR", "crosstvr-app")
    library, index = os.path.join(work, "videos"), os.path.join(work, "index")
    if not os.path.isdir(library) or len(find_videos(library)) < NUM_SAMPLES:
        write_sample_library(library, count=NUM_SAMPLES)
    model, processor = load_default_model()
    VideoIndex.build(library, index, model, processor, num_workers=0)
    service = LibraryService(index, library, model=model, processor=processor)
    serve(service, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
          port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))


if __name__ == "__main__":
    main()
