"""Reference models for the four pipelines, written once against `xp` (NumPy or CuPy).

Plug-in factories (`factory(ctx, **options) -> Model`, see services.stage.plugin):

    img_to_text:      preprocess, encoder, decoder
    text_to_img:      text_encoder, generator, super_resolution
    speech_to_text:   features, acoustic, ctc_decode
    video_analytics:  detector, crop, classifier
    torch_adapter:    torch_module (any torch.nn.Module, through DLPack; torch is optional)

`layers` holds the array functions (conv2d by im2col + GEMM, attention, layer norm, pooling,
resampling, activations, embedding), `audio` the log-mel front end, `blocks` the weighted
blocks (ResNet-ish backbone, transformer block).
"""
