"""The rest of the OpenAI surface a client meets: `GET /v1/models` (the one served model) and
clear answers for the OpenAI endpoints this server does not serve.

`POST /v1/images/generations` itself is server/images_spec.py. A client that calls
`images.edit` or `images.create_variation` gets 404 `RouteNotFound` naming what is not
supported (the `openai` client raises `NotFoundError` with that message), not a bare
"Not Found".
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

from patches.errors import ConceptGuardError
from server.auth import Caller, KeyRing

GENERATE = "POST /v1/images/generations"
# OpenAI image endpoints a client may try, and what they would have done.
UNSUPPORTED = {
    "/v1/images/edits": ("image edits", "images.edit"),
    "/v1/images/variations": ("image variations", "images.create_variation"),
}


class ModelCard(BaseModel):
    """OpenAI's model object."""

    id: str
    object: str = "model"
    created: int
    owned_by: str = "conceptguard"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ModelNotFound(ConceptGuardError):
    """A model id this server does not serve."""

    http_status = 404


def served_model_id(source: str) -> str:
    """The id clients see for the served model: a hub id as given, a local folder by its name
    (never the server's path)."""
    path = Path(source)
    return path.resolve().name if path.exists() else source


def not_found_message(method: str, path: str) -> str:
    """Why nothing answers `method path`, naming what this server does instead."""
    unsupported = UNSUPPORTED.get(path.rstrip("/"))
    if unsupported is not None:
        what, client_call = unsupported
        return (
            f"{what} ({client_call}; {method} {path}) are not supported by this server: it "
            f"generates images from text prompts only ({GENERATE})"
        )
    return (
        f"no route {method} {path} on this server: it serves {GENERATE}, GET /v1/models and "
        "the admin API under /v1/patches and /v1/tenants (see /docs)"
    )


def register_model_routes(app: FastAPI, keys: KeyRing, model_id: str) -> None:
    """`GET /v1/models` and `GET /v1/models/{model}` (the served model, `model_id`) for
    tenant and admin keys."""
    card = ModelCard(id=model_id, created=int(time.time()))

    def caller(request: Request) -> Caller:
        return keys.client(request.headers)

    @app.get("/v1/models", dependencies=[Depends(caller)])
    def list_models() -> dict[str, Any]:
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model:path}", dependencies=[Depends(caller)])
    def get_model(model: str) -> dict[str, Any]:
        if model != card.id:
            raise ModelNotFound(f"this server serves one model, {card.id!r}; not {model!r}")
        return card.model_dump()
