"""Validation images during training: which prompts at which sizes, which model renders them (the
one the LoRA will be used with), how, and the baseline → checkpoint strips in `progression/`.

For klein trained on the klein-base weights the images come from the distilled klein (as the Swift
trainer does; 4 steps, no CFG). That transformer carries the same LoRA layers, which share the
training model's LoRA arrays. It stays loaded beside the training model when both fit twice over
in the machine's memory, else it is loaded for each validation and freed after it.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from mflux2 import lora as lora_mod
from mflux2.training import data as data_mod
from mflux2.training.config import TrainConfig
from mflux2.training.outputs import atomic_write, atomic_write_text, checkpoint_dirs


@dataclass
class ValidationItem:
    index: int
    prompt: str
    width: int
    height: int
    seed: int
    with_trigger: bool


def validation_items(cfg: TrainConfig) -> list[ValidationItem]:
    """Each configured prompt at each requested size; prompts with apply_trigger get a trigger and a
    no-trigger version side by side, so DOP (the class without the trigger) can be judged by eye."""
    items: list[ValidationItem] = []
    trigger = cfg.dataset.trigger_word
    for p in cfg.validation.prompts:
        # A prompt that already names the trigger word counts as a trigger prompt (the report tags it so)
        variants = [(p.prompt, data_mod.names_trigger(p.prompt, trigger))]
        if p.apply_trigger and trigger:
            variants = [(data_mod.apply_trigger(p.prompt, trigger), True), (p.prompt, False)]
        sizes = list(p.sizes) if p.sizes else ([512] if p.is_512 else []) + ([1024] if p.is_1024 else [])
        for text, with_trigger in variants:
            for s in sizes:
                if any(it.prompt == text and it.width == s for it in items):
                    continue  # the no-trigger twin may also be listed explicitly
                items.append(ValidationItem(len(items), text, s, s, p.seed if p.seed is not None else cfg.validation.seed, with_trigger))
    return items


def prompt_group(prompt: str, with_trigger: bool, cfg: TrainConfig) -> str:
    """What a validation image should show: `trigger` (the subject), `class` (names the DOP class word
    without the trigger: the base model's image, what DOP's class prompt keeps) or `unrelated`
    (neither word: the base model's image, kept only as far as preservation reaches it)."""
    if with_trigger:
        return "trigger"
    return "class" if data_mod.names_trigger(prompt, cfg.loss.diff_output_preservation_class) else "unrelated"


class Validation:
    """The run's validation images. `trainer` supplies the training model, its LoRA (or EMA) state,
    the cached embeddings, the position ids, the phase clock and the log."""

    def __init__(self, trainer):
        from mflux2.training import memory

        self.t = t = trainer
        cfg = t.cfg
        self.items = validation_items(cfg)
        self.pipe = None  # the validation model's pipeline, when it is not the training model
        self._model = None
        self.keep_loaded = False
        want, where = cfg.validation_variant, cfg.validation_repo
        if self.items and where is not None:
            from mflux2.pipeline import Flux2Pipeline

            q = t.transformer_quantization
            self.pipe = Flux2Pipeline.from_pretrained(
                where, variant=want, dtype=t.pipe.dtype, quantize=None if q == "bf16" else q, low_memory=True)
            extra = self.pipe.loaded_bytes(self.pipe.source.transformer, self.pipe.quantize) / 1e9
            budget = memory.available_gb()
            self.keep_loaded = memory.keeps_validation_model(t.planned_peak_gb, extra, budget)
            t.log(f"validation images: {self.pipe.variant or where} ({extra:.1f} GB), "
                  f"{'kept loaded beside the training model' if self.keep_loaded else 'loaded for each validation and freed after'}")
        source = self.pipe or t.pipe
        self.family, self.variant = source.family, source.variant
        # dev's embedded guidance; real CFG only for klein-base (distilled klein and dev: one pass a step)
        self.guidance = cfg.validation.guidance if self.family == "dev" else None
        self.cfg_scale = cfg.validation.guidance if self.family == "klein-base" and cfg.validation.guidance > 1.0 else None

    def settings(self) -> str:
        """Which model, steps and guidance the images come from (as the LoRA's user runs it)."""
        if not self.items:
            return "none"
        name = self.variant or (f"{Path(self.t.cfg.validation_repo).name} ({self.family})" if self.pipe is not None
                                else f"custom ({self.family})")
        how = f"{self.t.cfg.validation.steps} steps"
        if self.cfg_scale:
            how += f", CFG {self.cfg_scale:g}"
        elif self.guidance is not None:
            how += f", guidance {self.guidance:g}"
        else:
            how += ", no CFG" + (" (step-distilled)" if self.family == "klein" else "")
        trained = f"; LoRA trained on {self.t.pipe.variant or self.t.pipe.source.root.name}" if self.pipe is not None else ""
        return f"{name}, {how}{trained}"

    def model(self):
        """The transformer that renders, with the LoRA as it is now (the EMA average when EMA is on:
        what gets saved)."""
        t = self.t
        if self.pipe is None:
            return t.model
        if self._model is None:
            self.pipe.release("transformer")
            model = self.pipe.transformer
            lcfg = t.cfg.lora
            lora_mod.apply_lora(model, rank=lcfg.rank, alpha=float(lcfg.alpha), targets=lcfg.target_layers, dropout=0.0)
            lora_mod.freeze_for_lora(model)
            self._model = model
            if not self.keep_loaded:
                self.pipe._transformer = None  # only we hold it, so dropping it frees the weights
        self._model.update(t.ema if t.ema is not None else t.model.trainable_parameters())
        return self._model

    def render(self, folder: Path, step: int) -> None:
        """`prompt_<i>_<W>x<H>.png` of every item into `folder`, then the progression strips."""
        if not self.items:
            return
        t = self.t
        with t.clock("baseline validation" if step == 0 else f"validation {step}", step=step):
            self._render(folder, step)

    def _render(self, folder: Path, step: int) -> None:
        from mflux2 import sampling

        t, clock = self.t, self.t.clock
        with clock("validation: model load"):
            model = self.model()
            mx.eval(model.parameters())
        model.eval()
        for it in self.items:
            n = sampling.image_seq_len(it.height, it.width)
            neg = t._embeds("")[None] if self.cfg_scale else None
            x = sampling.denoise(model, sampling.initial_noise(it.seed, 1, it.height, it.width),
                                 t._embeds(it.prompt)[None], t.txt_ids, t._img_ids((it.width, it.height)),
                                 sampling.get_sigmas(t.cfg.validation.steps, n), guidance=self.guidance,
                                 neg_embeds=neg, neg_txt_ids=t.txt_ids, cfg_scale=self.cfg_scale)
            with clock("validation: VAE decode + PNG"):
                pil = t.pipe.decode(x, it.height, it.width)[0]
                path = folder / f"prompt_{it.index}_{it.width}x{it.height}.png"
                atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
        model.train()
        if model is not t.model and not self.keep_loaded:
            self._model = None  # loaded again at the next validation: it does not stay beside training
            gc.collect()
            mx.clear_cache()
        self.update_progression(folder, step)

    def update_progression(self, folder: Path, step: int) -> None:
        """`progression/prompt_<i>_<W>x<H>.png`: baseline then every checkpoint, left to right."""
        from PIL import Image, ImageDraw

        output = self.t.output
        prog = output / "progression"
        prog.mkdir(exist_ok=True)
        for it in self.items:
            name = f"prompt_{it.index}_{it.width}x{it.height}.png"
            frames = []
            base = output / "baseline" / name
            if base.exists():
                frames.append(("base", base))
            for s, d in checkpoint_dirs(output):
                if (d / name).exists() and s != step:
                    frames.append((str(s), d / name))
            if (folder / name).exists() and folder.name != "baseline":
                frames.append((str(step), folder / name))
            if not frames:
                continue
            thumb = 256 if it.width >= 256 else it.width
            strip = Image.new("RGB", (thumb * len(frames), thumb + 18), "white")
            draw = ImageDraw.Draw(strip)
            for i, (label, p) in enumerate(frames):
                with Image.open(p) as im:
                    strip.paste(im.convert("RGB").resize((thumb, thumb)), (i * thumb, 18))
                draw.text((i * thumb + 4, 3), f"step {label}" if label != "base" else "baseline", fill="black")
            atomic_write(prog / name, lambda tmp: strip.save(tmp, format="PNG"))
        listing = [{"index": it.index, "prompt": it.prompt, "trigger": it.with_trigger, "size": [it.width, it.height],
                    "seed": it.seed, "group": prompt_group(it.prompt, it.with_trigger, self.t.cfg)} for it in self.items]
        atomic_write_text(prog / "prompts.json", json.dumps(listing, indent=1))
