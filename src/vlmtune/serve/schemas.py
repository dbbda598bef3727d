"""OpenAI chat-completion request and response bodies (pydantic), as the official client sends and reads them.

Fields vlmtune cannot honour are refused (a 400 naming the field), never ignored: `tools`, a JSON
`response_format`, `logit_bias`, non-zero penalties. Fields that change nothing about the answer (`user`,
`metadata`, `store`, `service_tier`, `parallel_tool_calls`) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    # Accepted, with no effect on the answer.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None

    def refused(self) -> tuple[str, str] | None:
        """(field, why) for a setting that would silently do nothing here, else None."""
        if self.tools or self.tool_choice not in (None, "none"):
            return "tools", "tool calls are not supported by vlmtune serve."
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only the text response format is supported."
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported."
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported (leave it unset or 0)."
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true."
        return None


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str
