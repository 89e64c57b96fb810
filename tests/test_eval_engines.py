"""Recording a reply: latent blocks as markers, the turn cut at its end; stand-in replies."""

from __future__ import annotations

from fourdthinker.eval_engines import StandInAnswerer, render_reply
from fourdthinker.rewards import extract_choice


def test_latent_blocks_become_numbered_markers_and_the_turn_ends_at_im_end(tiny_model_dir):
    from transformers import AutoConfig, AutoTokenizer

    from fourdthinker.tokens import LatentIds

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = LatentIds.from_config(AutoConfig.from_pretrained(tiny_model_dir))
    block = [ids.start] + [ids.pad] * ids.latent_size + [ids.end]
    tokens = (tok("<think>look").input_ids + block + tok("</think><answer>C</answer>").input_ids
              + tok("<|im_end|>").input_ids + tok("after").input_ids)
    text, marked, blocks = render_reply(tokens, tok, ids)
    assert blocks == 1
    assert marked == "<think>look⟨latent 1⟩</think><answer>C</answer>"
    latent_text = "<|latent_start|>" + "<|latent_pad|>" * ids.latent_size + "<|latent_end|>"
    assert text == f"<think>look{latent_text}</think><answer>C</answer>"
    assert extract_choice(text) == "C"
    # a block cut by the token limit runs to the end; the count goes on
    text, marked, blocks = render_reply(block + tok(" x").input_ids + [ids.start, ids.pad], tok, ids)
    assert (marked, blocks) == ("⟨latent 1⟩ x⟨latent 2⟩", 2)


def test_stand_ins_reply_the_gold_a_constant_or_a_text():
    row = {"answer": "C"}
    assert extract_choice(StandInAnswerer("oracle").answer([row])[0].text) == "C"
    assert extract_choice(StandInAnswerer("constant:A").answer([row])[0].text) == "A"
    assert StandInAnswerer("reply:no tags here").answer([row])[0].marked == "no tags here"
