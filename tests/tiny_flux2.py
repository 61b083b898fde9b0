"""A tiny but complete FLUX.2 model folder in the real diffusers layout, for trainer tests.

Unlike the parity fixtures, its text encoder is deep enough (28 layers) for the real default
hidden-state layers (9, 18, 27), so it loads with no special options — exactly as a user's model.
Widths are tiny so a training step takes milliseconds on a CPU.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from tests.tiny_tokenizers import TINY_VOCAB, build_qwen3_tokenizer

QWEN_HIDDEN = 8  # joint_attention_dim = 3 x 8


def build_tiny_klein(folder: Path, distilled: bool = False, seed: int = 0) -> Path:
    import diffusers
    import torch
    import transformers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
                                       latent_channels=32)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * torch.randn(128))
        vae.bn.running_var.copy_(0.5 + torch.rand(128))
    transformer = diffusers.Flux2Transformer2DModel(
        in_channels=128, out_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * QWEN_HIDDEN, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], rope_theta=2000, guidance_embeds=False,
    )
    with torch.no_grad():  # diffusers zero-initialises some layers; make every path non-trivial
        for p in transformer.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    qcfg = transformers.Qwen3Config(vocab_size=TINY_VOCAB, hidden_size=QWEN_HIDDEN, intermediate_size=16,
                                    num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                    max_position_embeddings=512, tie_word_embeddings=True)
    te = transformers.Qwen3ForCausalLM(qcfg).eval()
    tok = build_qwen3_tokenizer(folder / "_tok")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                      base_shift=0.5, max_shift=1.15, time_shift_type="exponential")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.Flux2KleinPipeline(scheduler=sched, vae=vae.eval(), text_encoder=te, tokenizer=tok,
                                            transformer=transformer.eval(), is_distilled=distilled)
        pipe.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    return folder


def make_images(folder: Path, n: int = 3, size: int = 32, seed: int = 0, captions: bool = True) -> Path:
    """n random-but-structured RGB images (a coloured square on a gradient) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        y, x = np.mgrid[0:size, 0:size] / size
        img = np.stack([x, y, 1 - x], -1) * 0.5 + 0.25
        c = g.integers(4, size // 2)
        img[c : c + size // 3, c : c + size // 3] = g.random(3)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img_{i}.png")
        if captions:
            (folder / f"img_{i}.txt").write_text(f"a photo of [trigger] number {i}")
    return folder
