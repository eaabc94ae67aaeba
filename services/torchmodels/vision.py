"""Vision stages from torchvision: JPEG decoding, an SSDlite detector, crops by `roi_align`, a
ResNet classifier and a ViT encoder. Images between stages are `uint8 [3, H, W]` (CHW, as
torchvision has them); every network normalises its own input inside its graph.

Plug-in factories (`factory(ctx, **options)`):

    jpeg_decode   jpeg uint8 [max_bytes] (common/jpeg.py framing) -> image uint8 [3, H, W]
    detector      image -> boxes float32 [K, 4] (x1, y1, x2, y2 in image pixels), scores [K],
                  labels int32 [K]; the K best detections, zero-padded
    crop          image, boxes -> crops [K, 3, S, S] (compute dtype, ImageNet-normalised)
    classifier    crops -> classes int32 [K] (ResNet-50 by default)
    vit_encoder   image -> features [1 + patches, hidden] (compute dtype; ViT-B/16 by default)
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from common import jpeg
from common.errors import InvalidArgument
from services.stage.plugin import ModelContext
from services.torchmodels import detection
from services.torchmodels.core import TorchStage, calibrate_batchnorm, pair, positive, spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLASSIFIERS = ("resnet18", "resnet34", "resnet50", "resnet101")
_DEPRECATED = "The image decoding and encoding capabilities of TorchVision are deprecated"


class Normalise:
    """[0, 255] NCHW -> (x / 255 - mean) / std. The constants are made on the device once, at
    build: a host-to-device copy inside a forward would break its CUDA graph capture."""

    def __init__(self, stage: TorchStage, mean: Any, std: Any) -> None:
        torch = stage.torch
        self.mean = torch.tensor(mean, dtype=stage.dtype, device=stage.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=stage.dtype, device=stage.device).view(1, -1, 1, 1)

    def __call__(self, x: Any) -> Any:
        return (x / 255 - self.mean) / self.std


class JpegDecode(TorchStage):
    """Decodes on the GPU with nvJPEG (`torchvision.io.decode_jpeg(device="cuda")`, one batched
    call), with libjpeg-turbo on the host backend. nvJPEG reads its input from host memory, so
    the CUDA path first copies the batch's length headers, then the used prefix of the rows (one
    copy each, bounded by the longest JPEG). Images of another size than the output are resized
    (bilinear, antialiased); a row of length 0 is a black image. Not graph-safe (host work)."""

    def __init__(self, ctx: ModelContext, out_size: Any, max_bytes: int) -> None:
        super().__init__(ctx, "jpeg_decode")
        self.h, self.w = pair("out_size", out_size)
        self.max_bytes = positive("max_bytes", max_bytes)
        if self.max_bytes <= jpeg.HEADER_BYTES:
            raise InvalidArgument(f"option max_bytes={max_bytes} leaves no room for a JPEG")
        from torchvision import io as tvio

        self.tvio = tvio
        self.inputs = [spec("jpeg", np.uint8, (self.max_bytes,))]
        self.outputs = [spec("image", np.uint8, (3, self.h, self.w))]

    def forward(self, data: Any) -> list[Any]:
        torch = self.torch
        n = int(data.shape[0])
        head = data[:, : jpeg.HEADER_BYTES].cpu().numpy()
        lengths = jpeg.lengths(head, self.max_bytes)
        used = jpeg.HEADER_BYTES + int(lengths.max(initial=0))
        host = data[:, :used].cpu()
        out = torch.zeros((n, 3, self.h, self.w), dtype=torch.uint8, device=self.device)
        rows = [i for i in range(n) if lengths[i] > 0]
        if not rows:
            return [out]
        files = [host[i, jpeg.HEADER_BYTES : jpeg.HEADER_BYTES + int(lengths[i])] for i in rows]
        mode = self.tvio.ImageReadMode.RGB
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its codecs for TorchCodec, which is not yet in
                # the images we deploy on; decode_jpeg is what they have
                warnings.filterwarnings("ignore", _DEPRECATED, DeprecationWarning)
                if self.cuda:
                    images = self.tvio.decode_jpeg(files, mode=mode, device=self.device)
                else:
                    images = [self.tvio.decode_jpeg(f, mode=mode) for f in files]
        except RuntimeError as e:
            raise InvalidArgument(f"a JPEG input cannot be decoded: {e}") from e
        for i, img in zip(rows, images, strict=True):
            out[i] = self.resize(img)
        return [out]

    def resize(self, img: Any) -> Any:
        if tuple(img.shape[1:]) == (self.h, self.w):
            return img
        f = self.torch.nn.functional
        x = f.interpolate(img[None].float(), size=(self.h, self.w), mode="bilinear", antialias=True)
        return x[0].round().clamp(0, 255).to(self.torch.uint8)


def jpeg_decode(
    ctx: ModelContext, out_size: Any = (224, 224), max_bytes: int = 131072
) -> JpegDecode:
    return JpegDecode(ctx, out_size, max_bytes)


class Detector(TorchStage):
    """torchvision's SSDlite320 on MobileNetV3-Large (COCO's 91 classes): the K best detections
    per image in image pixels, zero-padded. Resize to the work size, normalisation, backbone,
    head and post-processing are one graph-safe function, a single CUDA graph replay per batch.

    The post-processing is not torchvision's (a Python loop over images and classes with a host
    sync per class) but services/torchmodels/detection.py: the `candidates` best (anchor, class)
    pairs per image, then class-aware Fast NMS (Bolya et al., YOLACT, ICCV 2019), in which a
    suppressed box can still suppress a lower-scored one of its class, so it keeps slightly fewer
    boxes than greedy NMS; both keep the same where suppressions do not chain."""

    def __init__(
        self,
        ctx: ModelContext,
        image_size: Any,
        max_boxes: int,
        work_size: int,
        num_classes: int,
        score_thresh: float,
        weights: str | None,
        candidates: int,
    ) -> None:
        super().__init__(ctx, "detector")
        from torchvision.models.detection import ssdlite320_mobilenet_v3_large
        from torchvision.models.detection.image_list import ImageList

        self.h, self.w = pair("image_size", image_size)
        self.k = positive("max_boxes", max_boxes)
        self.work = positive("work_size", work_size)
        if positive("candidates", candidates) < self.k:
            raise InvalidArgument(
                f"option candidates={candidates} must be at least max_boxes={self.k}"
            )
        if positive("num_classes", num_classes) < 2:
            raise InvalidArgument(f"option num_classes={num_classes} has no class but background")
        torch = self.torch
        self.seeded()
        net = ssdlite320_mobilenet_v3_large(
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            score_thresh=float(score_thresh),
            detections_per_img=self.k,
        )
        if not weights:
            # four images of noise at the work size, normalised as the stage does
            noise = torch.rand((4, 3, self.work, self.work), generator=self.generator()) * 2 - 1
            calibrate_batchnorm(torch, net, lambda: net.head(list(net.backbone(noise).values())))
        self.net = self.place(net, weights)
        self.normalise = Normalise(self, net.transform.image_mean, net.transform.image_std)
        # work-size boxes -> image pixels (x1, y1, x2, y2)
        self.scale = self.torch.tensor(
            [self.w / self.work, self.h / self.work] * 2,
            dtype=self.torch.float32,
            device=self.device,
        )
        self.inputs = [spec("image", np.uint8, (3, self.h, self.w))]
        self.outputs = [
            spec("boxes", np.float32, (self.k, 4)),
            spec("scores", np.float32, (self.k,)),
            spec("labels", np.int32, (self.k,)),
        ]
        # anchors depend only on the feature map sizes: one image's, made once
        with torch.inference_mode():
            x = torch.zeros((1, 3, self.work, self.work), dtype=self.dtype, device=self.device)
            features = [f.float() for f in self.net.backbone(x).values()]
            self.anchor = self.net.anchor_generator(
                ImageList(x, [(self.work, self.work)]), features
            )[0]
        self.postprocess = detection.from_ssd(self.net, self.anchor, self.work, candidates, self.k)
        self.run = self.graphed("detect", self._detect, self.inputs)

    def _dense(self, image: Any) -> tuple[Any, Any]:
        torch = self.torch
        x = image.to(self.dtype)
        if (self.h, self.w) != (self.work, self.work):
            x = torch.nn.functional.interpolate(
                x, size=(self.work, self.work), mode="bilinear", align_corners=False
            )
        x = self.normalise(x)
        features = list(self.net.backbone(x).values())
        head = self.net.head(features)
        return head["bbox_regression"], head["cls_logits"]

    def _detect(self, image: Any) -> tuple[Any, Any, Any]:
        boxes, scores, labels = self.postprocess(*self._dense(image))
        return boxes * self.scale, scores, labels.to(self.torch.int32)

    def forward(self, image: Any) -> list[Any]:
        return list(self.run(image))


def detector(
    ctx: ModelContext,
    image_size: Any = (720, 1280),
    max_boxes: int = 16,
    work_size: int = 320,
    num_classes: int = 91,
    score_thresh: float = 0.001,
    weights: str | None = None,
    candidates: int = 300,
) -> Detector:
    """`candidates`: the (anchor, class) pairs per image that NMS considers (torchvision's
    SSDlite takes up to 300 per class, far more than the K kept)."""
    return Detector(
        ctx, image_size, max_boxes, work_size, num_classes, score_thresh, weights, candidates
    )


class Crop(TorchStage):
    """Each box's region of the image, resampled to S x S by `torchvision.ops.roi_align`
    (bilinear, `sampling_ratio` samples a side per output pixel, pixel-aligned), ImageNet-
    normalised. Graph-safe."""

    def __init__(
        self,
        ctx: ModelContext,
        image_size: Any,
        max_boxes: int,
        crop_size: int,
        sampling_ratio: int,
    ) -> None:
        super().__init__(ctx, "crop")
        from torchvision.ops import roi_align

        self.roi_align = roi_align
        self.h, self.w = pair("image_size", image_size)
        self.k = positive("max_boxes", max_boxes)
        self.s = positive("crop_size", crop_size)
        self.sampling = positive("sampling_ratio", sampling_ratio)
        self.normalise = Normalise(self, IMAGENET_MEAN, IMAGENET_STD)
        self.inputs = [
            spec("image", np.uint8, (3, self.h, self.w)),
            spec("boxes", np.float32, (self.k, 4)),
        ]
        self.outputs = [spec("crops", ctx.compute_dtype, (self.k, 3, self.s, self.s))]
        self.run = self.graphed("crop", self._crop, self.inputs)

    def _crop(self, image: Any, boxes: Any) -> Any:
        torch = self.torch
        n = image.shape[0]
        x = self.normalise(image.to(self.dtype))
        index = torch.arange(n, device=self.device, dtype=self.dtype).repeat_interleave(self.k)
        rois = torch.cat([index[:, None], boxes.reshape(-1, 4).to(self.dtype)], dim=1)
        crops = self.roi_align(
            x, rois, output_size=self.s, sampling_ratio=self.sampling, aligned=True
        )
        return crops.reshape(n, self.k, 3, self.s, self.s)

    def forward(self, image: Any, boxes: Any) -> list[Any]:
        return [self.run(image, boxes)]


def crop(
    ctx: ModelContext,
    image_size: Any = (720, 1280),
    max_boxes: int = 16,
    crop_size: int = 224,
    sampling_ratio: int = 2,
) -> Crop:
    return Crop(ctx, image_size, max_boxes, crop_size, sampling_ratio)


class Classifier(TorchStage):
    """A torchvision ResNet over every crop of an item (K crops a row); the class ids by argmax.
    Graph-safe."""

    def __init__(
        self,
        ctx: ModelContext,
        arch: str,
        max_boxes: int,
        crop_size: int,
        num_classes: int,
        weights: str | None,
    ) -> None:
        super().__init__(ctx, "classifier")
        import torchvision.models as tvm

        if arch not in CLASSIFIERS:
            raise InvalidArgument(f"option arch={arch!r} is not one of {', '.join(CLASSIFIERS)}")
        self.k = positive("max_boxes", max_boxes)
        self.s = positive("crop_size", crop_size)
        self.seeded()
        net = getattr(tvm, arch)(weights=None, num_classes=positive("num_classes", num_classes))
        self.net = self.place(net, weights)
        self.inputs = [spec("crops", ctx.compute_dtype, (self.k, 3, self.s, self.s))]
        self.outputs = [spec("classes", np.int32, (self.k,))]
        self.run = self.graphed("classify", self._classify, self.inputs)

    def _classify(self, crops: Any) -> Any:
        n = crops.shape[0]
        logits = self.net(crops.reshape(n * self.k, 3, self.s, self.s))
        return logits.argmax(dim=1).to(self.torch.int32).reshape(n, self.k)

    def forward(self, crops: Any) -> list[Any]:
        return [self.run(crops)]


def classifier(
    ctx: ModelContext,
    arch: str = "resnet50",
    max_boxes: int = 16,
    crop_size: int = 224,
    num_classes: int = 1000,
    weights: str | None = None,
) -> Classifier:
    return Classifier(ctx, arch, max_boxes, crop_size, num_classes, weights)


class VitEncoder(TorchStage):
    """torchvision's VisionTransformer without its classification head: the encoder's output
    tokens (class token first) for a decoder to cross-attend to. Graph-safe."""

    def __init__(
        self,
        ctx: ModelContext,
        image_size: int,
        patch_size: int,
        layers: int,
        heads: int,
        hidden: int,
        mlp: int,
        weights: str | None,
    ) -> None:
        super().__init__(ctx, "vit_encoder")
        from torchvision.models.vision_transformer import VisionTransformer

        size = positive("image_size", image_size)
        patch = positive("patch_size", patch_size)
        if size % patch:
            raise InvalidArgument(f"option image_size={size} is not a multiple of patch={patch}")
        if hidden % heads:
            raise InvalidArgument(f"option hidden={hidden} is not divisible by heads={heads}")
        self.seeded()
        net = VisionTransformer(
            image_size=size,
            patch_size=patch,
            num_layers=positive("layers", layers),
            num_heads=positive("heads", heads),
            hidden_dim=positive("hidden", hidden),
            mlp_dim=positive("mlp", mlp),
        )
        self.net = self.place(net, weights)
        self.normalise = Normalise(self, IMAGENET_MEAN, IMAGENET_STD)
        tokens = 1 + (size // patch) ** 2
        self.inputs = [spec("image", np.uint8, (3, size, size))]
        self.outputs = [spec("features", ctx.compute_dtype, (tokens, hidden))]
        self.run = self.graphed("encode", self._encode, self.inputs)

    def _encode(self, image: Any) -> Any:
        torch = self.torch
        x = self.net._process_input(self.normalise(image.to(self.dtype)))
        cls = self.net.class_token.expand(x.shape[0], -1, -1)
        return self.net.encoder(torch.cat([cls, x], dim=1))

    def forward(self, image: Any) -> list[Any]:
        return [self.run(image)]


def vit_encoder(
    ctx: ModelContext,
    image_size: int = 224,
    patch_size: int = 16,
    layers: int = 12,
    heads: int = 12,
    hidden: int = 768,
    mlp: int = 3072,
    weights: str | None = None,
) -> VitEncoder:
    """Defaults are ViT-B/16."""
    return VitEncoder(ctx, image_size, patch_size, layers, heads, hidden, mlp, weights)
