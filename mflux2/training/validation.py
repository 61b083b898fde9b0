"""Validation images during training: which prompts at which sizes, which model renders them (the
one the LoRA will be used with), how, and the baseline → checkpoint strips in `progression/`.

For klein trained on the klein-base weights the images come from the distilled klein (as the Swift
trainer does; 4 steps, no CFG). That transformer carries the same LoRA layers, which share the
training model's LoRA arrays. The run's plan (`plan.make_plan`) says whether it stays loaded beside
the training model or is loaded for each validation and freed after it.

Editing prompts (`reference_image`) are rendered with their reference images, prepared and encoded
by the generation path (`Flux2Pipeline.encode_references`: diffusers' 1024² cap and x16 crop, t = 10,
20, ...), baseline included; their files get the Swift trainer's `_i2i` suffix, and the report and the
progression strips show the prepared references first.
"""

from __future__ import annotations

import gc
import json
from concurrent.futures import ThreadPoolExecutor
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
    references: tuple[str, ...] = ()  # reference image paths (editing), as the config gives them
    source: int = 0  # its entry in validation.prompts (VLM scoring reads that entry's is_vlm_generated)

    @property
    def file_name(self) -> str:
        """`prompt_<i>_<W>x<H>.png`, or `prompt_<i>_i2i_<W>x<H>.png` with references (Swift's suffix)."""
        return f"prompt_{self.index}{'_i2i' if self.references else ''}_{self.width}x{self.height}.png"

    def reference_file(self, j: int) -> str:
        """The prepared reference j as the model sees it, in progression/ (for the report)."""
        return f"prompt_{self.index}_reference_{j}.png"


def validation_items(cfg: TrainConfig) -> list[ValidationItem]:
    """Each configured prompt at each requested size; prompts with apply_trigger get a trigger and a
    no-trigger version side by side, so DOP (the class without the trigger) can be judged by eye."""
    items: list[ValidationItem] = []
    trigger = cfg.dataset.trigger_word
    for source, p in enumerate(cfg.validation.prompts):
        # A prompt that already names the trigger word counts as a trigger prompt (the report tags it so)
        variants = [(p.prompt, data_mod.names_trigger(p.prompt, trigger))]
        if p.apply_trigger and trigger:
            variants = [(data_mod.apply_trigger(p.prompt, trigger), True), (p.prompt, False)]
        sizes = list(p.sizes) if p.sizes else ([512] if p.is_512 else []) + ([1024] if p.is_1024 else [])
        refs = tuple(p.reference_image or ())
        for text, with_trigger in variants:
            for s in sizes:
                if any(it.prompt == text and it.width == s and it.references == refs for it in items):
                    continue  # the no-trigger twin may also be listed explicitly
                items.append(ValidationItem(len(items), text, s, s, p.seed if p.seed is not None else cfg.validation.seed,
                                            with_trigger, refs, source))
    return items


def prepare_validation_references(cfg: TrainConfig, pipe) -> dict[tuple[str, ...], list]:
    """Each prompt's reference images, prepared as generation prepares them (read, checked, capped,
    cropped) — at setup, so a bad image stops the run before anything is cached or trained."""
    from mflux2.training.config import ConfigError

    out = {}
    for i, p in enumerate(cfg.validation.prompts):
        refs = tuple(p.reference_image or ())
        if refs and refs not in out:
            try:
                out[refs] = pipe.prepare_references([str(Path(r).expanduser()) for r in refs])
            except ValueError as e:
                raise ConfigError(f"{cfg.source}: validation.prompts[{i}].reference_image: {e}") from None
    return out


def prompt_group(prompt: str, with_trigger: bool, cfg: TrainConfig) -> str:
    """What a validation image should show: `trigger` (the subject), `class` (names the DOP class word
    without the trigger: the base model's image, what DOP's class prompt keeps) or `unrelated`
    (neither word: the base model's image, kept only as far as preservation reaches it)."""
    if with_trigger:
        return "trigger"
    return "class" if data_mod.names_trigger(prompt, cfg.loss.diff_output_preservation_class) else "unrelated"


