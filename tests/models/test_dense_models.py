"""Dense models: ViT feature maps, SETR-PUP / UperNet heads, the segmenter, sliding-window
inference, ViTDet's simple feature pyramid and the torchvision detectors (tiny, CPU)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from mimkit.config import ModelConfig
from mimkit.engine.optim import layer_decay_param_groups
from mimkit.models import build_encoder
from mimkit.models.detection import SimpleFeaturePyramid, build_detector
from mimkit.models.features import ViTFeatures
from mimkit.models.segmentation import (
    FCNHead,
    SegmentationOutput,
    Segmenter,
    SetrPUPHead,
    UperNetHead,
    default_out_indices,
    slide_inference,
    whole_inference,
)

D, P = 32, 4
BEIT = dict(layer_scale=0.1, rel_pos_bias="per_layer", abs_pos_emb=False)


def _encoder(method: str = "mae", *, img: int = 32, chans: int = 3, depth: int = 4):
    extra = BEIT if method == "beit" else {}
    cfg = ModelConfig(
        method=method,
        arch="custom",
        img_size=img,
        patch_size=P,
        in_chans=chans,
        embed_dim=D,
        depth=depth,
        num_heads=2,
        mlp_ratio=2.0,
        **extra,
    )
    torch.manual_seed(0)
    return build_encoder(cfg, fixed_pos_embed=False, mask_token=False)


def _covers_each_once(model: nn.Module) -> None:
    groups = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.65)
    seen = Counter(id(p) for g in groups for p in g["params"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert set(seen) == {id(p) for p in trainable}
    assert all(c == 1 for c in seen.values())
    # head_lr_mult multiplies exactly the non-encoder (neck and head) parameters' scales
    plain = {n: g["lr_scale"] for g in groups for n in g["names"]}
    mult = layer_decay_param_groups(model, weight_decay=0.05, layer_decay=0.65, head_lr_mult=10)
    for g in mult:
        for n in g["names"]:
            head = "encoder." not in n
            assert g["lr_scale"] == pytest.approx(plain[n] * (10 if head else 1)), n


# ---- feature maps ----


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_vit_features_are_the_block_outputs_as_maps(method):
    enc = _encoder(method).eval()
    feats = ViTFeatures(enc, out_indices=(0, 1, 2, -1))
    assert feats.out_indices == (0, 1, 2, 3)
    assert (feats.embed_dim, feats.patch_size) == (D, P)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = feats(x)
        tokens = enc.forward_intermediates(x, [0, 1, 2, 3])
    assert len(maps) == 4
    for m, t in zip(maps, tokens, strict=True):
        assert m.shape == (2, D, 8, 8)
        # the patch at (row r, column c) is token 1 + r * 8 + c (after the cls token)
        for r, c in [(0, 0), (0, 7), (3, 5), (7, 2)]:
            torch.testing.assert_close(m[:, :, r, c], t[:, 1 + r * 8 + c])
    assert not torch.allclose(maps[0], maps[3])


def test_vit_features_reject_other_sizes():
    feats = ViTFeatures(_encoder(), out_indices=(3,))
    with pytest.raises(ValueError, match="position tables"):
        feats(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="out of range"):
        ViTFeatures(_encoder(), out_indices=(4,))


# ---- heads ----


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (8, 3), (1, 1)])
@pytest.mark.parametrize("upsample", [1, 4, 16])
def test_setr_pup_shapes(hw, upsample):
    head = SetrPUPHead(D, 5, channels=8, upsample=upsample)
    assert len(head.stages) == max(upsample.bit_length() - 1, 1)
    out = head(torch.randn(2, D, *hw))
    assert out.shape == (2, 5, hw[0] * upsample, hw[1] * upsample)


@pytest.mark.parametrize("bad", [0, 3, 12, -4, 2.0])
def test_setr_pup_rejects_bad_upsample(bad):
    with pytest.raises(ValueError, match="power of 2"):
        SetrPUPHead(D, 5, upsample=bad)


@pytest.mark.parametrize("hw", [(4, 4), (5, 7), (8, 3), (1, 2)])
@pytest.mark.parametrize("train", [True, False])
def test_upernet_shapes(hw, train):
    head = UperNetHead(D, 5, channels=16).train(train)
    out = head([torch.randn(2, D, *hw) for _ in range(4)])
    assert out.shape == (2, 5, 4 * hw[0], 4 * hw[1])


def test_upernet_trains_with_a_batch_of_one():
    """The PPM's 1x1 pooled map would break BatchNorm here; GroupNorm keeps it working."""
    head = UperNetHead(D, 3, channels=16).train()
    out = head([torch.randn(1, D, 4, 4, requires_grad=True) for _ in range(4)])
    out.sum().backward()
    assert out.shape == (1, 3, 16, 16)


