"""T2V2T fusion as CrossTVR's alternative fine module (`fine_module="t2v2t"`): its maths, masks and seams."""

import pytest
import torch
import torch.nn.functional as F

from crosstvr import CrossTVRConfig, CrossTVRModel
from crosstvr.modeling_crosstvr import CrossTVRT2V2TFineModule


def t2v2t_model(tester, seed=0, **overrides):
    model = tester.get_model(seed=seed, fine_module="t2v2t", **overrides).eval()
    with torch.no_grad():  # E_t starts at zero; make the frame order visible to every test
        model.fine_module.text_to_video_fusion.frame_embeddings.normal_(generator=torch.Generator().manual_seed(seed))
    return model


def pair_inputs(tester, model):
    inputs = tester.get_inputs()
    tokens = model.get_vision_tokens(inputs["pixel_values"])
    return inputs["qformer_input_ids"], inputs["qformer_attention_mask"], tokens, inputs["video_mask"]


def bert_layer_norm(layer_norm, hidden_states):
    return F.layer_norm(hidden_states, hidden_states.shape[-1:], layer_norm.weight, layer_norm.bias, layer_norm.eps)


@pytest.mark.parametrize("bypass", [True, False])
def test_text_to_video_fusion_equals_a_hand_computation(tester, bypass):
    # F_T2V[t] = FFN(X-Attn(F_V[t], Concat(F_T W_T, F_V[t]))) + E_t, written out with the block's own weights.
    fusion = t2v2t_model(tester, t2v2t_bypass=bypass).fine_module.text_to_video_fusion
    generator = torch.Generator().manual_seed(0)
    frames, tokens, text_length, width, heads = 3, 5, 4, 32, 4
    frame_tokens = torch.randn(frames, tokens, width, generator=generator)
    text_features = torch.randn(frames, text_length, 32, generator=generator)
    text_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    frame_index = torch.tensor([0, 2, 3])

    keys = text_features @ fusion.text_projection.weight.T + fusion.text_projection.bias
    key_mask = text_mask
    if bypass:
        keys = torch.cat([keys, frame_tokens], dim=1)
        key_mask = torch.cat([text_mask, torch.ones(frames, tokens, dtype=torch.long)], dim=1)
    attention = fusion.crossattention.attention

    def split(x):  # (frames, length, width) -> (frames, heads, length, width / heads)
        return x.view(frames, x.shape[1], heads, width // heads).transpose(1, 2)

    q = split(attention.query(frame_tokens))
    k, v = split(attention.key(keys)), split(attention.value(keys))
    scores = q @ k.transpose(-1, -2) / (width // heads) ** 0.5
    scores = scores.masked_fill(key_mask[:, None, None, :] == 0, float("-inf"))
    context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(frames, tokens, width)
    block = fusion.crossattention.output
    attended = bert_layer_norm(block.LayerNorm, block.dense(context) + frame_tokens)
    hidden = F.gelu(fusion.intermediate.dense(attended))
    expected = bert_layer_norm(fusion.output.LayerNorm, fusion.output.dense(hidden) + attended)
    expected = expected + fusion.frame_embeddings[frame_index].unsqueeze(1)

    torch.testing.assert_close(fusion(frame_tokens, text_features, text_mask, frame_index), expected)


def test_logits_equal_the_plain_qformer_over_the_fused_tokens(tester):
    # The video-to-text pass is transformers' own Q-Former with the caption as its query rows.
    model = t2v2t_model(tester)
    ids, mask, tokens, video_mask = pair_inputs(tester, model)
    expected = []
    for i in range(len(ids)):
        real = video_mask[i].bool()
        embeds = model.fine_module.qformer_embeddings(input_ids=ids[i : i + 1])
        text_features = model.fine_module.qformer(query_embeds=embeds, query_length=0, attention_mask=mask[i : i + 1])
        num_frames = int(real.sum())
        fused = model.fine_module.text_to_video_fusion(
            tokens[i, real],
            text_features.last_hidden_state.expand(num_frames, -1, -1),
            mask[i : i + 1].expand(num_frames, -1),
            torch.arange(len(real))[real],
        ).flatten(0, 1)[None]  # (1, real frames * N, width)
        output = model.fine_module.qformer(
            query_embeds=embeds,
            query_length=embeds.shape[1],
            attention_mask=mask[i : i + 1],
            encoder_hidden_states=fused,
        ).last_hidden_state
        expected.append(model.fine_module.matching_head(output[:, 0]))
    torch.testing.assert_close(model.get_fine_logits(ids, mask, tokens, video_mask), torch.cat(expected))


def test_padding_frames_and_padding_text_do_not_change_scores(tester):
    model = t2v2t_model(tester)
    ids, mask, tokens, video_mask = pair_inputs(tester, model)
    assert video_mask[0, -1] == 0 and (mask == 0).any()
    scores = model.get_fine_scores(ids, mask, tokens, video_mask)
    changed = tokens.clone()
    changed[0, -1] = torch.randn_like(changed[0, -1])
    torch.testing.assert_close(model.get_fine_scores(ids, mask, changed, video_mask), scores)
    torch.testing.assert_close(model.get_fine_scores(ids.masked_fill(mask == 0, 7), mask, tokens, video_mask), scores)
    # ... while a real frame does change them, and padding the text further does not.
    changed[0, 0] = torch.randn_like(changed[0, 0])
    assert not torch.allclose(model.get_fine_scores(ids, mask, changed, video_mask)[0], scores[0])
    padded = torch.nn.functional.pad(ids, (0, 3)), torch.nn.functional.pad(mask, (0, 3))
    torch.testing.assert_close(model.get_fine_scores(*padded, tokens, video_mask), scores)


def test_frame_embeddings_tell_the_fusion_the_frame_order(tester):
    # Zero-initialised E_t: the fused tokens of all frames form a set, and a video scores as its reversal does.
    plain = tester.get_model(fine_module="t2v2t").eval()
    ids, mask, tokens, _ = pair_inputs(tester, plain)
    video_mask = torch.ones(tokens.shape[:2], dtype=torch.long)
    blind = plain.get_fine_logits(ids, mask, tokens.flip(1), video_mask) - plain.get_fine_logits(
        ids, mask, tokens, video_mask
    )
    model = t2v2t_model(tester)
    changed = model.get_fine_logits(ids, mask, tokens.flip(1), video_mask) - model.get_fine_logits(
        ids, mask, tokens, video_mask
    )
    assert blind.abs().max() < 1e-7 and changed.abs().max() > 100 * max(blind.abs().max(), 1e-9)
    with pytest.raises(ValueError, match="frame embeddings for 4 frames"):
        model.get_fine_logits(ids, mask, torch.cat([tokens, tokens], dim=1), torch.cat([video_mask, video_mask], 1))


def test_bypass_lets_a_frame_attend_to_itself(tester):
    # Naive T2V2T's keys are the caption alone: the attention output of a frame depends on the frame only through
    # its queries. With the bypass, a frame's tokens are also keys; the two share every weight, so they differ only
    # there.
    bypass, naive = t2v2t_model(tester), t2v2t_model(tester, t2v2t_bypass=False)
    assert naive.load_state_dict(bypass.state_dict()).missing_keys == []
    ids, mask, tokens, video_mask = pair_inputs(tester, bypass)
    assert not torch.allclose(
        bypass.get_fine_logits(ids, mask, tokens, video_mask), naive.get_fine_logits(ids, mask, tokens, video_mask)
    )


def test_every_parameter_gets_a_gradient_and_crosstvr_parts_are_absent(tester):
    model = t2v2t_model(tester).train()
    assert isinstance(model.fine_module, CrossTVRT2V2TFineModule) and model.unused_parameter_names() == []
    parts = {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("fine_module.")}
    assert parts == {"qformer_embeddings", "qformer", "text_to_video_fusion", "matching_head"}
    inputs = tester.get_inputs()
    model(**inputs, generator=torch.Generator().manual_seed(0)).loss_matching.backward()
    parts = ("fine_module.qformer.", "fine_module.text_to_video_fusion.")
    fine = [name for name, _ in model.named_parameters() if name.startswith(parts)]
    assert fine and all(model.get_parameter(name).grad is not None for name in fine)
    assert all(p.grad is None for p in model.fine_vision_model.parameters())


def test_reranking_with_t2v2t_reorders_only_the_top_k(tester):
    model = t2v2t_model(tester)
    similarity = torch.rand(3, 6, generator=torch.Generator().manual_seed(0))
    inputs = tester.get_inputs()
    tokens = torch.randn(6, tester.num_frames, 17, 32, generator=torch.Generator().manual_seed(1))
    out = model.rerank_text_to_video(similarity, inputs["qformer_input_ids"], inputs["qformer_attention_mask"], tokens)
    stage_one = similarity.sort(dim=1, descending=True, stable=True).indices
    top_k = model.config.rerank_top_k
    torch.testing.assert_close(out.ranking[:, top_k:], stage_one[:, top_k:])
    assert (out.ranking[:, :top_k].sort(dim=1).values == stage_one[:, :top_k].sort(dim=1).values).all()
    expected = model.get_fine_scores(
        inputs["qformer_input_ids"][:1], inputs["qformer_attention_mask"][:1], tokens[out.top_k_indices[0, :1]]
    )
    torch.testing.assert_close(out.fine_scores[0, :1], expected)


def test_save_and_reload_gives_the_same_scores(tester, tmp_path):
    model = t2v2t_model(tester, t2v2t_bypass=False)
    model.save_pretrained(tmp_path)
    loaded = CrossTVRModel.from_pretrained(tmp_path).eval()
    assert loaded.config.fine_module == "t2v2t" and loaded.config.t2v2t_bypass is False
    ids, mask, tokens, video_mask = pair_inputs(tester, model)
    torch.testing.assert_close(
        loaded.get_fine_scores(ids, mask, tokens, video_mask), model.get_fine_scores(ids, mask, tokens, video_mask)
    )


def test_settings_t2v2t_cannot_build_are_refused(tester):
    with pytest.raises(ValueError, match="fine_module='nope' is not one of"):
        tester.get_config(fine_module="nope")
    with pytest.raises(ValueError, match="T2V2T has no spatial and temporal passes"):
        tester.get_config(fine_module="t2v2t", fine_attention="spatial")
    qformer = {**tester.get_config().qformer_config.to_dict(), "num_attention_heads": 3, "hidden_size": 33}
    with pytest.raises(ValueError, match="heads that divides it|number of heads that divides"):
        tester.get_config(fine_module="t2v2t", qformer_config=qformer)
    assert CrossTVRConfig().fine_module == "crosstvr"  # the paper's module stays the default