class Validation:
    """The run's validation images: rendered by the separate validation model `val_pipe` (kept
    loaded beside training when the plan says so, else loaded for each validation and freed) or by
    the training model, with the LoRA as it is at each render."""

    def __init__(self, cfg: TrainConfig, pipe, val_pipe, keep_loaded: bool, output: Path, clock, log=print):
        self.cfg, self.train_pipe, self.output, self.clock, self.log = cfg, pipe, Path(output), clock, log
        self.items = validation_items(cfg)
        self.references = prepare_validation_references(cfg, pipe)  # paths -> prepared PIL images
        self._encoded: dict[tuple[str, ...], tuple[mx.array, mx.array]] = {}  # paths -> (tokens, ids)
        self._refs_written: set[int] = set()  # items whose prepared references are in progression/
        self.pipe = val_pipe if self.items else None  # None: the training model renders
        self._model = None
        self.keep_loaded = keep_loaded
        source = self.pipe or pipe
        self.family, self.variant = source.family, source.variant
        # dev's embedded guidance; real CFG only for klein-base (distilled klein and dev: one pass a step)
        self.guidance = cfg.validation.guidance if self.family == "dev" else None
        self.cfg_scale = cfg.validation.guidance if self.family == "klein-base" and cfg.validation.guidance > 1.0 else None

    def settings(self) -> str:
        """Which model, steps and guidance the images come from (as the LoRA's user runs it)."""
        if not self.items:
            return "none"
        name = self.variant or (f"{Path(self.cfg.validation_repo).name} ({self.family})" if self.pipe is not None
                                else f"custom ({self.family})")
        how = f"{self.cfg.validation.steps} steps"
        if self.cfg_scale:
            how += f", CFG {self.cfg_scale:g}"
        elif self.guidance is not None:
            how += f", guidance {self.guidance:g}"
        else:
            how += ", no CFG" + (" (step-distilled)" if self.family == "klein" else "")
        trained = f"; LoRA trained on {self.train_pipe.variant or self.train_pipe.source.root.name}" if self.pipe is not None else ""
        return f"{name}, {how}{trained}"

    def model(self, training_model, lora_state):
        """The transformer that renders, with `lora_state` (the LoRA as it is now: the EMA average
        when EMA is on, what gets saved)."""
        if self.pipe is None:
            return training_model
        if self._model is None:
            self.pipe.release("transformer")
            model = self.pipe.transformer
            lcfg = self.cfg.lora
            lora_mod.apply_lora(model, rank=lcfg.rank, alpha=float(lcfg.alpha), targets=lcfg.target_layers, dropout=0.0,
                                type=lcfg.type, factor=lcfg.factor, decompose_both=lcfg.decompose_both)
            lora_mod.freeze_for_lora(model)
            self._model = model
            if not self.keep_loaded:
                self.pipe._transformer = None  # only we hold it, so dropping it frees the weights
        self._model.update(lora_state)
        return self._model

    def encoded_references(self, item: ValidationItem) -> tuple[mx.array | None, mx.array | None]:
        """(tokens [1, M, 128], ids [M, 4]) of the item's references, encoded once per run by the
        generation path; (None, None) for a text-to-image prompt."""
        if not item.references:
            return None, None
        if item.references not in self._encoded:
            self._encoded[item.references] = self.train_pipe.encode_references(self.references[item.references])
        return self._encoded[item.references]

    def render(self, folder: Path, step: int, training_model, lora_state, cond) -> None:
        """`prompt_<i>[_i2i]_<W>x<H>.png` of every item into `folder`, then the progression strips;
        `cond` gives the cached prompt embeddings and the position ids."""
        if not self.items:
            return
        with self.clock("baseline validation" if step == 0 else f"validation {step}", step=step):
            self._render(folder, step, training_model, lora_state, cond)

    def _render(self, folder: Path, step: int, training_model, lora_state, cond) -> None:
        from mflux2 import sampling

        clock = self.clock
        with clock("validation: model load"):
            model = self.model(training_model, lora_state)
            mx.eval(model.parameters())
        model.eval()
        # PNG encoding (zlib, which releases the GIL) runs on a thread while the next image denoises:
        # 0.05 s a 512² image and 0.26 s a 1024² one on the H100's host, a quarter of an image's time.
        # The progression strips below read the files, so every write is finished (or raised) first.
        writes = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mflux2-png") as writer:
            for it in self.items:
                n = sampling.image_seq_len(it.height, it.width)  # the target's tokens: refs do not shift mu
                neg = cond.embeds("")[None] if self.cfg_scale else None
                refs, ref_ids = self.encoded_references(it)
                x = sampling.denoise(model, sampling.initial_noise(it.seed, 1, it.height, it.width),
                                     cond.embeds(it.prompt)[None], cond.txt_ids, cond.img_ids((it.width, it.height)),
                                     sampling.get_sigmas(self.cfg.validation.steps, n), guidance=self.guidance,
                                     neg_embeds=neg, neg_txt_ids=cond.txt_ids, cfg_scale=self.cfg_scale,
                                     refs=refs, ref_ids=ref_ids)
                with clock("validation: VAE decode + PNG"):
                    pil = self.train_pipe.decode(x, it.height, it.width)[0]
                    writes.append(writer.submit(atomic_write, folder / it.file_name,
                                                lambda tmp, pil=pil: pil.save(tmp, format="PNG")))
            with clock("validation: VAE decode + PNG"):
                for w in writes:
                    w.result()  # the last write waited for; a failed one raises here, as it did inline
        model.train()
        if model is not training_model and not self.keep_loaded:
            self._model = None  # loaded again at the next validation: it does not stay beside training
            gc.collect()
            mx.clear_cache()
        self.update_progression(folder, step)

    def update_progression(self, folder: Path, step: int) -> None:
        """`progression/prompt_<i>[_i2i]_<W>x<H>.png`: the references (editing prompts), the baseline,
        then every checkpoint, left to right."""
        from PIL import Image, ImageDraw

        output = self.output
        prog = output / "progression"
        prog.mkdir(exist_ok=True)
        for it in self.items:
            name = it.file_name
            if it.index not in self._refs_written:  # once per run: a resumed run shows the references it uses
                for j, ref in enumerate(self.references.get(it.references, [])):
                    atomic_write(prog / it.reference_file(j), lambda tmp, ref=ref: ref.save(tmp, format="PNG"))
                self._refs_written.add(it.index)
            frames = [("reference", prog / it.reference_file(j)) for j in range(len(it.references))]
            base = output / "baseline" / name
            if base.exists():
                frames.append(("base", base))
            for s, d in checkpoint_dirs(output):
                if (d / name).exists() and s != step:
                    frames.append((str(s), d / name))
            if (folder / name).exists() and folder.name != "baseline":
                frames.append((str(step), folder / name))
            if len(frames) == len(it.references):
                continue
            thumb = 256 if it.width >= 256 else it.width
            strip = Image.new("RGB", (thumb * len(frames), thumb + 18), "white")
            draw = ImageDraw.Draw(strip)
            for i, (label, p) in enumerate(frames):
                with Image.open(p) as im:
                    im = im.convert("RGB")
                    if label == "reference":  # its own aspect, fitted into the square cell
                        im.thumbnail((thumb, thumb))
                        strip.paste(im, (i * thumb + (thumb - im.width) // 2, 18 + (thumb - im.height) // 2))
                    else:
                        strip.paste(im.resize((thumb, thumb)), (i * thumb, 18))
                text = {"base": "baseline", "reference": "reference"}.get(label, f"step {label}")
                draw.text((i * thumb + 4, 3), text, fill="black")
            atomic_write(prog / name, lambda tmp: strip.save(tmp, format="PNG"))
        listing = [{"index": it.index, "prompt": it.prompt, "trigger": it.with_trigger, "size": [it.width, it.height],
                    "seed": it.seed, "file": it.file_name, "group": prompt_group(it.prompt, it.with_trigger, self.cfg),
                    "references": [it.reference_file(j) for j in range(len(it.references))],
                    "reference_paths": list(it.references)} for it in self.items]
        atomic_write_text(prog / "prompts.json", json.dumps(listing, indent=1))
