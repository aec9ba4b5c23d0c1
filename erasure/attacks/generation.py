"""Where an attack's images come from: the patched pipeline in this process, or a running
ConceptGuard server through its generation API with a tenant key (the tenant's own stack,
as a tenant would attack it).

Both answer `images(prompts, seeds)` with one image per (prompt, seed) pair, [n, 3, H, W] in
[-1, 1]. The HTTP client asks for one request per prompt with `n` = the number of seeds
(image j of a request with seed s is seed s + j, docs/API.md), so seeds must be consecutive.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from patches.errors import ConceptGuardError

ENV_API_KEY = "CONCEPTGUARD_API_KEY"
GENERATE_PATH = "/v1/images/generations"


class GenerationRefused(ConceptGuardError):
    """The server refused a generation request or could not be reached."""


@dataclass(frozen=True)
class Sampling:
    """How every image of an attack is sampled."""

    seeds: tuple[int, ...]
    steps: int = 25
    guidance: float = 4.0

    def record(self) -> dict[str, Any]:
        return {"seeds": list(self.seeds), "steps": self.steps, "guidance": self.guidance}


class LocalGenerator:
    """The pipeline in this process, with whatever patches are applied to it."""

    where = "local"

    def __init__(self, pipe: Any, sampling: Sampling, batch: int = 64):
        self.pipe, self.sampling, self.batch = pipe, sampling, batch
        pipe.set_progress_bar_config(disable=True)

    def images(self, prompts: list[str], seeds: tuple[int, ...] | None = None) -> torch.Tensor:
        seeds = seeds or self.sampling.seeds
        rows = [(p, s) for p in prompts for s in seeds]
        out = []
        for start in range(0, len(rows), self.batch):
            chunk = rows[start : start + self.batch]
            out.append(
                self._run(
                    prompt=[p for p, _ in chunk],
                    generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                )
            )
        return torch.cat(out)

    def images_from_states(self, states: torch.Tensor, seeds: tuple[int, ...]) -> torch.Tensor:
        """Images from token states given directly (textual inversion): one per (row, seed)."""
        rows = [(i, s) for i in range(len(states)) for s in seeds]
        out = []
        for start in range(0, len(rows), self.batch):
            chunk = rows[start : start + self.batch]
            out.append(
                self._run(
                    prompt_embeds=states[[i for i, _ in chunk]],
                    generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                )
            )
        return torch.cat(out)

    def _run(self, **inputs: Any) -> torch.Tensor:
        s = self.sampling
        with torch.no_grad():
            images = self.pipe(
                num_inference_steps=s.steps, guidance_scale=s.guidance, output_type="pt", **inputs
            ).images
        return images.float() * 2 - 1


class ServerGenerator:
    """A running server's `POST /v1/images/generations` with a tenant key."""

    where = "server"

    def __init__(
        self,
        url: str,
        key: str | None,
        sampling: Sampling,
        timeout: float = 300.0,
        max_images: int = 4,
    ):
        key = key or os.environ.get(ENV_API_KEY)
        if not key:
            raise GenerationRefused(f"no tenant key: pass --key or set ${ENV_API_KEY}")
        seeds = sampling.seeds
        if list(seeds) != list(range(seeds[0], seeds[0] + len(seeds))):
            raise GenerationRefused("the server path needs consecutive seeds")
        self.url, self.key, self.sampling = url.rstrip("/"), key, sampling
        self.timeout, self.max_images = timeout, max_images
        self.records: list[dict[str, Any]] = []  # the server's `conceptguard` record per call

    def images(self, prompts: list[str], seeds: tuple[int, ...] | None = None) -> torch.Tensor:
        seeds = seeds or self.sampling.seeds
        out = []
        for prompt in prompts:
            for start in range(0, len(seeds), self.max_images):
                part = seeds[start : start + self.max_images]
                out += self._request(prompt, part[0], len(part))
        return torch.stack(out)

    def _request(self, prompt: str, seed: int, n: int) -> list[torch.Tensor]:
        body = {
            "prompt": prompt,
            "n": n,
            "seed": seed,
            "steps": self.sampling.steps,
            "guidance_scale": self.sampling.guidance,
            "response_format": "b64_json",
        }
        answer = self._post(json.dumps(body).encode())
        self.records.append(answer.get("conceptguard", {}))
        return [_decode_png(item["b64_json"]) for item in answer["data"]]

    def _post(self, data: bytes, attempts: int = 5) -> dict[str, Any]:
        for attempt in range(attempts):
            request = urllib.request.Request(self.url + GENERATE_PATH, data=data, method="POST")
            request.add_header("Authorization", f"Bearer {self.key}")
            request.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as exc:
                retry = exc.headers.get("Retry-After")
                if exc.code in (429, 503, 504) and retry and attempt + 1 < attempts:
                    time.sleep(float(retry))
                    continue
                raise GenerationRefused(f"HTTP {exc.code}: {_reason(exc)}") from None
            except urllib.error.URLError as exc:
                raise GenerationRefused(f"cannot reach {self.url}: {exc.reason}") from None
        raise GenerationRefused(f"{self.url} kept asking to retry")


def _reason(exc: urllib.error.HTTPError) -> str:
    text = exc.read().decode(errors="replace")
    try:
        error = json.loads(text)["error"]
        return f"{error['type']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return text[:300] or str(exc.reason)


def _decode_png(data: str) -> torch.Tensor:
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1
