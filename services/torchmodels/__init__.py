"""PyTorch stages: well-known architectures (torchvision, transformers) with random weights,
served through the same plug-in contract as the reference models (services/stage/plugin.py).

    vision:    jpeg_decode, detector (SSDlite320-MobileNetV3), crop (roi_align), classifier
               (ResNet-50), vit_encoder (ViT-B/16)
    decoding:  caption_decoder (GPT-2 small with cross-attention), speech_encoder and
               speech_decoder (Whisper-base)
    audio:     log_mel (Whisper's front end)
    byom:      module (any torch.nn.Module from a `module:function` factory; docs/MODELS.md)

`core` holds what they share (DLPack in and out on the replica's stream, fp16 on CUDA, seeded
or loaded weights), `graphs` the CUDA graphs per batch bucket. torch is an optional extra
(`pip install 'camelot[torch]'`); importing this package does not import it.
"""
