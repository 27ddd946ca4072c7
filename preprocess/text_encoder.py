"""The frozen text encoder of the text-to-image recipe: captions -> (77, hidden) token features.

``load_text_encoder(spec, device)`` accepts

* ``clip-vit-L``: ``openai/clip-vit-large-patch14`` (hidden 768), the encoder of U-ViT's MS-COCO features
  that REPA's ``train_t2i.py`` trains on;
* any Hugging Face repo id or local folder holding a transformers ``CLIPTextModel`` + ``CLIPTokenizer``
  (``save_pretrained`` output: config.json, model.safetensors, tokenizer files).

Encoding is U-ViT's ``FrozenCLIPEmbedder``: tokenize with truncation to 77 tokens and
``padding="max_length"``, run the text model on ``input_ids`` only (no attention mask: the padding tokens
are encoded too, behind CLIP's causal mask) and keep ``last_hidden_state`` in float32, every one of the 77
positions. The unconditional (CFG) context is the encoding of the empty caption ``""``.
"""
from __future__ import annotations

import hashlib
import os

import torch

from .hub import ModelDownloadError, download_guard

__all__ = ["TextEncoder", "load_text_encoder", "TEXT_ENCODER_ALIASES", "MAX_LENGTH", "TextEncoderError"]

TEXT_ENCODER_ALIASES = {"clip-vit-L": "openai/clip-vit-large-patch14"}
MAX_LENGTH = 77  # CLIP's context length; U-ViT pads every caption to it
_LOCAL_HINT = ("--text-encoder /path/to/dir (a folder with a transformers CLIPTextModel and its CLIPTokenizer, "
               "as CLIPTextModel.save_pretrained + CLIPTokenizer.save_pretrained write them)")


class TextEncoderError(RuntimeError):
    """The text encoder cannot be loaded or used; the message names it and what to do."""


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise TextEncoderError("--text-encoder needs the `transformers` package: pip install 'repa[t2i]' "
                               "(or pip install transformers)") from e
    return transformers


class TextEncoder:
    """A frozen CLIP text tower. ``encode(captions)`` -> float32 (N, 77, hidden) on the CPU."""

    def __init__(self, spec: str, device: str | torch.device = "cpu", batch_size: int = 64):
        tf = _transformers()
        self.spec = spec
        self.model_id = TEXT_ENCODER_ALIASES.get(spec, spec)
        self.local = os.path.isdir(os.path.expanduser(self.model_id))
        path = os.path.expanduser(self.model_id) if self.local else self.model_id
        if not self.local and spec.startswith((".", "/", "~")):
            raise TextEncoderError(f"--text-encoder {spec}: no such folder; pass clip-vit-L, a Hugging Face "
                                   f"repo id (owner/name) or {_LOCAL_HINT}")
        with download_guard(f"{spec} ({self.model_id})" if spec != self.model_id else spec, _LOCAL_HINT,
                            hub=not self.local):
            self.tokenizer = tf.CLIPTokenizer.from_pretrained(path)
            self.model = tf.CLIPTextModel.from_pretrained(path)
        self.device = torch.device(device)
        self.model.eval().requires_grad_(False).to(self.device, torch.float32)  # U-ViT encodes in fp32
        self.hidden_size = int(self.model.config.hidden_size)
        self.batch_size = batch_size
        if int(self.model.config.max_position_embeddings) < MAX_LENGTH:
            raise TextEncoderError(f"--text-encoder {spec}: the model has {self.model.config.max_position_embeddings}"
                                   f" positions, fewer than the {MAX_LENGTH} tokens every caption is padded to")

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """U-ViT FrozenCLIPEmbedder: (N, 77, hidden) float32 last hidden states, in batches."""
        out = []
        for i in range(0, len(captions), self.batch_size):
            chunk = [str(c) for c in captions[i: i + self.batch_size]]
            tokens = self.tokenizer(chunk, truncation=True, max_length=MAX_LENGTH, padding="max_length",
                                    return_tensors="pt")["input_ids"].to(self.device)
            out.append(self.model(input_ids=tokens).last_hidden_state.float().cpu())
        if not out:
            return torch.zeros(0, MAX_LENGTH, self.hidden_size)
        return torch.cat(out)

    def weights_sha256(self) -> str:
        """sha256 over the text model's tensors (names, dtype, bytes) in name order: names the exact weights."""
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    @property
    def provenance(self) -> dict:
        return {"name": self.spec, "id": self.model_id, "local": self.local, "max_length": MAX_LENGTH,
                "hidden_size": self.hidden_size, "output": "last_hidden_state", "padding": "max_length",
                "attention_mask": False, "weights_sha256": self.weights_sha256()}


def load_text_encoder(spec: str, device: str | torch.device = "cpu") -> TextEncoder:
    """Load and freeze a text encoder; download problems raise ModelDownloadError with the ways out."""
    try:
        return TextEncoder(spec, device)
    except (ModelDownloadError, TextEncoderError):
        raise
    except OSError as e:  # e.g. a folder without the CLIP files
        raise TextEncoderError(f"--text-encoder {spec}: cannot load a CLIPTextModel + CLIPTokenizer from "
                               f"{TEXT_ENCODER_ALIASES.get(spec, spec)!r} ({type(e).__name__}: {e}); pass "
                               f"clip-vit-L or {_LOCAL_HINT}") from e
