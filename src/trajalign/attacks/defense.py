"""Defenses that act inside the attacked context, after each injection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from trajalign.models.chat import ChatFormat


class ReinjectHeader(BaseModel):
    """Defense (Any-Depth Alignment style): after the injection, the assistant header tokens are re-inserted
    so the model reassesses its answer as if starting a fresh turn."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["reinject-header"] = "reinject-header"

    def injected_after(self, chat: ChatFormat) -> list[int]:
        """The tokens placed after every injection."""
        return list(chat.header_ids)
