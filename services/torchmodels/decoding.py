"""Autoregressive decoders from transformers: a GPT-2 with cross-attention for captions, and
Whisper's encoder and decoder for speech. Weights are random (a config, never a checkpoint).

Random weights are drawn wider than the checkpoints' initialisation (std `init_std` = 0.1, not
0.02) and the output projection is not tied to the token embedding: at 0.02 with tied weights a
random decoder repeats its start token whatever its input, so a stale or misrouted answer would
look right. The compute is the same.

Decoding is greedy for a fixed number of tokens (no early stop at an end token: every query costs
the same, as a served captioner or transcriber capped at a length does at worst), one token a
step with a KV cache: step t feeds only the token chosen at t-1. Each step's shapes are fixed by
t, and nothing waits on the host, so the whole loop is one CUDA graph per batch bucket where
transformers allows it (its cache grows by `torch.cat` inside the graph's private pool); if a
capture fails, the stage decodes eagerly (services/torchmodels/graphs.py).

Plug-in factories:

    caption_decoder   features [T, d] -> tokens int32 [max_len]  (GPT-2 small by default)
    speech_encoder    mel [n_mels, frames] -> states [frames / 2, d] (Whisper-base by default)
    speech_decoder    states -> tokens int32 [max_len]            (Whisper-base by default)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from common.errors import InvalidArgument
from services.stage.plugin import ModelContext
from services.torchmodels.core import TorchStage, positive, spec


def _cache_kwarg(forward: Callable[..., Any]) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name warns); both work."""
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def greedy(
    step: Callable[[Any, Any], tuple[Any, Any]], first: Any, max_len: int, torch: Any
) -> Any:
    """`max_len` tokens per row: `step(tokens [n, 1], cache) -> (logits [n, 1, V], cache)`,
    starting from the tokens `first` [n, 1]; int32 [n, max_len]."""
    tokens, cache, chosen = first, None, []
    for _ in range(max_len):
        logits, cache = step(tokens, cache)
        tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
        chosen.append(tokens)
    return torch.cat(chosen, dim=1).to(torch.int32)