def test_upernet_neck_and_inputs():
    head = UperNetHead(D, 3, channels=8, neck_scales=(2.0, 1.0))
    assert head([torch.randn(1, D, 3, 5)] * 2).shape == (1, 3, 6, 10)
    with pytest.raises(ValueError, match="takes 2 maps"):
        head([torch.randn(1, D, 3, 5)] * 4)
    with pytest.raises(ValueError, match="decreasing"):
        UperNetHead(D, 3, neck_scales=(0.5, 1.0))
    with pytest.raises(ValueError, match="powers of 2"):
        UperNetHead(D, 3, neck_scales=(3.0, 1.0))


def test_fcn_head_shape():
    assert FCNHead(D, 4, channels=8)(torch.randn(2, D, 5, 3)).shape == (2, 4, 5, 3)


# ---- segmenter ----


def test_default_out_indices():
    assert default_out_indices(12, head="upernet") == (3, 5, 7, 11)
    assert default_out_indices(24, head="upernet") == (7, 11, 15, 23)
    assert default_out_indices(6, head="upernet") == (1, 2, 3, 5)
    assert default_out_indices(4, head="upernet") == (0, 1, 2, 3)
    assert default_out_indices(12, head="setr_pup") == (11,)
    with pytest.raises(ValueError, match="head"):
        default_out_indices(12, head="fpn")


@pytest.mark.parametrize("method", ["mae", "beit"])
@pytest.mark.parametrize("head", ["upernet", "setr_pup"])
@pytest.mark.parametrize("img", [32, 24])
def test_segmenter_output_at_input_size(method, head, img):
    model = Segmenter(_encoder(method, img=img), num_classes=5, head=head, channels=8)
    x = torch.randn(2, 3, img, img)
    assert model(x).shape == (2, 5, img, img)
    out = model.forward_train(x)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (2, 5, img, img)
    assert out.aux_logits is None
    model.eval()
    assert model(x).shape == (2, 5, img, img)


@pytest.mark.parametrize("head", ["upernet", "setr_pup"])
def test_segmenter_aux_head(head):
    blocks = (0, 1, 3, 3) if head == "upernet" else (3,)
    model = Segmenter(
        _encoder(), num_classes=3, head=head, out_indices=blocks, channels=8, aux_channels=8
    )
    aux_block = 3 if head == "upernet" else 2  # out_indices[-2] / depth // 2
    assert model.aux_index == aux_block
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        maps = ViTFeatures(model.encoder, out_indices=(aux_block,))(x)
        expected = nn.functional.interpolate(
            model.aux_head(maps[0]), size=(32, 32), mode="bilinear", align_corners=False
        )
        torch.testing.assert_close(model.forward_train(x).aux_logits, expected)
    model.train()
    out = model.forward_train(x)
    assert out.aux_logits.shape == out.logits.shape == (2, 3, 32, 32)
    (out.logits.mean() + 0.4 * out.aux_logits.mean()).backward()
    assert model.aux_head.classifier.weight.grad is not None
    assert model(x).shape == (2, 3, 32, 32)  # forward: logits only
    assert {k.split(".")[0] for k in model.state_dict()} == {"encoder", "head", "aux_head"}


def test_segmenter_rejects_bad_configs():
    with pytest.raises(ValueError, match="head"):
        Segmenter(_encoder(), num_classes=3, head="fpn", out_indices=(3,))
    with pytest.raises(ValueError, match="4 blocks"):
        Segmenter(_encoder(), num_classes=3, head="upernet", out_indices=(1, 3))
    with pytest.raises(ValueError, match="1 block"):
        Segmenter(_encoder(), num_classes=3, head="setr_pup", out_indices=(1, 3))


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_segmenter_layer_decay(method):
    model = Segmenter(_encoder(method), num_classes=3, channels=8, aux_channels=8)
    enc, top = model.encoder, model.num_layers - 1
    assert model.num_layers == enc.num_layers
    for name, _ in model.named_parameters():
        if name.startswith("encoder."):
            assert model.layer_id(name) == enc.layer_id(name.removeprefix("encoder."))
        else:
            assert name.startswith(("head.", "aux_head.")) and model.layer_id(name) == top
    assert model.layer_id("encoder.blocks.1.attn.qkv.weight") == 2
    assert model.no_weight_decay() == {f"encoder.{n}" for n in enc.no_weight_decay()}
    assert "encoder.cls_token" in model.no_weight_decay()
    _covers_each_once(model)


