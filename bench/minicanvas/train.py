"""`conceptguard bench minicanvas train`: every MiniCanvas stage, resumable, CPU or GPU.

Stages (each skipped when its output exists in the work directory): judges, tokenizer and
mini-CLIP text encoder, VAE, latent cache, U-Net (checkpointed every few hundred steps).
The result is a stock diffusers StableDiffusionPipeline folder (float32, ~24 MB) with
the judges beside it in `judges/`, and `training.json` with every setting,
seed, time and stage report.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bench.minicanvas.data import render_grid, render_set
from bench.minicanvas.judge import ARCHITECTURES, load_judge, save_judge, train_judge
from bench.minicanvas.models import ModelConfig, sampling_scheduler
from patches.atomic import atomic_write_bytes


@dataclass
class TrainConfig:
    seed: int = 0
    judge_steps: int = 4000
    judge_images: int = 30000
    text_steps: int = 1500
    vae_steps: int = 2500
    unet_steps: int = 8000
    unet_images: int = 60000
    unet_batch: int = 128
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)


def write_captions(out: Path) -> None:
    """The model's own prompt sample (erasure/default_prompts.py): its training captions,
    which `conceptguard erase` uses as retain prompts and template shapes."""
    from bench.minicanvas.world import training_captions

    header = "# MiniCanvas training captions (never the held-out evaluation templates)\n"
    (out / "captions.txt").write_text(header + "\n".join(training_captions()) + "\n")


def _log(message: str) -> None:
    print(f"[minicanvas] {message}", flush=True)


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode())


class Trainer:
    def __init__(self, config: TrainConfig, work: Path):
        self.config = config
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.reports_path = work / "reports.json"
        self.reports = (
            json.loads(self.reports_path.read_text()) if self.reports_path.exists() else {}
        )

    def _report(self, stage: str, report: dict) -> None:
        self.reports[stage] = report
        _write_json(self.reports_path, self.reports)
        _log(f"{stage}: {report}")

    def judges(self) -> list:
        """Both judges; only a missing one is (re)trained, so one can be retrained alone."""
        folder = self.work / "judges"
        folder.mkdir(exist_ok=True)
        c = self.config
        judges, data = [], None
        for i, arch in enumerate(ARCHITECTURES):
            path = folder / f"{arch}.safetensors"
            if path.exists():
                judges.append(load_judge(path))
                continue
            if data is None:
                data = render_set(c.judge_images, c.seed + 1), render_grid(20, c.seed + 2)
            judge, report = train_judge(*data, arch, c.seed + 10 + i, c.judge_steps)
            save_judge(judge, path)
            self._report(f"judge_{arch}", asdict(report))
            judges.append(judge.eval())
        return judges

    def text(self):
        from transformers import CLIPTextModel, CLIPTokenizer

        from bench.minicanvas.tokenizer import build_tokenizer
        from bench.minicanvas.train_text import train_text_encoder

        tok_dir, te_dir = self.work / "tokenizer", self.work / "text_encoder"
        if (te_dir / "config.json").exists():
            return CLIPTokenizer.from_pretrained(tok_dir), CLIPTextModel.from_pretrained(te_dir)
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(tok_dir)
        c = self.config
        data = render_set(c.judge_images, c.seed + 3)
        encoder, report = train_text_encoder(data, tokenizer, c.model, c.seed + 20, c.text_steps)
        encoder.save_pretrained(te_dir)
        self._report("text_encoder", report)
        return tokenizer, encoder

    def vae(self):
        from diffusers import AutoencoderKL

        from bench.minicanvas.train_vae import train_vae

        vae_dir = self.work / "vae"
        if (vae_dir / "config.json").exists():
            return AutoencoderKL.from_pretrained(vae_dir).eval()
        c = self.config
        data = render_set(c.judge_images, c.seed + 4)
        model, report = train_vae(data, c.model, c.seed + 30, c.vae_steps)
        model.save_pretrained(vae_dir)
        self._report("vae", report)
        return model

    def latent_cache(self, vae, tokenizer, text_encoder) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save

        from bench.minicanvas.train_unet import caption_states
        from bench.minicanvas.train_vae import encode_latents

        path = self.work / "unet_data.safetensors"
        if path.exists():
            return load_file(str(path))
        c = self.config
        started = time.perf_counter()
        data = render_set(c.unet_images, c.seed + 5)
        latents = encode_latents(vae, data.tensors())
        states, index = caption_states(text_encoder, tokenizer, data.captions)
        cache = {
            "latents": latents.contiguous(),
            "states": states.contiguous(),
            "caption_index": index.contiguous(),
        }
        atomic_write_bytes(path, save(cache))
        self._report(
            "latent_cache",
            {
                "images": c.unet_images,
                "unique_captions": len(states),
                "latent_std": round(float(latents.std()), 4),
                "seconds": round(time.perf_counter() - started, 1),
            },
        )
        return cache

    def unet(self, cache: dict[str, torch.Tensor]):
        from bench.minicanvas.train_unet import train_unet

        c = self.config
        model, report = train_unet(
            cache["latents"],
            cache["states"],
            cache["caption_index"],
            c.model,
            c.seed + 40,
            c.unet_steps,
            self.work / "unet.ckpt.safetensors",
            batch=c.unet_batch,
            device=c.device,
        )
        self._report("unet", report)
        return model

    def run(self, out: Path):
        from diffusers import StableDiffusionPipeline

        started = time.perf_counter()
        judges = self.judges()
        tokenizer, text_encoder = self.text()
        vae = self.vae()
        unet = self.unet(self.latent_cache(vae, tokenizer, text_encoder))
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        # float32 files: stock from_pretrained then runs on CPU without a dtype argument.
        pipe.save_pretrained(out)
        write_captions(out)
        (out / "judges").mkdir(exist_ok=True)
        for judge in judges:
            save_judge(judge, out / "judges" / f"{judge.architecture}.safetensors")
        summary = {
            "config": asdict(self.config),
            "stages": self.reports,
            "hardware": {
                "device": self.config.device,
                "machine": platform.machine(),
                "processor": platform.processor() or "unknown",
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name(0) if self.config.device == "cuda" else None,
            },
            "session_seconds": round(time.perf_counter() - started, 1),
        }
        _write_json(out / "training.json", summary)
        _log(f"wrote {out}")
        return pipe
