"""Tiny random-init model directories in the exact formats the real models ship in.

No weights can be downloaded on the project's machines, so tests and the offline demo build small
networks from configs (diffusers' own tests use `block_out_channels=(4, 8)`-sized models) and save
them with `save_pretrained`; the trainer then loads them through the same `from_pretrained` path
as `stabilityai/stable-diffusion-xl-base-1.0`. The tokenizer is the real CLIP BPE vocabulary,
rebuilt from the copy open_clip ships.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

import torch


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_clip_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json/merges.txt of the 49,408-token CLIP tokenizer from open_clip's bundled BPE file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    bpe_path = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "do_lower_case": True,
    }))
    return directory


def _text_encoder_config(hidden: int, with_projection: bool, projection_dim: int, max_length: int, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=max_length, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, projection_dim=projection_dim if with_projection else hidden,
    )


def build_tiny_pipeline(
    directory: str | Path,
    architecture: str = "sd",
    latent_size: int = 8,
    seed: int = 0,
    prediction_type: str = "epsilon",
    channels: tuple[int, int] = (32, 64),
    max_length: int = 16,
    cross_attention_levels: tuple[bool, bool] = (False, True),
    text_layers: int = 2,
    zero_terminal_snr: bool = False,
) -> Path:
    """A complete diffusers-format SD- or SDXL-style pipeline directory with random weights.

    The VAE downsamples by 2 (two blocks), so images are 2 * latent_size pixels square.
    `cross_attention_levels` says which UNet resolution levels read the text (SD reads it at all but the lowest).
    `zero_terminal_snr` writes a scheduler whose betas are rescaled so the last timestep is pure noise, with
    trailing timestep spacing so sampling starts there (Lin et al. 2024); it needs a v- or x0-prediction.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if zero_terminal_snr and prediction_type == "epsilon":
        raise ValueError("zero_terminal_snr needs prediction_type v_prediction or sample: epsilon has no x0 at alpha = 0")

    directory = Path(directory)
    torch.manual_seed(seed)
    text_hidden = 32
    unet_kwargs = dict(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if on else "DownBlock2D" for on in cross_attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if on else "UpBlock2D" for on in reversed(cross_attention_levels)),
        attention_head_dim=8, norm_num_groups=8,
    )
    if architecture == "sdxl":
        time_dim, pooled_dim = 8, 32
        unet = UNet2DConditionModel(
            **unet_kwargs, cross_attention_dim=2 * text_hidden, addition_embed_type="text_time",
            addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
            use_linear_projection=True,
        )
    elif architecture == "sd":
        unet = UNet2DConditionModel(**unet_kwargs, cross_attention_dim=text_hidden)
    else:
        raise ValueError(f"architecture must be sd or sdxl, got {architecture!r}")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=2 * latent_size, scaling_factor=0.18215 if architecture == "sd" else 0.13025,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
        rescale_betas_zero_snr=zero_terminal_snr, timestep_spacing="trailing" if zero_terminal_snr else "leading",
    )
    tokenizer_dir = write_clip_tokenizer(directory / "_tokenizer_src", max_length)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(_text_encoder_config(text_hidden, False, text_hidden, max_length, text_layers))
    if architecture == "sdxl":
        text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(text_hidden, True, 32, max_length))
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipeline.save_pretrained(directory)
    for path in sorted((directory / "_tokenizer_src").iterdir()):
        path.unlink()
    (directory / "_tokenizer_src").rmdir()
    return directory


def write_t5_tokenizer(directory: str | Path) -> Path:
    """A T5-style (SentencePiece unigram, "▁" word starts, </s> appended) fast tokenizer over printable ASCII, its
    letter pairs and the words of the demo's prompts: enough pieces for any English prompt, written as
    tokenizer.json so that T5TokenizerFast loads it without sentencepiece."""
    import string

    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pieces = ["<pad>", "</s>", "<unk>"]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += ["▁" + c for c in chars] + list(chars)
    pieces += [start + a + b for start in ("▁", "") for a in string.ascii_lowercase for b in string.ascii_lowercase]
    words = "a an the of on in with and digit zero one two three four five six seven eight nine red green blue"
    pieces += ["▁" + w for w in words.split() if "▁" + w not in pieces]
    vocab = [(piece, 0.0 if i < 3 else -float(len(piece))) for i, piece in enumerate(pieces)]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("  ", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    T5TokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                    model_max_length=512).save_pretrained(directory)
    return directory


def build_tiny_sd3_pipeline(directory: str | Path, latent_size: int = 8, seed: int = 0, shift: float = 3.0,
                            with_t5: bool = True, layers: int = 2) -> Path:
    """A complete diffusers-format SD3-style pipeline directory with random weights: an SD3Transformer2DModel (patch
    2), CLIP-L- and CLIP-G-style text encoders with projections, a T5 encoder (or none: `with_t5=False`, saved as
    SD3 without T5 is), a 16-channel VAE with a shift factor, and the flow-matching scheduler with SD3's shift."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    directory = Path(directory)
    torch.manual_seed(seed)
    clip_hidden, projection, max_length = 16, 16, 16
    t5_width = 2 * clip_hidden  # the CLIPs' tokens are zero-padded to T5's width: it must be at least their sum
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=2, in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=t5_width, caption_projection_dim=16,
        pooled_projection_dim=2 * projection, pos_embed_max_size=latent_size // 2 * 2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=2 * latent_size, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    clip_dir = write_clip_tokenizer(directory / "_tokenizer_src", max_length)
    tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
    encoders = [CLIPTextModelWithProjection(_text_encoder_config(clip_hidden, True, projection, max_length))
                for _ in range(2)]
    t5_tokenizer, t5 = None, None
    if with_t5:
        t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(directory / "_t5_src"))
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=t5_width, d_kv=8, d_ff=2 * t5_width,
                                     num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                                     decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
        text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    ).save_pretrained(directory)
    for source in ("_tokenizer_src", "_t5_src"):
        if (directory / source).exists():
            for path in sorted((directory / source).iterdir()):
                path.unlink()
            (directory / source).rmdir()
    return directory


def build_tiny_dinov2(directory: str | Path, image_size: int = 32, hidden: int = 32, layers: int = 4, seed: int = 0) -> Path:
    """A random-init DINOv2-architecture ViT saved in transformers' format."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2, patch_size=4,
        image_size=image_size, layerscale_value=1.0,
    )
    Dinov2Model(config).save_pretrained(directory)
    return Path(directory)
