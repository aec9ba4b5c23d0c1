"""Turning a worker's images into the HTTP answer: PNG, JPEG or WebP, base64 in JSON.

This runs in the API process, in a thread (Pillow's encoders release the GIL, so the event
loop keeps answering), not in the inference worker: a worker hands back raw pixels (uint8,
height x width x 3) and goes on to its next batch, and the format is the request's business,
never the worker's. PNG is lossless and its bytes are exactly what encoding the pipeline's
PIL image gives; JPEG and WebP use the request's `output_compression` as their quality.
"""

from __future__ import annotations

import base64
import io
import time
from typing import Any

import numpy as np
from PIL import Image

from server.schemas import (
    GenerationRecord,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
)

# OpenAI's default `output_compression`: 100, the least compression.
DEFAULT_QUALITY = 100
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(pixels: np.ndarray, output_format: str, compression: int | None = None) -> bytes:
    """One image's file bytes; `compression` is the JPEG/WebP quality (PNG ignores it)."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        quality = DEFAULT_QUALITY if compression is None else compression
        image.save(buffer, format=_PIL_FORMATS[output_format], quality=quality)
    return buffer.getvalue()


def images_response(answer: dict[str, Any], request: ImageGenerationRequest) -> dict[str, Any]:
    """The JSON body for a worker's successful answer (`images`: pixel arrays, `record`: the
    GenerationRecord's fields) to `request`."""
    images = answer["images"]
    data = [
        ImageData(
            b64_json=base64.b64encode(
                encode_image(pixels, request.output_format, request.output_compression)
            ).decode("ascii")
        )
        for pixels in images
    ]
    height, width = images[0].shape[:2]
    record = GenerationRecord(**{**answer["record"], "ignored": request.ignored()})
    response = ImagesResponse(
        created=int(time.time()),
        data=data,
        output_format=request.output_format,
        size=f"{width}x{height}",
        conceptguard=record,
    )
    return response.model_dump(exclude_none=True)
