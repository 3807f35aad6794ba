"""The architectures of round 10, trained by tests/_zoo9_kit.py's loop: tiny configs (hidden 16 or less, one or two
layers, vocabulary 32, float64), dropout 0.1 wherever the config has one, passed directly to the recorder.

Causal LMs train on the loop's next-token loss over right-padded sequences labelled -100 at the padding; the
others on the model's own loss with ``labels`` in the call (tests/_zoo9_cases.py's helpers).
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from _zoo9_cases import (
    S2S,
    TEXT,
    P,
    _build,
    _drawn_tokens,
    _images,
    _shift,
    _texts,
    causal_case,
    classifier_case,
    seq2seq_case,
)
from _zoo9_kit import ROWS, VOCAB, Case, N, logits_of, record
from torch import Tensor

from explaind.integrations import four_d_attention_mask

__all__ = ["BATCH_NORM", "CASES", "OTHERS", "embedding_norms", "path_share"]

SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, use_cache=False)
RWKV = dict(vocab_size=VOCAB, context_length=16, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16,
            intermediate_size=32, rescale_every=0, use_cache=False)


def _rwkv_drawn_embeddings() -> torch.nn.Module:
    """RWKV with its token embeddings drawn from N(0, 0.02^2) after the model's own initialisation (the fix of
    RWKV's small embedding initialisation that docs/guide_own_model.md names)."""
    model = transformers.RwkvForCausalLM(transformers.RwkvConfig(**RWKV))
    with torch.no_grad():
        model.rwkv.embeddings.weight.normal_(0.0, 0.02)
    return model


def path_share(case: Case, step: int, ts: tuple[float, ...]) -> list[float]:
    """Record ``case``, then the largest ``|f(theta_s + t delta_s) - f(theta_s)|`` over the held-out logits divided by
    the largest ``|f(theta_{s+1}) - f(theta_s)|``, for each ``t`` in ``ts`` at step ``step`` (evaluation mode, the
    model's float32 conversions as written)."""
    model, traj, X_test, _ = record(case, check=False)
    base, delta = traj.params(step), traj.delta(step)

    def at(t: float) -> Tensor:
        params = {**traj.constants(), **{n: base[n] + t * delta[n] for n in base}}
        with torch.no_grad():
            return logits_of(torch.func.functional_call(model, params, (), X_test))

    start = at(0.0)
    whole = float((at(1.0) - start).abs().max())
    return [float((at(t) - start).abs().max()) / whole for t in ts]


def embedding_norms(case: Case) -> tuple[float, float]:
    """The largest row norm of the token embeddings at initialisation, and the largest row norm of their first
    update (``record(case)``'s step 0)."""
    _, traj, _, _ = record(case, check=False)
    name = next(n for n in traj.param_names if n.endswith("embeddings.weight"))
    return (float(traj.params(0)[name].norm(dim=-1).max()), float(traj.delta(0)[name].norm(dim=-1).max()))


def _text_case(name: str, model_cls, config_cls, tol: float = 1e-10, **cfg) -> Case:
    """A sequence classifier (3 labels) on its own cross entropy over ``_texts``'s ids; ``tol`` the estimators'."""
    return classifier_case(name, _build(model_cls, config_cls, num_labels=3, **cfg), _texts(), tol=tol)


def _masked_texts() -> tuple[dict[str, Tensor], Tensor]:
    """``_texts``'s rows with a 4-D boolean attention mask of ones (nothing is padded)."""
    X, y = _texts()()
    return {**X, "attention_mask": four_d_attention_mask(torch.ones_like(X["input_ids"]))}, y


def _layout_data() -> tuple[dict[str, Tensor], Tensor]:
    """Token ids with one box ``(x0, y0, x1, y1)`` per token in ``0..1000``, ``x0 <= x1``, ``y0 <= y1``."""
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (ROWS, 8), generator=gen)
    corners = torch.randint(0, 1001, (ROWS, 8, 4), generator=gen)
    lo, hi = torch.minimum(corners[..., :2], corners[..., 2:]), torch.maximum(corners[..., :2], corners[..., 2:])
    return {"input_ids": ids, "bbox": torch.cat([lo, hi], -1)}, torch.randint(0, 3, (ROWS,), generator=gen)


