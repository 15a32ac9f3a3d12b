"""A saved checkpoint must load with `trust_remote_code=True` where the crosstvr package cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file


TEXTS = ["a red circle moves left", "a blue square moves up"]
VIDEOS = ["red_circle_left.mp4", "blue_square_up.mp4", "short.mp4"]

# Runs in a fresh interpreter: `crosstvr` is made unimportable, so everything comes from the checkpoint folder.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.modules["crosstvr"] = None  # `import crosstvr` now raises ImportError
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModel, AutoProcessor

    checkpoint, media, output = sys.argv[1:4]
    texts, videos = sys.argv[4].split("|"), [os.path.join(media, name) for name in sys.argv[5].split("|")]
    try:
        import crosstvr  # noqa: F401
        raise SystemExit("crosstvr should not be importable here")
    except ImportError:
        pass
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    for obj in (config, model, processor):
        assert type(obj).__module__.startswith("transformers_modules"), type(obj).__module__
    inputs = processor(text=texts, videos=videos)
    with torch.no_grad():
        retrieval = model.retrieve(**inputs, top_k=2)
    save_file(
        {
            **{key: value.contiguous() for key, value in inputs.items()},
            "text_embeds": retrieval.text_embeds,
            "video_embeds": retrieval.video_embeds,
            "t2v_logits": retrieval.text_to_video.logits,
            "v2t_logits": retrieval.video_to_text.logits,
        },
        output,
    )
    """
)


@pytest.fixture
def saved(tester, tmp_path, request):
    """A tiny model (config overrides from indirect parametrisation) and processor, and the folder they were saved
    to."""
    model = tester.get_model(**getattr(request, "param", {})).eval()
    processor = tester.get_processor()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    return model, processor, checkpoint


@pytest.mark.parametrize(
    "saved",
    [{}, {"fine_module": "t2v2t"}, {"similarity_head": "text_conditioned"}, {"similarity_head": "cret"}],
    indirect=True,
    ids=["crosstvr", "t2v2t", "text_conditioned", "cret"],
)
def test_checkpoint_loads_with_remote_code_and_gives_identical_outputs(saved, media_dir, tmp_path):
    model, processor, checkpoint = saved
    files = {path.name for path in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= files
    assert {"configuration_crosstvr.py", "modeling_crosstvr.py", "processing_crosstvr.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)

    inputs = processor(text=TEXTS, videos=[os.path.join(media_dir, name) for name in VIDEOS])
    with torch.no_grad():
        expected = model.retrieve(**inputs, top_k=2)

    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    output = tmp_path / "remote_outputs.safetensors"
    env = {
        key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",) and not key.startswith("HF_")
    }
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, str(script), str(checkpoint), media_dir, str(output), "|".join(TEXTS), "|".join(VIDEOS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    remote = load_file(output)
    for key, value in inputs.items():
        torch.testing.assert_close(remote[key], value, msg=f"processor output {key} differs")
    torch.testing.assert_close(remote["text_embeds"], expected.text_embeds)
    torch.testing.assert_close(remote["video_embeds"], expected.video_embeds)
    torch.testing.assert_close(remote["t2v_logits"], expected.text_to_video.logits)
    torch.testing.assert_close(remote["v2t_logits"], expected.video_to_text.logits)



PIPELINE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.modules["crosstvr"] = None
    from transformers import pipeline

    checkpoint, media = sys.argv[1:3]
    videos = [os.path.join(media, name) for name in sys.argv[3].split("|")]
    retriever = pipeline(model=checkpoint, trust_remote_code=True)  # the task comes from config.custom_pipelines
    print(json.dumps({
        "class": type(retriever).__name__,
        "one": retriever(sys.argv[4], videos=videos),
        "stage1": retriever([sys.argv[4]], videos=videos, rerank_depth=0, top_k=2),
    }))
    """
)


def test_text_video_retrieval_pipeline_through_remote_code(saved, media_dir):
    model, processor, checkpoint = saved
    result = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT, str(checkpoint), media_dir, "|".join(VIDEOS), TEXTS[0]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["class"] == "TextVideoRetrievalPipeline"
    inputs = processor(text=TEXTS[:1], videos=[os.path.join(media_dir, name) for name in VIDEOS])
    with torch.no_grad():
        expected = model.retrieve(**inputs)
    ranked = [os.path.basename(entry["video"]) for entry in output["one"]]
    assert ranked == [VIDEOS[i] for i in expected.text_to_video.ranking[0].tolist()]
    top_k = model.config.rerank_top_k
    assert [entry["reranked"] for entry in output["one"]] == [True] * top_k + [False] * (len(VIDEOS) - top_k)
    fused = sorted(expected.text_to_video.fused_scores[0].tolist(), reverse=True)
    assert [entry["score"] for entry in output["one"][:top_k]] == pytest.approx(fused, abs=1e-5)
    stage1 = expected.logits_per_text[0].argsort(descending=True)[:2].tolist()
    assert [os.path.basename(entry["video"]) for entry in output["stage1"][0]] == [VIDEOS[i] for i in stage1]
    assert all(entry["fine_score"] is None for entry in output["stage1"][0])