class CaptionDecoder(TorchStage):
    """A GPT-2 (transformers `GPT2LMHeadModel`, cross-attention on) reading the image encoder's
    tokens; `hidden` must equal the encoder's width."""

    def __init__(
        self,
        ctx: ModelContext,
        context_tokens: int,
        hidden: int,
        layers: int,
        heads: int,
        vocab: int,
        max_len: int,
        start_token: int,
        init_std: float,
        weights: str | None,
    ) -> None:
        super().__init__(ctx, "caption_decoder")
        from transformers import GPT2Config, GPT2LMHeadModel

        self.max_len = positive("max_len", max_len)
        vocab = positive("vocab", vocab)
        if not 0 <= start_token < vocab:
            raise InvalidArgument(f"option start_token={start_token} is outside vocab={vocab}")
        if hidden % heads:
            raise InvalidArgument(f"option hidden={hidden} is not divisible by heads={heads}")
        self.start = start_token
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=max(1024, self.max_len),
            n_embd=positive("hidden", hidden),
            n_layer=positive("layers", layers),
            n_head=positive("heads", heads),
            add_cross_attention=True,
            bos_token_id=start_token,
            eos_token_id=start_token,
            initializer_range=_std(init_std),
            tie_word_embeddings=False,
        )
        self.seeded()
        self.net = self.place(GPT2LMHeadModel(config), weights)
        self.cache_kwarg = _cache_kwarg(self.net.forward)
        self.inputs = [
            spec(
                "features", ctx.compute_dtype, (positive("context_tokens", context_tokens), hidden)
            )
        ]
        self.outputs = [spec("tokens", np.int32, (self.max_len,))]
        self.run = self.graphed("decode", self._decode, self.inputs)

    def _decode(self, features: Any) -> Any:
        torch = self.torch

        def step(tokens: Any, cache: Any) -> tuple[Any, Any]:
            out = self.net(
                input_ids=tokens,
                encoder_hidden_states=features,
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
            return out.logits, _cache_of(out)

        first = torch.full((features.shape[0], 1), self.start, dtype=torch.long, device=self.device)
        return greedy(step, first, self.max_len, torch)

    def forward(self, features: Any) -> list[Any]:
        return [self.run(features)]


def caption_decoder(
    ctx: ModelContext,
    context_tokens: int = 197,
    hidden: int = 768,
    layers: int = 12,
    heads: int = 12,
    vocab: int = 50257,
    max_len: int = 16,
    start_token: int = 50256,
    init_std: float = 0.1,
    weights: str | None = None,
) -> CaptionDecoder:
    """Defaults are GPT-2 small over ViT-B/16's 197 tokens; 50256 is GPT-2's <|endoftext|>,
    which GPT-2 captioners start from."""
    return CaptionDecoder(
        ctx, context_tokens, hidden, layers, heads, vocab, max_len, start_token, init_std, weights
    )


def _std(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise InvalidArgument(f"option init_std={value!r} must be a number in (0, 1)")
    return float(value)


def whisper_config(
    mels: int,
    frames: int,
    hidden: int,
    layers: int,
    heads: int,
    vocab: int,
    max_len: int,
    init_std: float = 0.1,
) -> Any:
    """A Whisper config whose encoder takes `frames` mel frames (30 s = 3000 in Whisper)."""
    from transformers import WhisperConfig

    if frames % 2:
        raise InvalidArgument(f"option frames={frames} must be even (the encoder halves it)")
    if hidden % heads:
        raise InvalidArgument(f"option hidden={hidden} is not divisible by heads={heads}")
    return WhisperConfig(
        vocab_size=positive("vocab", vocab),
        num_mel_bins=positive("mels", mels),
        d_model=positive("hidden", hidden),
        encoder_layers=positive("layers", layers),
        decoder_layers=layers,
        encoder_attention_heads=positive("heads", heads),
        decoder_attention_heads=heads,
        encoder_ffn_dim=4 * hidden,
        decoder_ffn_dim=4 * hidden,
        max_source_positions=positive("frames", frames) // 2,
        max_target_positions=max(448, positive("max_len", max_len) + 1),
        init_std=_std(init_std),
        # ids within the vocabulary (the config validates them); decoding never stops early
        pad_token_id=None,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
    )


class SpeechEncoder(TorchStage):
    """Whisper's audio encoder (two convolutions, the second striding by 2, then transformer
    layers). Graph-safe."""

    def __init__(
        self,
        ctx: ModelContext,
        mels: int,
        frames: int,
        hidden: int,
        layers: int,
        heads: int,
        weights: str | None,
    ) -> None:
        super().__init__(ctx, "speech_encoder")
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        config = whisper_config(mels, frames, hidden, layers, heads, 8, 1)
        self.seeded()
        self.net = self.place(WhisperEncoder(config), weights)
        self.inputs = [spec("mel", ctx.compute_dtype, (mels, frames))]
        self.outputs = [spec("states", ctx.compute_dtype, (frames // 2, hidden))]
        self.run = self.graphed("encode", self._encode, self.inputs)

    def _encode(self, mel: Any) -> Any:
        return self.net(mel).last_hidden_state

    def forward(self, mel: Any) -> list[Any]:
        return [self.run(mel)]


def speech_encoder(
    ctx: ModelContext,
    mels: int = 80,
    frames: int = 3000,
    hidden: int = 512,
    layers: int = 6,
    heads: int = 8,
    weights: str | None = None,
) -> SpeechEncoder:
    """Defaults are Whisper-base's encoder over a 30 s window."""
    return SpeechEncoder(ctx, mels, frames, hidden, layers, heads, weights)


class SpeechDecoder(TorchStage):
    """Whisper's text decoder and an output projection (untied: see the module docstring); a
    weights file holds `decoder.*` (a `WhisperDecoder`'s keys) and `proj_out.weight`."""

    def __init__(
        self,
        ctx: ModelContext,
        states: int,
        hidden: int,
        layers: int,
        heads: int,
        vocab: int,
        max_len: int,
        start_token: int,
        init_std: float,
        weights: str | None,
    ) -> None:
        super().__init__(ctx, "speech_decoder")
        from transformers.models.whisper.modeling_whisper import WhisperDecoder

        config = whisper_config(
            8, 2 * positive("states", states), hidden, layers, heads, vocab, max_len, init_std
        )
        if not 0 <= start_token < vocab:
            raise InvalidArgument(f"option start_token={start_token} is outside vocab={vocab}")
        self.start = start_token
        self.max_len = max_len
        self.seeded()
        nn = self.torch.nn
        proj = nn.Linear(hidden, vocab, bias=False)
        nn.init.normal_(proj.weight, std=config.init_std)
        self.net = self.place(
            nn.ModuleDict({"decoder": WhisperDecoder(config), "proj_out": proj}), weights
        )
        self.decoder, self.proj_out = self.net["decoder"], self.net["proj_out"]
        self.cache_kwarg = _cache_kwarg(self.decoder.forward)
        self.inputs = [spec("states", ctx.compute_dtype, (states, hidden))]
        self.outputs = [spec("tokens", np.int32, (max_len,))]
        self.run = self.graphed("decode", self._decode, self.inputs)

    def _decode(self, states: Any) -> Any:
        torch = self.torch

        def step(tokens: Any, cache: Any) -> tuple[Any, Any]:
            out = self.decoder(
                input_ids=tokens,
                encoder_hidden_states=states,
                use_cache=True,
                **{self.cache_kwarg: cache},
            )
            return self.proj_out(out.last_hidden_state), _cache_of(out)

        first = torch.full((states.shape[0], 1), self.start, dtype=torch.long, device=self.device)
        return greedy(step, first, self.max_len, torch)

    def forward(self, states: Any) -> list[Any]:
        return [self.run(states)]


def speech_decoder(
    ctx: ModelContext,
    states: int = 1500,
    hidden: int = 512,
    layers: int = 6,
    heads: int = 8,
    vocab: int = 51865,
    max_len: int = 24,
    start_token: int = 50258,
    init_std: float = 0.1,
    weights: str | None = None,
) -> SpeechDecoder:
    """Defaults are Whisper-base's decoder; 50258 is <|startoftranscript|>."""
    return SpeechDecoder(
        ctx, states, hidden, layers, heads, vocab, max_len, start_token, init_std, weights
    )
