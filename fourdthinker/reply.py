"""A completion as a reader sees it: text, with each latent block shown as a visible marker.

A latent block is `<|latent_start|>` + up to latent_size `<|latent_pad|>` + `<|latent_end|>` (the
end is missing when `max_tokens` cut the block). In a reply it becomes `⟨latent 1⟩`, `⟨latent 2⟩`,
... in order; the text between blocks is decoded with special tokens dropped (the end-of-turn
token, stray pads). Token ids come from the checkpoint (`LatentIds`), never from literals.
`ReplyStream` renders the same text incrementally for streaming, holding back an open block and
an incomplete UTF-8 character so that the pieces it emits concatenate to `render_reply`'s text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fourdthinker.tokens import LatentIds


def latent_marker(number: int) -> str:
    return f"⟨latent {number}⟩"


@dataclass
class LatentBlock:
    number: int  # 1-based, in order of the reply
    start: int  # completion-relative index of its <|latent_start|>
    stop: int  # index just past the block (after <|latent_end|>, or the end of a cut block)
    slots: list[int] = field(default_factory=list)  # indices of its <|latent_pad|> slots
    closed: bool = True  # False: cut by max_tokens before <|latent_end|>


def latent_blocks(token_ids: list[int], ids: LatentIds) -> list[LatentBlock]:
    """The latent blocks of a completion, in order."""
    blocks: list[LatentBlock] = []
    i, n = 0, len(token_ids)
    while i < n:
        if token_ids[i] != ids.start:
            i += 1
            continue
        block = LatentBlock(len(blocks) + 1, i, i + 1)
        j = i + 1
        while j < n and token_ids[j] == ids.pad and len(block.slots) < ids.latent_size:
            block.slots.append(j)
            j += 1
        if j < n and token_ids[j] == ids.end:
            j += 1
        else:
            block.closed = False
        block.stop = j
        blocks.append(block)
        i = j
    return blocks


def render_reply(token_ids: list[int], tokenizer, ids: LatentIds) -> str:
    """The completion's text with each latent block replaced by its marker."""
    parts, last = [], 0
    for block in latent_blocks(token_ids, ids):
        parts.append(tokenizer.decode(token_ids[last:block.start], skip_special_tokens=True))
        parts.append(latent_marker(block.number))
        last = block.stop
    parts.append(tokenizer.decode(token_ids[last:], skip_special_tokens=True))
    return "".join(parts)


class ReplyStream:
    """Incremental `render_reply`: feed the growing token list, get the new text each time."""

    def __init__(self, tokenizer, ids: LatentIds):
        self.tokenizer, self.ids = tokenizer, ids
        self.emitted = ""

    def update(self, token_ids: list[int], final: bool = False) -> str:
        stable = token_ids
        if not final:
            blocks = latent_blocks(token_ids, self.ids)
            if blocks and not blocks[-1].closed:
                stable = token_ids[:blocks[-1].start]  # an open block: its marker comes once it closes
        text = render_reply(stable, self.tokenizer, self.ids)
        if not final:
            text = text.rstrip("\ufffd")  # a multi-byte character not yet complete
        if not text.startswith(self.emitted):
            return ""  # a decode that re-merged earlier bytes: wait for the final text
        delta, self.emitted = text[len(self.emitted):], text
        return delta