# ---- inference ----


class _PerPixel(nn.Module):
    """A 1x1 conv: translation-equivariant, so any window layout gives the direct result."""

    def __init__(self, chans: int = 3, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(chans, classes, 1)

    def forward(self, x):
        return self.conv(x)


def test_slide_inference_one_window_is_the_model():
    model = Segmenter(_encoder(), num_classes=3, channels=8).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            slide_inference(model, x, window=32, stride=16, num_classes=3), model(x)
        )


@pytest.mark.parametrize("hw", [(37, 50), (16, 29), (10, 13)])
def test_slide_inference_per_pixel_model(hw):
    model, x = _PerPixel(), torch.randn(2, 3, *hw)
    with torch.no_grad():
        out = slide_inference(model, x, window=16, stride=10, num_classes=4)
        torch.testing.assert_close(out, model(x))


def test_slide_inference_averages_overlaps():
    """A model that answers the window's mean input: the result is the mean over the windows
    covering each pixel, here checked on one row of a 1 x 20 strip with windows at 0, 4."""

    class WindowMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])

    x = torch.arange(20.0).view(1, 1, 1, 20).expand(1, 1, 16, 20).contiguous()
    out = slide_inference(WindowMean(), x, window=16, stride=8, num_classes=1)
    first, second = x[..., :16].mean(), x[..., 4:].mean()  # windows at 0 and (flush) 4
    torch.testing.assert_close(out[0, 0, 0, :4], first.expand(4))
    torch.testing.assert_close(out[0, 0, 0, 4:16], ((first + second) / 2).expand(12))
    torch.testing.assert_close(out[0, 0, 0, 16:], second.expand(4))


def test_slide_inference_on_a_segmenter_smaller_and_larger_images():
    model = Segmenter(_encoder(), num_classes=3, channels=8).eval()
    with torch.no_grad():
        for hw in [(20, 28), (40, 52)]:
            out = slide_inference(
                model, torch.randn(1, 3, *hw), window=32, stride=20, num_classes=3
            )
            assert out.shape == (1, 3, *hw) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="stride"):
        slide_inference(model, torch.randn(1, 3, 40, 40), window=32, stride=40, num_classes=3)


def test_whole_inference():
    model = Segmenter(_encoder(), num_classes=3, channels=8).eval()
    with torch.no_grad():
        assert whole_inference(model, torch.randn(2, 3, 40, 24), size=32).shape == (2, 3, 40, 24)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(whole_inference(model, x, size=32), model(x))
        pix, y = _PerPixel(), torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(whole_inference(pix, y, size=32), pix(y))


# ---- detection ----


def test_simple_feature_pyramid():
    enc = _encoder()
    fpn = SimpleFeaturePyramid(enc, out_channels=16)
    assert fpn.encoder is enc and fpn.out_channels == 16
    assert fpn.strides == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert fpn.out_indices == (3, 3, 3, 3)
    out = fpn(torch.randn(2, 3, 32, 32))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for (name, m), s in zip(out.items(), fpn.strides, strict=True):
        assert m.shape == (2, 16, int(32 / s), int(32 / s)), name


def test_simple_feature_pyramid_multi_block():
    enc = _encoder().eval()
    fpn = SimpleFeaturePyramid(enc, out_channels=8, out_indices=(0, 1, 2, -1)).eval()
    assert fpn.out_indices == (0, 1, 2, 3)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = fpn(x)
        maps = ViTFeatures(enc, out_indices=(0, 1, 2, 3))(x)
        for i in range(4):
            torch.testing.assert_close(out[str(i)], fpn.stages[i](maps[i]))
        # the single-block default reads block 3 at every scale
        single = SimpleFeaturePyramid(enc, out_channels=8).eval()
        single.stages.load_state_dict(fpn.stages.state_dict())
        torch.testing.assert_close(single(x)["0"], fpn.stages[0](maps[3]))
        assert not torch.allclose(single(x)["0"], out["0"])
    with pytest.raises(ValueError, match="one block per scale"):
        SimpleFeaturePyramid(enc, out_indices=(0, 1))


