"""One conversation type for every verb: training rows, prediction rows, engine requests, the server's
OpenAI messages and the merge's probes all become a `Conversation`, are checked by `validate`, and reach
a chat template through `Conversation.to_template`; images are opened by `open_image` under an
`ImagePolicy` (which formats, and which folder paths may come from).

A conversation is a list of messages (role + parts: text or image) and its images, one per image part in
order. Text may hold `<image>` placeholders (LLaMA-Factory / swift / LLaVA data); `from_placeholders` turns
them into image parts. Every check reports a `RowError` (stable code + what to do), so a data file gets
every reason for every row and a request gets its first one as a `ConversationError`.
"""

from .images import IMAGE_FORMATS, ConversationError, ImageError, ImagePolicy, ImageSource, open_image
from .messages import (
    IMAGE,
    IMAGE_PLACEHOLDER,
    ROLES,
    Conversation,
    Message,
    Part,
    RowError,
    from_placeholders,
    from_request,
    parse_content,
    parse_turn,
    validate,
)

__all__ = [
    "IMAGE",
    "IMAGE_FORMATS",
    "IMAGE_PLACEHOLDER",
    "ROLES",
    "Conversation",
    "ConversationError",
    "ImageError",
    "ImagePolicy",
    "ImageSource",
    "Message",
    "Part",
    "RowError",
    "from_placeholders",
    "from_request",
    "open_image",
    "parse_content",
    "parse_turn",
    "validate",
]