def _led_global_data() -> tuple[dict[str, Tensor], Tensor]:
    """``_seq2seq_data``'s rows with global attention on each source's first token."""
    from _zoo9_cases import _seq2seq_data
    X, y = _seq2seq_data(_shift)()
    glob = torch.zeros_like(X["input_ids"])
    glob[:, 0] = 1
    return {**X, "global_attention_mask": glob}, y


def _spectrograms() -> tuple[dict[str, Tensor], Tensor]:
    """Log-mel-like inputs of 16 frames by 16 bins and class labels."""
    gen = torch.Generator().manual_seed(12)
    return ({"input_values": torch.randn(ROWS, 16, 16, generator=gen, dtype=torch.float64)},
            torch.randint(0, 3, (ROWS,), generator=gen))


def _perceiver_data() -> tuple[dict[str, Tensor], Tensor]:
    X, y = _texts(seed=13)()
    return {"inputs": X["input_ids"]}, y


IMAGE = dict(image_size=16, num_channels=3, num_labels=3)
ENC = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
           hidden_dropout_prob=P, attention_probs_dropout_prob=P)

CASES: dict[str, Case] = {
    # ---- RWKV: the model's own small embedding initialisation, and the fix
    "rwkv": causal_case("rwkv", _build(transformers.RwkvForCausalLM, transformers.RwkvConfig, **RWKV),
                        recorder={"capture_random": True, "ignore_attributes": ["rwkv.layers_are_rescaled"]}),
    "rwkv_drawn_embeddings": causal_case("rwkv_drawn_embeddings", _rwkv_drawn_embeddings, panels=32, tol=1e-8,
                                         recorder={"capture_random": True,
                                                   "ignore_attributes": ["rwkv.layers_are_rescaled"]}),
    # ---- causal LMs
    "xglm": causal_case("xglm", _build(transformers.XGLMForCausalLM, transformers.XGLMConfig, vocab_size=VOCAB,
                                       max_position_embeddings=16, d_model=16, ffn_dim=32, num_layers=1,
                                       attention_heads=2, dropout=P, attention_dropout=P, activation_dropout=P,
                                       layerdrop=0.0, use_cache=False, pad_token_id=0)),
    "biogpt": causal_case("biogpt", _build(transformers.BioGptForCausalLM, transformers.BioGptConfig,
                                           hidden_dropout_prob=P, attention_probs_dropout_prob=P, layerdrop=0.0,
                                           pad_token_id=0, **SMALL)),
    "falcon_mamba": causal_case("falcon_mamba", _build(
        transformers.FalconMambaForCausalLM, transformers.FalconMambaConfig, vocab_size=VOCAB, hidden_size=16,
        state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3, time_step_rank=4, use_cache=False)),
    # ---- encoder-decoders
    "blenderbot": seq2seq_case("blenderbot", _build(transformers.BlenderbotForConditionalGeneration,
                                                    transformers.BlenderbotConfig, **S2S), _shift),
    "blenderbot_small": seq2seq_case("blenderbot_small", _build(transformers.BlenderbotSmallForConditionalGeneration,
                                                                transformers.BlenderbotSmallConfig, **S2S), _shift),
    "plbart": seq2seq_case("plbart", _build(transformers.PLBartForConditionalGeneration, transformers.PLBartConfig,
                                            **S2S), _shift),
    "led_global": dataclasses.replace(seq2seq_case("led_global", _build(
        transformers.LEDForConditionalGeneration, transformers.LEDConfig, attention_window=4,
        max_encoder_position_embeddings=16, max_decoder_position_embeddings=16,
        **{k: v for k, v in S2S.items() if k != "max_position_embeddings"}), _shift), data=_led_global_data),
    # ---- text classifiers
    "squeezebert": _text_case("squeezebert", transformers.SqueezeBertForSequenceClassification,
                              transformers.SqueezeBertConfig, embedding_size=16, q_groups=1, k_groups=1, v_groups=1,
                              post_attention_groups=1, intermediate_groups=1, output_groups=1, **TEXT),
    "convbert": _text_case("convbert", transformers.ConvBertForSequenceClassification, transformers.ConvBertConfig,
                           embedding_size=16, head_ratio=2, conv_kernel_size=3, num_groups=1, **TEXT),
    "rembert": _text_case("rembert", transformers.RemBertForSequenceClassification, transformers.RemBertConfig,
                          input_embedding_size=8, output_embedding_size=8, classifier_dropout_prob=P, **TEXT),
    "nystromformer": _text_case("nystromformer", transformers.NystromformerForSequenceClassification,
                                transformers.NystromformerConfig, num_landmarks=4, segment_means_seq_len=8,
                                **{**TEXT, "max_position_embeddings": 16}),
    # the fixes the refusal names: no pad_token_id, or a 4-D mask
    "squeezebert_no_pad": _text_case("squeezebert_no_pad", transformers.SqueezeBertForSequenceClassification,
                                     transformers.SqueezeBertConfig, embedding_size=16, q_groups=1, k_groups=1,
                                     v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1,
                                     pad_token_id=None, **TEXT),
    "convbert_no_pad": _text_case("convbert_no_pad", transformers.ConvBertForSequenceClassification,
                                  transformers.ConvBertConfig, embedding_size=16, head_ratio=2, conv_kernel_size=3,
                                  num_groups=1, pad_token_id=None, **TEXT),
    "rembert_no_pad": _text_case("rembert_no_pad", transformers.RemBertForSequenceClassification,
                                 transformers.RemBertConfig, input_embedding_size=8, output_embedding_size=8,
                                 classifier_dropout_prob=P, pad_token_id=None, **TEXT),
    "megatron_bert_no_pad": _text_case("megatron_bert_no_pad", transformers.MegatronBertForSequenceClassification,
                                       transformers.MegatronBertConfig, pad_token_id=None, **TEXT),
    "megatron_bert_mask_4d": dataclasses.replace(_text_case(
        "megatron_bert_mask_4d", transformers.MegatronBertForSequenceClassification, transformers.MegatronBertConfig,
        **TEXT), data=_masked_texts),
    "squeezebert_mask_4d": dataclasses.replace(_text_case(
        "squeezebert_mask_4d", transformers.SqueezeBertForSequenceClassification, transformers.SqueezeBertConfig,
        embedding_size=16, q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1, intermediate_groups=1,
        output_groups=1, **TEXT), data=_masked_texts),
    "nystromformer_no_pad": _text_case("nystromformer_no_pad", transformers.NystromformerForSequenceClassification,
                                       transformers.NystromformerConfig, num_landmarks=4, segment_means_seq_len=8,
                                       pad_token_id=None, tol=1e-8, **TEXT),
    "yoso": _text_case("yoso", transformers.YosoForSequenceClassification, transformers.YosoConfig,
                       **{**TEXT, "max_position_embeddings": 16}),
    "canine": _text_case("canine", transformers.CanineForSequenceClassification, transformers.CanineConfig,
                         downsampling_rate=2, num_hash_functions=2, num_hash_buckets=32, local_transformer_stride=4,
                         **{k: v for k, v in TEXT.items() if k != "vocab_size"}),
    "megatron_bert": _text_case("megatron_bert", transformers.MegatronBertForSequenceClassification,
                                transformers.MegatronBertConfig, **TEXT),
    "esm": _text_case("esm", transformers.EsmForSequenceClassification, transformers.EsmConfig, pad_token_id=0,
                      position_embedding_type="rotary", **TEXT),
    "ibert": _text_case("ibert", transformers.IBertForSequenceClassification, transformers.IBertConfig,
                        quant_mode=False, pad_token_id=0, **{**TEXT, "max_position_embeddings": 16}),
    "layoutlm": classifier_case("layoutlm", _build(transformers.LayoutLMForSequenceClassification,
                                                   transformers.LayoutLMConfig, num_labels=3, **TEXT), _layout_data),
    "layoutlm_no_pad": classifier_case("layoutlm_no_pad", _build(
        transformers.LayoutLMForSequenceClassification, transformers.LayoutLMConfig, num_labels=3, pad_token_id=None,
        **TEXT), _layout_data),
    "perceiver": classifier_case("perceiver", _build(
        transformers.PerceiverForSequenceClassification, transformers.PerceiverConfig, num_latents=4, d_latents=16,
        d_model=16, num_blocks=1, num_self_attends_per_block=1, num_self_attention_heads=2,
        num_cross_attention_heads=1, vocab_size=VOCAB, max_position_embeddings=16, attention_probs_dropout_prob=P,
        num_labels=3), _perceiver_data),
    # ---- vision and audio without batch norm
    "poolformer": classifier_case("poolformer", _build(
        transformers.PoolFormerForImageClassification, transformers.PoolFormerConfig, num_channels=3,
        hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2, patch_sizes=[3, 3], strides=[2, 2],
        padding=[1, 1], pool_size=3, mlp_ratio=2.0, hidden_dropout_prob=P, drop_path_rate=0.0, num_labels=3),
        _images()),
    "ast": classifier_case("ast", _drawn_tokens(_build(transformers.ASTForAudioClassification, transformers.ASTConfig,
                                         patch_size=8, frequency_stride=8, time_stride=8, max_length=16,
                                         num_mel_bins=16, num_labels=3, **ENC)), _spectrograms),
}

