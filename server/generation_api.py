"""The LitServe API that turns a validated request into images."""

from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass

import litserve as ls
import torch
from fastapi import HTTPException
from pydantic import ValidationError

from server.schemas import ImageGenerationRequest

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 4.0


@dataclass(frozen=True)
class ModelSettings:
    source: str
    device: str = "cpu"
    dtype: str = "float32"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class GenerationAPI(ls.LitAPI):
    """Loads the pipeline once per worker and serves `POST /v1/images/generations`."""

    def __init__(self, settings: ModelSettings):
        super().__init__(api_path="/v1/images/generations", max_batch_size=1)
        self.settings = settings

    def setup(self, device: str) -> None:
        from patches.loading import load_pipeline

        # Workers share 2 cores on small machines; one thread per worker avoids oversubscription.
        torch.set_num_threads(max(1, int(os.environ.get("CONCEPTGUARD_THREADS", "1"))))
        self.pipe = load_pipeline(self.settings.source, self.settings.dtype, self.settings.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.native_size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def decode_request(self, request: dict) -> ImageGenerationRequest:
        try:
            return ImageGenerationRequest.model_validate(request)
        except ValidationError as exc:
            raise HTTPException(status_code=400, detail=_validation_message(exc)) from None

    def predict(self, request: ImageGenerationRequest) -> dict:
        width, height = request.dimensions(self.native_size)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "big")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        started = time.perf_counter()
        images = self.pipe(
            request.prompt,
            negative_prompt=request.negative_prompt,
            num_images_per_prompt=request.n,
            num_inference_steps=request.steps or DEFAULT_STEPS,
            guidance_scale=(
                request.guidance_scale if request.guidance_scale is not None else DEFAULT_GUIDANCE
            ),
            width=width,
            height=height,
            generator=generator,
        ).images
        return {
            "images": images,
            "seed": seed,
            "seconds": round(time.perf_counter() - started, 4),
        }

    def encode_response(self, output: dict) -> dict:
        return {
            "created": int(time.time()),
            "data": [{"b64_json": png_base64(image)} for image in output["images"]],
            "conceptguard": {"seed": output["seed"], "seconds": output["seconds"]},
        }