def _targets(masks: bool):
    boxes = [
        torch.tensor([[2.0, 3.0, 20.0, 25.0], [12.0, 10.0, 30.0, 28.0]]),
        torch.tensor([[4.0, 4.0, 14.0, 16.0]]),
    ]
    out = []
    for b in boxes:
        t = {"boxes": b, "labels": torch.randint(1, 3, (len(b),))}
        if masks:
            m = torch.zeros(len(b), 32, 32, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(b.int().tolist()):
                m[i, y0:y1, x0:x1] = 1
            t["masks"] = m
        out.append(t)
    return out


def _detector(chans: int = 3, img: int = 32, **kw):
    return build_detector(
        _encoder(chans=chans, img=img),
        num_classes=3,
        img_size=img,
        mean=(0.5,) * chans,
        std=(0.25,) * chans,
        out_channels=16,
        representation_size=32,
        rpn_batch_size_per_image=32,
        box_batch_size_per_image=32,
        **kw,
    )


@pytest.mark.parametrize(("masks", "chans"), [(False, 3), (True, 3), (False, 1)])
def test_detector_trains_and_predicts(masks, chans):
    det = _detector(chans, masks=masks)
    images = [torch.rand(chans, 32, 32) for _ in range(2)]
    det.train()
    losses = det(images, _targets(masks))
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if masks else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert det.encoder.patch_embed.proj.weight.grad is not None
    det.eval()
    with torch.no_grad():
        preds = det(images)
    assert len(preds) == 2
    for p in preds:
        assert {"boxes", "scores", "labels"} <= set(p) and p["boxes"].shape[-1] == 4
        assert len(p["boxes"]) <= 100
        if masks:
            assert p["masks"].shape == (len(p["boxes"]), 1, 32, 32)


@pytest.mark.parametrize("size", [32, 24])
def test_detector_transform_keeps_img_size_canvases(size):
    det = _detector(img=size)
    tf = det.model.transform
    img = torch.rand(3, size, size)
    norm = (img - 0.5) / 0.25
    for train in (True, False):
        tf.train(train)
        targets = _targets(False)[:1]
        batch, out_targets = tf([img], targets if train else None)
        assert batch.image_sizes == [(size, size)] and batch.tensors.shape == (1, 3, size, size)
        torch.testing.assert_close(batch.tensors[0], norm, rtol=0, atol=0)
        if train:
            torch.testing.assert_close(out_targets[0]["boxes"], targets[0]["boxes"])
    tf.eval()  # a smaller image is letterboxed onto the img_size canvas, not stretched
    assert tf([torch.rand(3, size // 2, size)])[0].tensors.shape == (1, 3, size, size)
    det.train()  # and the whole model runs at that size
    losses = det([torch.rand(3, size, size)], _targets(False)[1:])
    assert all(torch.isfinite(v) for v in losses.values())


def test_detector_parameters_once_and_layer_decay():
    det = _detector(masks=True)
    ids = [id(p) for p in det.parameters()]
    assert len(ids) == len(set(ids))
    enc = det.encoder
    assert enc is det.model.backbone.encoder
    assert {id(p) for p in enc.parameters()} <= set(ids)
    assert det.num_layers == enc.num_layers
    prefix = "model.backbone.encoder."
    for name, _ in det.named_parameters():
        if name.startswith(prefix):
            assert det.layer_id(name) == enc.layer_id(name.removeprefix(prefix))
        else:
            assert det.layer_id(name) == det.num_layers - 1
    assert det.no_weight_decay() == {prefix + n for n in enc.no_weight_decay()}
    assert {prefix + n for n, _ in enc.named_parameters()} <= {n for n, _ in det.named_parameters()}
    _covers_each_once(det)


def test_build_detector_validates():
    enc = _encoder()
    ok = dict(num_classes=3, img_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    with pytest.raises(ValueError, match="per channel"):
        build_detector(enc, **ok | {"mean": (0.5,)})
    with pytest.raises(ValueError, match="img_size"):
        build_detector(enc, **ok | {"img_size": 64})
    with pytest.raises(ValueError, match="halve"):
        build_detector(enc, **ok, scales=(4.0, 1.0))
    with pytest.raises(ValueError, match="one entry per level"):
        build_detector(enc, **ok, anchor_sizes=(8, 16))
    anchors = _detector().model.rpn.anchor_generator.sizes
    assert anchors == ((8,), (16,), (32,), (64,), (128,))  # 8 x stride