def _warm_statistics(build):
    """``build`` with its batch norms' running statistics set from the training images (a cumulative average over
    one training-mode forward, without a gradient), as a trained model's are.

    From their initial values (mean 0, variance 1) three steps at momentum 0.1 barely move them, so the evaluation
    mode forward divides activations of small variance by about 1: MobileNetV2's 17 blocks then amplify its logits
    to ~1e4, a path so curved that the adaptive rule runs to its cap at every step (over 150 s on this case).
    """
    def warmed():
        model = build().to(torch.float64)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.momentum = None
        with torch.no_grad():
            model.train()(pixel_values=_images()()[0]["pixel_values"][:N])
        for norm in norms:
            norm.momentum = 0.1
        return model
    return warmed


#: Convolutional and hybrid image classifiers with train-mode batch norm (running statistics move every step).
BATCH_NORM: dict[str, Case] = {
    "efficientnet": classifier_case("efficientnet", _warm_statistics(_build(
        transformers.EfficientNetForImageClassification, transformers.EfficientNetConfig, num_channels=3,
        image_size=16, width_coefficient=0.1, depth_coefficient=0.1, kernel_sizes=[3, 3], in_channels=[8, 8],
        out_channels=[8, 16], depthwise_padding=[], strides=[1, 2], num_block_repeats=[1, 1], expand_ratios=[1, 2],
        hidden_dim=128, dropout_rate=P, drop_connect_rate=0.2, num_labels=3)), _images()),
    "mobilenet_v2": classifier_case("mobilenet_v2", _warm_statistics(_build(
        transformers.MobileNetV2ForImageClassification, transformers.MobileNetV2Config, num_channels=3,
        image_size=16, depth_multiplier=0.1, min_depth=4, finegrained_output=False, first_layer_is_expansion=True,
        hidden_act="gelu",
        classifier_dropout_prob=P, num_labels=3)), _images()),
    "cvt": classifier_case("cvt", _warm_statistics(_build(
        transformers.CvtForImageClassification, transformers.CvtConfig, num_channels=3, patch_sizes=[3],
        patch_stride=[2], patch_padding=[1], embed_dim=[16], num_heads=[2], depth=[1], mlp_ratio=[2.0],
        attention_drop_rate=[P], drop_rate=[P], drop_path_rate=[0.0], qkv_bias=[True], cls_token=[True],
        qkv_projection_method=["dw_bn"], kernel_qkv=[3], padding_kv=[1], stride_kv=[2], padding_q=[1],
        stride_q=[1], num_labels=3)), _images()),
    "swiftformer": classifier_case("swiftformer", _warm_statistics(_build(
        transformers.SwiftFormerForImageClassification, transformers.SwiftFormerConfig, num_channels=3,
        depths=[1, 1], embed_dims=[8, 16], mlp_ratio=2, downsamples=[True, True], hidden_act="gelu",
        drop_path_rate=0.0, num_labels=3)), _images()),
    "levit": classifier_case("levit", _warm_statistics(_build(
        transformers.LevitForImageClassification, transformers.LevitConfig, image_size=16, num_channels=3,
        kernel_size=3, stride=2, padding=1, patch_size=16, hidden_sizes=[16, 16], num_attention_heads=[2, 2],
        depths=[1, 1], key_dim=[8, 8], drop_path_rate=0, mlp_ratio=[2, 2], attention_ratio=[2, 2],
        down_ops=[["Subsample", 8, 2, 2, 2, 2], [""]], num_labels=3)), _images()),
}


