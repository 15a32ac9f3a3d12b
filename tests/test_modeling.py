import pytest
import torch
from transformers.masking_utils import create_bidirectional_mask

from crosstvr import CrossTVRModel
from crosstvr.modeling_crosstvr import (
    STAGE_TWO_TRAINABLE_MODULES,
    CrossTVRTokenSelector,
    PerturbedTopK,
    contrastive_loss,
    qformer_query_outputs,
    sample_hard_negatives,
    shift_tokens,
    temporal_difference_tokens,
)


AGGREGATORS = ["mean", "transformer", "token_shift_select"]


def fine_inputs(model, inputs):
    """Stage-2 inputs of the aligned (text_i, video_i) pairs."""
    return (
        inputs["qformer_input_ids"],
        inputs["qformer_attention_mask"],
        model.get_vision_tokens(inputs["pixel_values"]),
        inputs["video_mask"],
    )


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_output_shapes(tester, aggregator):
    model = tester.get_model(temporal_aggregator=aggregator).eval()
    inputs = tester.get_inputs()
    batch, frames = tester.batch_size, tester.num_frames
    tokens_per_frame = (tester.image_size // tester.patch_size) ** 2 + 1

    text_embeds = model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
    video_embeds = model.get_video_features(inputs["pixel_values"], inputs["video_mask"])
    vision_tokens = model.get_vision_tokens(inputs["pixel_values"])
    assert text_embeds.shape == video_embeds.shape == (batch, 16)
    torch.testing.assert_close(text_embeds.norm(dim=-1), torch.ones(batch))
    torch.testing.assert_close(video_embeds.norm(dim=-1), torch.ones(batch))
    assert vision_tokens.shape == (batch, frames, tokens_per_frame, 32)

    assert model.get_fine_logits(*fine_inputs(model, inputs)).shape == (batch, 2)
    scores = model.get_fine_scores(*fine_inputs(model, inputs))
    assert scores.shape == (batch,) and ((0 <= scores) & (scores <= 1)).all()  # p, the default s_fine

    outputs = model(**inputs)
    assert outputs.loss.shape == () and outputs.loss_matching.shape == ()
    assert outputs.logits_per_text.shape == outputs.logits_per_video.shape == (batch, batch)
    assert outputs.matching_logits.shape == (3 * batch, 2)
    assert outputs.matching_labels.tolist() == [1] * batch + [0] * 2 * batch

    retrieval = model.retrieve(**inputs, top_k=2)
    assert retrieval.logits_per_text.shape == (batch, batch)
    for rerank in (retrieval.text_to_video, retrieval.video_to_text):
        assert rerank.logits.shape == rerank.ranking.shape == (batch, batch)
        assert rerank.top_k_indices.shape == rerank.fine_scores.shape == rerank.fused_scores.shape == (batch, 2)


def test_stage_one_only_forward_has_no_matching_loss(tester):
    model = tester.get_model()
    inputs = tester.get_inputs()
    outputs = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    assert outputs.loss_matching is None and outputs.matching_logits is None
    torch.testing.assert_close(outputs.loss, outputs.loss_contrastive)


@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_padding_frames_do_not_change_scores(tester, aggregator):
    model = tester.get_model(temporal_aggregator=aggregator).eval()
    inputs = tester.get_inputs()
    changed = inputs["pixel_values"].clone()
    changed[0, -1] = torch.randn_like(changed[0, -1])  # the padding frame of video 0

    torch.testing.assert_close(
        model.get_video_features(changed, inputs["video_mask"]),
        model.get_video_features(inputs["pixel_values"], inputs["video_mask"]),
    )
    changed_inputs = {**inputs, "pixel_values": changed}
    torch.testing.assert_close(
        model.get_fine_scores(*fine_inputs(model, changed_inputs)),
        model.get_fine_scores(*fine_inputs(model, inputs)),
    )
    # ... while a real frame does change them.
    changed[0, 0] = torch.randn_like(changed[0, 0])
    assert not torch.allclose(
        model.get_video_features(changed, inputs["video_mask"])[0],
        model.get_video_features(inputs["pixel_values"], inputs["video_mask"])[0],
    )


def test_padding_text_tokens_do_not_change_scores(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    padding = inputs["attention_mask"] == 0
    qformer_padding = inputs["qformer_attention_mask"] == 0
    assert padding.any() and qformer_padding.any()

    input_ids = inputs["input_ids"].masked_fill(padding, 5)
    torch.testing.assert_close(
        model.get_text_features(input_ids, inputs["attention_mask"]),
        model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
    )
    ids, mask, tokens, video_mask = fine_inputs(model, inputs)
    torch.testing.assert_close(
        model.get_fine_scores(ids.masked_fill(qformer_padding, 7), mask, tokens, video_mask),
        model.get_fine_scores(ids, mask, tokens, video_mask),
    )


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("training", [False, True])
def test_qformer_query_outputs_equal_the_plain_qformer(tester, num_layers, training):
    """The pruned Q-Former (first layer once per input, last layer for query positions only) gives the query outputs of
    the plain transformers Q-Former run on every row, with padded text and a masked cross-attention."""
    model = tester.get_model(qformer_config={**tester.get_config().qformer_config.to_dict(),
                                             "num_hidden_layers": num_layers}).train(training)
    qformer, num_queries = model.fine_module.qformer, model.config.num_query_tokens
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, num_queries + 5, 32, generator=generator)  # 2 inputs: shared queries, different texts
    embeds[1, :num_queries] = embeds[0, :num_queries]
    attention_mask = torch.tensor([[1] * (num_queries + 5), [1] * (num_queries + 3) + [0, 0]])
    input_of_row = torch.tensor([0, 1, 1, 0, 1])
    frame_tokens = torch.randn(5, 7, 32, generator=generator)
    token_mask = torch.ones(5, 7, dtype=torch.long)
    token_mask[2, 4:] = 0
    encoder_mask = create_bidirectional_mask(config=qformer.config, inputs_embeds=embeds[input_of_row, :num_queries],
                                             attention_mask=token_mask, encoder_hidden_states=frame_tokens)
    expected = qformer(
        query_embeds=embeds[input_of_row], query_length=num_queries, attention_mask=attention_mask[input_of_row],
        encoder_hidden_states=frame_tokens, encoder_attention_mask=encoder_mask,
    ).last_hidden_state[:, :num_queries]
    for rows in (input_of_row, None):
        inputs = (embeds, attention_mask) if rows is not None else (embeds[input_of_row], attention_mask[input_of_row])
        outputs = qformer_query_outputs(qformer, *inputs, num_queries, frame_tokens, encoder_mask, input_of_row=rows)
        torch.testing.assert_close(outputs, expected)


def test_fine_scores_ignore_how_far_texts_are_padded(tester):
    model = tester.get_model().eval()
    ids, mask, tokens, video_mask = fine_inputs(model, tester.get_inputs())
    longer_ids = torch.cat([ids, ids.new_zeros(ids.shape[0], 4)], dim=1)
    longer_mask = torch.cat([mask, mask.new_zeros(mask.shape[0], 4)], dim=1)
    torch.testing.assert_close(
        model.get_fine_scores(longer_ids, longer_mask, tokens, video_mask),
        model.get_fine_scores(ids, mask, tokens, video_mask),
    )


def test_spatial_pass_is_independent_per_frame(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    frame_tokens = model.get_vision_tokens(inputs["pixel_values"])[1]  # (frames, tokens, width) of video 1
    ids = inputs["qformer_input_ids"][1:2].expand(tester.num_frames, -1)
    mask = inputs["qformer_attention_mask"][1:2].expand(tester.num_frames, -1)
    spatial = model.fine_module.spatial_text_attention(ids, mask, frame_tokens)
    assert spatial.shape == (tester.num_frames, 32)

    changed = frame_tokens.clone()
    changed[2] = torch.randn_like(changed[2])
    spatial_changed = model.fine_module.spatial_text_attention(ids, mask, changed)
    unchanged = [t for t in range(tester.num_frames) if t != 2]
    torch.testing.assert_close(spatial_changed[unchanged], spatial[unchanged])
    assert not torch.allclose(spatial_changed[2], spatial[2])


def test_token_selector_keeps_exactly_m_tokens_per_frame():
    torch.manual_seed(0)
    selector = CrossTVRTokenSelector(8, num_selected=3, keep_cls_token=False, num_samples=50, sigma=0.05)
    tokens = torch.randn(5, 10, 8)
    selector.eval()
    selected = selector(tokens)
    assert selected.shape == (5, 3, 8)
    for frame in range(5):
        # In evaluation the kept rows are tokens of the frame itself, in position order.
        matches = [int((tokens[frame] == row).all(dim=-1).nonzero()) for row in selected[frame]]
        assert matches == sorted(set(matches))
        expected = selector.token_log_probs(tokens[frame : frame + 1])[0].topk(3).indices.sort().values
        assert matches == expected.tolist()
    selector.train()
    assert selector(tokens).shape == (5, 3, 8)

    with_cls = CrossTVRTokenSelector(8, num_selected=3, keep_cls_token=True, num_samples=50, sigma=0.05).eval()
    selected = with_cls(tokens)
    assert selected.shape == (5, 4, 8)
    torch.testing.assert_close(selected[:, 0], tokens[:, 0])

    with pytest.raises(ValueError, match="lower the number of selected tokens"):
        CrossTVRTokenSelector(8, num_selected=11, keep_cls_token=False, num_samples=5, sigma=0.05)(tokens)


def test_perturbed_top_k_gradient_matches_finite_differences():
    scores = torch.tensor([[0.3, -0.2, 0.5, 0.1, -0.4]])
    weights = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    sigma, samples = 0.5, 100_000

    def objective(s):
        torch.manual_seed(1)  # common random numbers for every evaluation
        return (PerturbedTopK.apply(s, 2, samples, sigma)[0] * weights).sum()

    leaf = scores.clone().requires_grad_(True)
    objective(leaf).backward()
    step = 0.05
    finite_differences = torch.stack(
        [
            (objective(scores + step * basis) - objective(scores - step * basis)) / (2 * step)
            for basis in torch.eye(5).unsqueeze(1)
        ]
    )
    torch.testing.assert_close(leaf.grad[0], finite_differences, atol=0.03, rtol=0.05)
    indicators = PerturbedTopK.apply(scores, 2, 100, sigma)
    torch.testing.assert_close(indicators.sum(dim=-1), torch.ones(1, 2))


def test_token_shift_moves_patches_between_neighbouring_real_frames():
    frames, tokens, dim = 4, 15, 2
    hidden = torch.arange(frames * tokens, dtype=torch.float).repeat_interleave(dim).view(frames, tokens, dim)
    video_mask = torch.tensor([[1, 1, 1, 0]])
    shifted = shift_tokens(hidden, video_mask, fold_div=7).view(frames, tokens, dim)
    fold = 2  # 15 // 7
    from_previous, from_next = list(range(1, tokens, fold)), list(range(1 + fold // 2, tokens, fold))
    torch.testing.assert_close(shifted[1:3, from_previous], hidden[0:2, from_previous])
    torch.testing.assert_close(shifted[0:2, from_next], hidden[1:3, from_next])
    torch.testing.assert_close(shifted[:, 0], hidden[:, 0])  # CLS stays
    torch.testing.assert_close(shifted[0, from_previous], hidden[0, from_previous])  # no frame before the first
    torch.testing.assert_close(shifted[2, from_next], hidden[2, from_next])  # frame 3 is padding: nothing comes in
    torch.testing.assert_close(shifted[3, from_previous], hidden[3, from_previous])  # ... and nothing goes out


def test_sharing_changes_the_parameter_count_by_one_qformer(tester):
    shared = tester.get_model(share_spatial_temporal=True)
    separate = tester.get_model(share_spatial_temporal=False)
    extra = sum(p.numel() for p in shared.fine_module.qformer.parameters()) + sum(
        p.numel() for p in shared.fine_module.qformer_embeddings.parameters()
    )
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(separate) - count(shared) == extra

    inputs = tester.get_inputs()
    separate.eval()
    scores = separate.get_fine_scores(*fine_inputs(separate, inputs))
    # The temporal pass of the unshared model runs through its own Q-Former.
    separate.fine_module.temporal_qformer.encoder.layer[-1].output_query.LayerNorm.bias.data.add_(1.0)
    assert not torch.allclose(separate.get_fine_scores(*fine_inputs(separate, inputs)), scores)


def test_shared_vision_tower_gives_tokens_in_one_pass(tester):
    model = tester.get_model(share_vision_tower=True).eval()
    assert model.fine_vision_model is None
    inputs = tester.get_inputs()
    video = model.encode_video(inputs["pixel_values"], inputs["video_mask"])
    torch.testing.assert_close(
        video.vision_tokens, model.get_vision_tokens(inputs["pixel_values"], inputs["video_mask"])
    )
    torch.testing.assert_close(
        video.video_embeds, model.get_video_features(inputs["pixel_values"], inputs["video_mask"])
    )
    assert model(**inputs).loss_matching is not None


def test_blip2_vision_tower_family(tester):
    fine_vision_config = {
        "model_type": "blip_2_vision_model",
        "hidden_size": 24,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "image_size": tester.image_size,
        "patch_size": 16,
    }
    model = tester.get_model(fine_vision_config=fine_vision_config)
    assert type(model.fine_vision_model).__name__ == "Blip2VisionModel"
    inputs = tester.get_inputs()
    assert model.get_vision_tokens(inputs["pixel_values"]).shape == (tester.batch_size, tester.num_frames, 5, 24)
    assert model(**inputs).loss_matching.isfinite()


def test_gradients_reach_the_fine_module_and_not_the_frozen_tower(tester):
    model = tester.get_model().train()
    assert not model.fine_vision_model.training
    outputs = model(**tester.get_inputs())
    outputs.loss.backward()
    assert all(p.grad is None for p in model.fine_vision_model.parameters())
    for name in ("query_tokens", "matching_head.weight", "token_selector.fc1.weight", "frame_position_embeddings"):
        name = f"fine_module.{name}"
        assert model.get_parameter(name).grad is not None, name
    unused = set(model.unused_parameter_names())
    assert unused and all(".intermediate." in name or ".output." in name for name in unused)
    for name, parameter in model.named_parameters():
        if name.startswith("fine_module.qformer."):  # every Q-Former parameter but the unused ones gets a gradient
            assert (parameter.grad is None) == (name in unused), name
    assert model.vision_model.embeddings.patch_embedding.weight.grad is not None  # stage 1 is trainable


def test_forward_from_cached_embeddings_and_tokens_equals_forward_from_pixels(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    video = model.encode_video(inputs["pixel_values"], inputs["video_mask"])
    torch.manual_seed(3)
    from_pixels = model(**inputs)
    cached = {k: v for k, v in inputs.items() if k != "pixel_values"}
    torch.manual_seed(3)
    from_cache = model(**cached, video_embeds=video.video_embeds, vision_tokens=video.vision_tokens.half())
    torch.testing.assert_close(from_cache.loss_contrastive, from_pixels.loss_contrastive)
    torch.testing.assert_close(from_cache.loss_matching, from_pixels.loss_matching, atol=2e-3, rtol=2e-3)


def test_loss_decreases_over_a_few_steps(tester):
    model = tester.get_model().train()
    inputs = tester.get_inputs(batch_size=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(12):
        outputs = model(**inputs)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append((outputs.loss_contrastive.item(), outputs.loss_matching.item()))
    assert losses[-1][0] < losses[0][0]
    assert losses[-1][1] < losses[0][1]


def test_activation_checkpointing_gives_the_same_gradients(tester):
    inputs = tester.get_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tester.get_model().train()  # checkpointing acts in training mode only; the tiny config has no dropout
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.fine_module.qformer.encoder.layer[0].gradient_checkpointing
        torch.manual_seed(0)  # same token-selection noise and hard negatives in both runs
        model(**inputs).loss.backward()
        grads.append(
            (
                model.fine_module.qformer.encoder.layer[0].attention.attention.query.weight.grad,
                model.vision_model.encoder.layers[0].mlp.fc1.weight.grad,
            )
        )
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain)


def test_reranking_reorders_only_the_top_k(tester):
    model = tester.get_model().eval()
    torch.manual_seed(0)
    num_texts, num_videos, top_k = 3, 6, 3
    similarity = torch.rand(num_texts, num_videos) * 2 - 1
    similarity[0, 4] = similarity[0, 1]  # a tie: broken by index, deterministically
    inputs = tester.get_inputs(batch_size=num_texts)
    vision_tokens = torch.randn(num_videos, tester.num_frames, 17, 32)
    video_mask = torch.ones(num_videos, tester.num_frames, dtype=torch.long)
    out = model.rerank_text_to_video(
        similarity, inputs["qformer_input_ids"], inputs["qformer_attention_mask"], vision_tokens, video_mask, top_k
    )
    stage_one = similarity.sort(dim=1, descending=True, stable=True).indices
    torch.testing.assert_close(out.top_k_indices, stage_one[:, :top_k])
    torch.testing.assert_close(out.ranking[:, top_k:], stage_one[:, top_k:])
    assert (out.ranking[:, :top_k].sort(dim=1).values == stage_one[:, :top_k].sort(dim=1).values).all()
    # The logits rank exactly as `ranking`, and the top K are ordered by the fused score.
    torch.testing.assert_close(out.logits.sort(dim=1, descending=True, stable=True).indices, out.ranking)
    coarse_top_k = similarity.gather(1, out.top_k_indices)
    torch.testing.assert_close(out.fused_scores, coarse_top_k + model.config.fine_score_weight * out.fine_scores)
    for text in range(num_texts):
        for rank, video in enumerate(out.top_k_indices[text]):
            expected = model.get_fine_scores(
                inputs["qformer_input_ids"][text : text + 1],
                inputs["qformer_attention_mask"][text : text + 1],
                vision_tokens[video : video + 1],
            )
            torch.testing.assert_close(out.fine_scores[text, rank : rank + 1], expected)

    # Video-to-text: one row per video, candidates are texts.
    out = model.rerank_video_to_text(
        similarity, inputs["qformer_input_ids"], None, vision_tokens, video_mask, top_k=2, batch_size=1
    )
    assert out.ranking.shape == (num_videos, num_texts)
    stage_one = similarity.t().sort(dim=1, descending=True, stable=True).indices
    torch.testing.assert_close(out.ranking[:, 2:], stage_one[:, 2:])


def test_reranking_everything_when_k_exceeds_the_candidates(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    similarity = torch.rand(tester.batch_size, 2)
    vision_tokens = torch.randn(2, tester.num_frames, 17, 32)
    out = model.rerank_text_to_video(similarity, inputs["qformer_input_ids"], None, vision_tokens, top_k=15)
    assert out.top_k_indices.shape == (tester.batch_size, 2)
    torch.testing.assert_close(out.logits.gather(1, out.top_k_indices), out.fused_scores)


def test_contrastive_loss_ignores_other_captions_of_the_same_video():
    logits = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    same_video = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    assert contrastive_loss(logits, same_video) < contrastive_loss(logits, torch.eye(3, dtype=torch.bool))


def test_hard_negatives_are_never_positives_and_prefer_hard_ones():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[10.0, 9.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0]])
    positives = torch.eye(3, dtype=torch.bool)
    picks = [sample_hard_negatives(logits, positives, generator) for _ in range(200)]
    negative_videos = torch.stack([p[0] for p in picks])
    negative_texts = torch.stack([p[1] for p in picks])
    assert (negative_videos != torch.arange(3)).all() and (negative_texts != torch.arange(3)).all()
    assert (negative_videos[:, 0] == 1).float().mean() > 0.95  # text 0 is close to video 1
    assert (negative_texts[:, 1] == 0).float().mean() > 0.95  # video 1 is close to text 0
    with pytest.raises(ValueError, match="at least two different videos"):
        sample_hard_negatives(logits, torch.ones(3, 3, dtype=torch.bool))


def test_bad_inputs_give_clear_errors(tester):
    model = tester.get_model().eval()
    inputs = tester.get_inputs()
    with pytest.raises(ValueError, match=r"\(batch, frames, channels, height, width\)"):
        model.get_video_features(inputs["pixel_values"][:, :, :, :16])
    with pytest.raises(ValueError, match=r"\(batch, frames, channels, height, width\)"):
        model.get_video_features(inputs["pixel_values"][0])
    with pytest.raises(ValueError, match="at most 16"):
        model.get_text_features(torch.ones(1, 20, dtype=torch.long))
    empty_mask = inputs["video_mask"].clone()
    empty_mask[1] = 0
    with pytest.raises(ValueError, match="no real frame"):
        model.get_video_features(inputs["pixel_values"], empty_mask)
    with pytest.raises(ValueError, match="pairs must align"):
        model.get_fine_scores(inputs["qformer_input_ids"][:2], None, model.get_vision_tokens(inputs["pixel_values"]))
    with pytest.raises(ValueError, match="fine_vision_hidden_size"):
        model.get_fine_scores(inputs["qformer_input_ids"], None, torch.randn(3, 4, 17, 8))
    with pytest.raises(ValueError, match="needs pixel_values"):
        model(input_ids=inputs["input_ids"], qformer_input_ids=inputs["qformer_input_ids"])


def test_model_is_a_pretrained_model_with_safetensors_round_trip(tester, tmp_path):
    model = tester.get_model().eval()
    model.save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert {"configuration_crosstvr.py", "modeling_crosstvr.py"} <= files
    loaded = CrossTVRModel.from_pretrained(tmp_path).eval()
    inputs = tester.get_inputs()
    torch.testing.assert_close(
        loaded.get_video_features(inputs["pixel_values"], inputs["video_mask"]),
        model.get_video_features(inputs["pixel_values"], inputs["video_mask"]),
    )
    torch.testing.assert_close(
        loaded.get_fine_scores(*fine_inputs(loaded, inputs)), model.get_fine_scores(*fine_inputs(model, inputs))
    )
    assert not any(p.requires_grad for p in loaded.fine_vision_model.parameters())


@pytest.mark.parametrize("fine_module", ["crosstvr", "t2v2t"])
def test_checkpoints_from_before_the_fine_module_parts_load_and_save_in_todays_layout(tester, tmp_path, fine_module):
    from types import SimpleNamespace

    from safetensors.torch import load_file, save_file

    from crosstvr.video_store import model_fingerprint

    options = {"share_spatial_temporal": False, "use_token_frame_embeddings": True} if fine_module == "crosstvr" else {}
    model = tester.get_model(fine_module=fine_module, **options).eval()
    # The layout of earlier versions: the fine module's parameters at the top level ("qformer.", "matching_head.").
    legacy = {name.removeprefix("fine_module."): tensor.contiguous() for name, tensor in model.state_dict().items()}
    assert "matching_head.weight" in legacy
    assert "temporal_aggregator.token_selector.fc1.weight" in legacy  # stage 1's selector: not renamed on loading
    model.config.save_pretrained(tmp_path / "legacy")
    save_file(legacy, tmp_path / "legacy" / "model.safetensors", metadata={"format": "pt"})
    loaded = CrossTVRModel.from_pretrained(tmp_path / "legacy").eval()
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in loaded.state_dict().items())
    loaded.save_pretrained(tmp_path / "today")
    assert set(load_file(tmp_path / "today" / "model.safetensors")) == set(reference)
    # Indexes and token caches record a fingerprint of the model; the layout does not change it.
    legacy_model = SimpleNamespace(config=model.config, state_dict=lambda: legacy)
    assert model_fingerprint(model) == model_fingerprint(legacy_model)


@pytest.mark.parametrize("fine_attention", ["spatial", "temporal"])
def test_fine_attention_ablations_keep_one_pass(tester, fine_attention):
    model = tester.get_model(fine_attention=fine_attention, share_spatial_temporal=False)
    full = tester.get_model(share_spatial_temporal=False)
    assert (model.fine_module.token_selector is None) == (fine_attention == "spatial")
    # One pass, nothing to share.
    assert model.fine_module.frame_position_embeddings is None and model.fine_module.temporal_qformer is None
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    inputs = tester.get_inputs()
    model.train()
    model(**inputs).loss.backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(name.startswith("fine_module.qformer.") for name in trained)
    assert "fine_module.matching_head.weight" in trained
    assert ("fine_module.token_selector.fc1.weight" in trained) == (fine_attention == "temporal")
    model.eval()
    changed = {**inputs, "pixel_values": inputs["pixel_values"].clone()}
    changed["pixel_values"][0, -1] = torch.randn_like(changed["pixel_values"][0, -1])  # a padding frame
    torch.testing.assert_close(
        model.get_fine_scores(*fine_inputs(model, changed)), model.get_fine_scores(*fine_inputs(model, inputs))
    )


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("temporal_text_input", [False, True])
def test_temporal_pass_reads_the_caption_only_through_the_spatial_outputs(tester, share, temporal_text_input):
    # Eq. 5: z_1 = Attn(Concat X_spatial(t), Concat V_select(t)). With X_spatial held fixed, another caption changes
    # nothing; the `temporal_text_input` switch puts the caption back beside the queries.
    model = tester.get_model(share_spatial_temporal=share, temporal_text_input=temporal_text_input).eval()
    inputs = tester.get_inputs()
    ids, mask, tokens, video_mask = fine_inputs(model, inputs)
    spatial = torch.randn(int(video_mask.sum()), model.config.qformer_config.hidden_size)
    model.fine_module.spatial_text_attention = lambda *args, **kwargs: spatial  # X_spatial(t) held fixed
    other_ids = ids.roll(1, dims=0)  # every pair gets another caption
    other_mask = mask.roll(1, dims=0)
    changed = model.get_fine_logits(other_ids, other_mask, tokens, video_mask) - model.get_fine_logits(
        ids, mask, tokens, video_mask
    )
    assert (changed.abs().max() > 1e-4) == temporal_text_input


@pytest.mark.parametrize("temporal_text_input", [False, True])
def test_every_fine_parameter_but_the_unused_ones_gets_a_gradient(tester, temporal_text_input):
    model = tester.get_model(share_spatial_temporal=False, temporal_text_input=temporal_text_input).train()
    model(**tester.get_inputs()).loss.backward()
    unused = set(model.unused_parameter_names())
    assert any(name.startswith("fine_module.temporal_qformer_embeddings.") for name in unused) != temporal_text_input
    for name, parameter in model.named_parameters():
        if name.startswith(("fine_module.qformer", "fine_module.temporal_qformer")):
            assert (parameter.grad is None) == (name in unused), name


def test_fused_ties_are_broken_by_candidate_index_as_the_metrics_do():
    from crosstvr.evaluation.metrics import ground_truth_ranks
    from crosstvr.modeling_crosstvr import fuse_reranking

    similarity = torch.tensor([[0.25, 0.75, 0.125, 0.0]])  # stage-1 order: 1, 0, 2, 3
    coarse_ranking = similarity.sort(dim=1, descending=True, stable=True).indices
    out = fuse_reranking(similarity, coarse_ranking, torch.tensor([[0.0, 0.5, 0.625]]), 1.0)  # fused: all 0.75
    assert out.ranking.tolist() == [[0, 1, 2, 3]]
    logits = out.logits.numpy().repeat(4, axis=0)
    assert ground_truth_ranks(logits, out.ranking[0].numpy()).tolist() == [1, 2, 3, 4]


def test_fine_score_modes_are_p_log_p_and_the_log_odds(tester):
    model = tester.get_model().eval()
    args = fine_inputs(model, tester.get_inputs())
    probability = model.get_fine_logits(*args).softmax(dim=-1)[:, 1]
    expected = {"probability": probability, "log_probability": probability.log(), "logit": (probability / (1 - probability)).log()}
    for mode, value in expected.items():
        model.config.fine_score = mode
        torch.testing.assert_close(model.get_fine_scores(*args), value, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="fine_score"):
        tester.get_config(fine_score="margin")


def test_fine_module_gradients_are_reproducible_with_several_threads(tester):
    # The spatial pass gathers each text's embeddings to its frames (repeated indices). Through plain indexing the
    # backward accumulates with index_put_, whose sums depend on thread scheduling on CPU.
    model = tester.get_model().train()
    inputs = tester.get_inputs(batch_size=3)
    repeat = 48  # many pairs share a text, as in re-ranking and in training batches
    ids, mask = inputs["qformer_input_ids"].repeat(repeat, 1), inputs["qformer_attention_mask"].repeat(repeat, 1)
    tokens = torch.randn(len(ids), tester.num_frames, 17, 32, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            model.zero_grad()
            torch.manual_seed(1)  # the token selector's noise
            model.get_fine_logits(ids, mask, tokens).sum().backward()
            grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for name, grad in grads[0].items():
            assert torch.equal(other[name], grad), name


@pytest.mark.parametrize("fine_module", ["crosstvr", "t2v2t"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_keeps_stage_two_in_float32(tester, tmp_path, dtype, fine_module):
    every_option = {"share_spatial_temporal": False, "use_token_frame_embeddings": True}
    tester.get_model(
        fine_module=fine_module, fine_vision_projection=True, **(every_option if fine_module == "crosstvr" else {})
    ).save_pretrained(tmp_path)
    model = CrossTVRModel.from_pretrained(tmp_path, dtype=dtype).eval()
    for name, parameter in model.named_parameters():
        stage_two = name.split(".")[0] in STAGE_TWO_TRAINABLE_MODULES
        assert parameter.dtype == (torch.float32 if stage_two else dtype), name
    parts = {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("fine_module.")}
    t2v2t_only = {"text_to_video_fusion"}
    crosstvr_only = {"query_tokens", "temporal_qformer_embeddings", "temporal_qformer", "token_selector",
                     "frame_position_embeddings", "token_frame_embeddings"}
    common = {"qformer_embeddings", "qformer", "matching_head"}
    assert parts == common | (crosstvr_only if fine_module == "crosstvr" else t2v2t_only)
    assert model.fine_vision_projection.weight.dtype == torch.float32
    inputs = tester.get_inputs()
    with torch.no_grad():
        tokens = model.get_vision_tokens(inputs["pixel_values"].to(dtype))
        scores = model.get_fine_scores(inputs["qformer_input_ids"], None, tokens, inputs["video_mask"])
    assert tokens.dtype == dtype and scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_sdpa_and_eager_attention_agree(tester):
    inputs = tester.get_inputs()
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = tester.get_model(attn_implementation=implementation).eval()
        with torch.no_grad():
            video = model.encode_video(inputs["pixel_values"], inputs["video_mask"])
            outputs.append(
                (
                    model.get_text_features(inputs["input_ids"], inputs["attention_mask"]),
                    video.video_embeds,
                    model.get_fine_logits(
                        inputs["qformer_input_ids"], inputs["qformer_attention_mask"], video.vision_tokens,
                        inputs["video_mask"],
                    ),
                )
            )
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_flex_attention_runs_in_the_towers_and_the_qformer_keeps_sdpa(tester):
    inputs = tester.get_inputs()
    eager = tester.get_model(attn_implementation="eager").eval()
    flex = tester.get_model(attn_implementation="flex_attention").eval()
    implementations = {key: getattr(flex.config, key)._attn_implementation for key in flex.config.sub_configs}
    assert implementations == {
        "text_config": "flex_attention",
        "vision_config": "flex_attention",
        "temporal_config": "flex_attention",
        "fine_vision_config": "flex_attention",
        "qformer_config": "sdpa",
    }
    assert flex.vision_model.config._attn_implementation == "flex_attention"
    assert flex.fine_module.qformer.config._attn_implementation == "sdpa"
    with torch.no_grad():
        for model_outputs in zip(
            *(
                (
                    model.get_video_features(inputs["pixel_values"], inputs["video_mask"]),
                    model.get_fine_logits(*fine_inputs(model, inputs)),
                )
                for model in (eager, flex)
            )
        ):
            torch.testing.assert_close(*model_outputs, atol=1e-5, rtol=1e-5)
    # Requested on a loaded model as one string, the same routing applies.
    eager.set_attn_implementation("flex_attention")
    assert eager.text_model.config._attn_implementation == "flex_attention"
    assert eager.fine_module.qformer.config._attn_implementation == "sdpa"


def test_flash_attention_is_supported_where_the_sub_models_support_it(tester):
    # Without the flash-attn package (as on CPU) the request fails for the missing package, not for the model.
    with pytest.raises(ImportError, match="FlashAttention2"):
        tester.get_model(attn_implementation="flash_attention_2")


def test_encoding_verbs_take_a_whole_processor_output_as_clip_users_pass_it(tester, frames):
    model = tester.get_model().eval()
    inputs = tester.get_processor()(text=["a red circle moves left"], videos=[frames])
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_text_features(**inputs), model.get_text_features(inputs["input_ids"], inputs["attention_mask"])
        )
        torch.testing.assert_close(
            model.get_video_features(**inputs), model.get_video_features(inputs["pixel_values"], inputs["video_mask"])
        )
        torch.testing.assert_close(model.encode_video(**inputs).vision_tokens, model.get_vision_tokens(**inputs))
    with pytest.raises(TypeError, match=r"\['input_idss'\]"):
        model.get_text_features(input_ids=inputs["input_ids"], input_idss=inputs["input_ids"])


def test_forward_supports_return_dict_and_the_output_switches(tester):
    model = tester.get_model(attn_implementation="eager").eval()  # as in transformers, sdpa returns no attentions
    inputs = tester.get_inputs()
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True, output_attentions=True)
        as_tuple = model(**inputs, return_dict=False)
    num_layers = model.config.text_config.num_hidden_layers
    assert len(outputs.text_model_output.hidden_states) == num_layers + 1
    assert len(outputs.text_model_output.attentions) == num_layers
    frames = tester.batch_size * tester.num_frames
    assert outputs.vision_model_output.hidden_states[-1].shape[0] == frames
    assert len(outputs.vision_model_output.attentions) == model.config.vision_config.num_hidden_layers
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[1], outputs.loss_contrastive)  # loss, loss_contrastive, ...
    assert model(**inputs).text_model_output.hidden_states is None


def test_frame_position_embeddings_start_at_zero_or_at_the_configured_scale(tester):
    # std 0 (the default) starts P_t at zero and draws no random numbers: every other weight is as without the option.
    plain = tester.get_model()
    zero = tester.get_model(frame_position_embeddings_init_std=0.0)
    assert not zero.fine_module.frame_position_embeddings.any()
    for (name, a), b in zip(plain.state_dict().items(), zero.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    drawn = tester.get_model(frame_position_embeddings_init_std=2.0).fine_module.frame_position_embeddings
    assert drawn.shape == (tester.num_frames, tester.get_config().qformer_config.hidden_size)
    assert 1.5 < drawn.std().item() < 2.5


@pytest.mark.parametrize("fine_attention", ["temporal", "spatial_temporal"])
def test_token_frame_embeddings_tell_the_temporal_pass_the_frame_order(tester, fine_attention):
    # Eqs. 5-6's keys carry no frame index: without frame positions on the queries the temporal-only module scores a
    # video and its frames reversed alike. E_t on the selected tokens breaks that; zero-initialised, it changes nothing.
    paper = tester.get_model(fine_attention=fine_attention, use_frame_position_embeddings=False).eval()
    model = tester.get_model(fine_attention=fine_attention, use_frame_position_embeddings=False,
                             use_token_frame_embeddings=True).eval()
    missing = model.load_state_dict(paper.state_dict(), strict=False).missing_keys
    assert missing == ["fine_module.token_frame_embeddings"]
    ids, mask, tokens, _ = fine_inputs(model, tester.get_inputs())
    video_mask = torch.ones(tokens.shape[:2], dtype=torch.long)
    reversed_tokens = tokens.flip(1)
    torch.testing.assert_close(model.get_fine_logits(ids, mask, tokens, video_mask),
                               paper.get_fine_logits(ids, mask, tokens, video_mask))
    blind = paper.get_fine_logits(ids, mask, reversed_tokens, video_mask) - paper.get_fine_logits(
        ids, mask, tokens, video_mask
    )
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        model.fine_module.token_frame_embeddings.normal_(std=tokens.std().item(), generator=generator)
    changed = model.get_fine_logits(ids, mask, reversed_tokens, video_mask) - model.get_fine_logits(
        ids, mask, tokens, video_mask
    )
    assert blind.abs().max() < 1e-6 and changed.abs().max() > 100 * max(blind.abs().max(), 1e-8)
    with pytest.raises(ValueError, match="frame embeddings for"):
        model.get_fine_logits(ids, mask, torch.cat([tokens, tokens], dim=1), torch.cat([video_mask, video_mask], 1))


def test_temporal_difference_tokens_follow_each_frame_with_its_change_from_the_previous_real_frame():
    tokens = torch.arange(2 * 3 * 2 * 1, dtype=torch.float32).view(2, 3, 2, 1) ** 2  # (pairs, T, N, D)
    video_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = temporal_difference_tokens(tokens, video_mask)
    assert out.shape == (2, 3, 4, 1)
    torch.testing.assert_close(out[:, :, :2], tokens)
    expected = torch.zeros_like(tokens)
    expected[0, 1:] = tokens[0, 1:] - tokens[0, :-1]
    expected[1, 1] = tokens[1, 1] - tokens[1, 0]  # frame 2 of pair 1 is padding: no difference
    torch.testing.assert_close(out[:, :, 2:], expected)


@pytest.mark.parametrize("fine_module", ["crosstvr", "t2v2t"])
def test_temporal_difference_tokens_add_no_parameters_and_keep_padding_frames_out(tester, fine_module):
    model = tester.get_model(fine_module=fine_module, use_temporal_difference_tokens=True).eval()
    plain = tester.get_model(fine_module=fine_module).eval()
    assert set(model.state_dict()) == set(plain.state_dict())
    model.load_state_dict(plain.state_dict())
    ids, mask, tokens, video_mask = fine_inputs(model, tester.get_inputs())
    scores = model.get_fine_scores(ids, mask, tokens, video_mask)
    assert not torch.allclose(scores, plain.get_fine_scores(ids, mask, tokens, video_mask))
    changed = tokens.clone()
    changed[0, -1] = torch.randn_like(changed[0, -1])  # the padding frame of video 0
    torch.testing.assert_close(model.get_fine_scores(ids, mask, changed, video_mask), scores)


def test_temporal_difference_tokens_reach_crosstvrs_temporal_pass_only(tester):
    # The spatial pass reads each frame's own tokens, with or without the switch: the spatial-only ablation is unchanged.
    plain = tester.get_model(fine_attention="spatial").eval()
    model = tester.get_model(fine_attention="spatial", use_temporal_difference_tokens=True).eval()
    ids, mask, tokens, video_mask = fine_inputs(model, tester.get_inputs())
    torch.testing.assert_close(
        model.get_fine_logits(ids, mask, tokens, video_mask), plain.get_fine_logits(ids, mask, tokens, video_mask)
    )