# ---------------------------------------------------------------- distribution heads and segmentation
def _forecast_data() -> tuple[dict[str, Tensor], Tensor]:
    """Series of 10 past values (context 8 plus lags up to 2) and 4 future values, one time feature."""
    gen = torch.Generator().manual_seed(14)
    t = torch.arange(14, dtype=torch.float64)
    series = torch.sin(t[None] * torch.rand(ROWS, 1, generator=gen, dtype=torch.float64)) + 2.0
    feats = (t / 14)[None, :, None].expand(ROWS, 14, 1)
    X = {"past_values": series[:, :10], "past_time_features": feats[:, :10], "past_observed_mask": torch.ones(ROWS, 10),
         "future_values": series[:, 10:], "future_time_features": feats[:, 10:]}
    return X, series[:, 10:]


TS = dict(prediction_length=4, context_length=8, lags_sequence=[1, 2], num_time_features=1, input_size=1, d_model=16,
          encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
          encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=P, attention_dropout=P, activation_dropout=P,
          encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=False)


def _forecast_case(name: str, model_cls, config_cls, **cfg) -> Case:
    """A forecaster with its Student-t head, trained on its own negative log-likelihood."""
    return Case(name, _build(model_cls, config_cls, **{**TS, **cfg}), _forecast_data,
                lambda model, xb, yb: model(**xb).loss, lambda out, y: out.loss, lambda out, y: out.loss, target=None)


def _segmentation_data() -> tuple[dict[str, Tensor], Tensor]:
    """16x16 images and per-pixel labels in 0..2, a corner of some rows 255 (ignored)."""
    X, _ = _images(seed=15)()
    labels = torch.randint(0, 3, (ROWS, 16, 16), generator=torch.Generator().manual_seed(15))
    labels[::3, :4, :4] = 255
    return X, labels


def _segmentation_loss(out, y: Tensor) -> Tensor:
    """SegFormer's own loss: the logits upsampled bilinearly to the labels' size, cross entropy ignoring 255."""
    logits = torch.nn.functional.interpolate(logits_of(out), size=y.shape[-2:], mode="bilinear", align_corners=False)
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=255)


OTHERS: dict[str, Case] = {
    "time_series_transformer": _forecast_case(
        "time_series_transformer", transformers.TimeSeriesTransformerForPrediction,
        transformers.TimeSeriesTransformerConfig),
    "informer": _forecast_case("informer", transformers.InformerForPrediction, transformers.InformerConfig,
                               attention_type="full"),
    "segformer_segmentation": Case("segformer_segmentation", _warm_statistics(_build(
        transformers.SegformerForSemanticSegmentation, transformers.SegformerConfig, num_channels=3,
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_dropout_prob=P,
        attention_probs_dropout_prob=P, classifier_dropout_prob=P, drop_path_rate=0.0, decoder_hidden_size=16,
        num_labels=3)), _segmentation_data, lambda model, xb, yb: model(**xb, labels=yb).loss, _segmentation_loss,
        _segmentation_loss, target=None),
}



def _patches(pixels: Tensor) -> Tensor:
    """``(n, 3, 16, 16)`` images as ``(n, 16, 48)``: 4x4 patches in row-major order, each flattened (row, column,
    channel), the layout of ViTMAE's reconstruction logits."""
    n = pixels.shape[0]
    return pixels.reshape(n, 3, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(n, 16, 48)


def _masked_images(noise: bool):
    """16x16 images and targets ``(n, 16, 49)``: each patch's pixels and, last, 1 where ViTMAE masks it. With
    ``noise`` the per-patch noise ViTMAE ranks to choose the masked half is an input (the 8 patches of largest
    noise); without, the model draws it and the mask column is 0."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        X, _ = _images(seed=16)()
        mask = torch.zeros(ROWS, 16, 1, dtype=torch.float64)
        if noise:
            X["noise"] = torch.rand(ROWS, 16, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
            mask[..., 0] = (X["noise"].argsort(-1).argsort(-1) >= 8).double()
        return X, torch.cat([_patches(X["pixel_values"]), mask], -1)
    return data


def _all_patches_mse(out, y: Tensor) -> Tensor:
    return ((logits_of(out) - y[..., :-1]) ** 2).mean()


VITMAE = dict(image_size=16, patch_size=4, num_channels=3, mask_ratio=0.5, decoder_hidden_size=16,
              decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=32, **ENC)
OTHERS["vitmae_random_mask"] = Case("vitmae_random_mask", _build(transformers.ViTMAEForPreTraining,
                                                                transformers.ViTMAEConfig, **VITMAE),
                                    _masked_images(False), lambda model, xb, yb: _all_patches_mse(model(**xb), yb),
                                    _all_patches_mse, _all_patches_mse, target=None)
